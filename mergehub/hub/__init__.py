"""The ``hub`` command line and the built-in demo."""
