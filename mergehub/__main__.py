"""``python -m mergehub``: the ``hub`` command line, for where no console script is on PATH."""

from mergehub.hub.cli import main

main()
