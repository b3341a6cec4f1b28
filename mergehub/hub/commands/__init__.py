"""The ``hub`` commands, one module per group (:mod:`mergehub.hub.cli` gathers them into the
click group): the store's (``store``), ``merge``, ``push`` / ``pull`` (``transfer``),
``train`` and ``demo``; what they share in ``common``."""
