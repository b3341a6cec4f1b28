"""The ``hub`` command line.

Every command that touches a store takes ``--store PATH`` (default ``$MERGEHUB_HOME``, else
``~/.cache/mergehub``), before or after the command's name (``hub --store X ls`` and ``hub ls
--store X``), and so do ``--debug``, ``--quiet`` and ``-v``. Errors caused by input print one
line ``error: ...`` naming the file, model or tensor and exit with status 2; ``--debug`` shows
the traceback instead.

The click group, its shared options and its error handling are here; the commands, one module
per group, in :mod:`mergehub.hub.commands`.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any

import click

from mergehub import __version__
from mergehub.errors import MergehubError, cli_spelling
from mergehub.host_memory import keep_freed_memory
from mergehub.hub.commands import demo, merge, store, train, transfer
from mergehub.storage.store import default_root


def _set_shared(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Record a shared option in ``ctx.obj``, given before or after the command's name (the
    command's own spelling wins over the group's; ``-v`` counts both)."""
    obj = ctx.ensure_object(dict)
    if param.name == "verbose":
        obj["verbose"] = obj.get("verbose", 0) + value
        if value:
            _log_at(obj["verbose"])
    elif value is not None and value is not False:
        obj[param.name] = value
    else:
        obj.setdefault(param.name, None if param.name == "store" else False)


def _log_at(verbosity: int) -> None:
    """``-v``: log INFO, ``-vv``: DEBUG, from mergehub and the libraries it drives (mergekit's
    ``-v``)."""
    level = logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for name in ("", "mergehub", "huggingface_hub", "transformers", "peft"):
        logging.getLogger(name).setLevel(level)


def _shared_options(with_store: bool) -> list[click.Option]:
    """The options every command accepts before or after its name (``hub ls --store X``)."""
    options = [
        click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_shared,
                     help="Show full tracebacks instead of one-line errors."),
        click.Option(["--quiet", "-q"], is_flag=True, expose_value=False, callback=_set_shared,
                     help="No progress bars and no notes on stderr (results and errors "
                          "still print)."),
        click.Option(["--verbose", "-v"], count=True, expose_value=False, callback=_set_shared,
                     help="Log what mergehub and the libraries it uses (huggingface_hub, "
                          "transformers, peft) report: -v at INFO, -vv at DEBUG."),
    ]
    if with_store:
        options.insert(0, click.Option(
            ["--store"], type=click.Path(file_okay=False, path_type=Path), expose_value=False,
            callback=_set_shared,
            help=f"Store root directory. Default: $MERGEHUB_HOME, else {default_root()}."))
    return options


class _Group(click.Group):
    """Turns :class:`MergehubError`, OS errors and catalog (SQLite) errors (a locked, full or
    damaged catalog) into one line on stderr and exit status 2, and gives every command the
    shared options (``--store`` to those that open a store)."""

    #: commands that never open the user's store
    STORELESS = frozenset({"demo"})

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(_shared_options(with_store=(name or cmd.name) not in self.STORELESS))
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with cli_spelling():  # messages name --options, not Python arguments
                return super().invoke(ctx)
        except BrokenPipeError:
            raise  # the reader went away (`hub show X | head -1`): click exits quietly
        except (MergehubError, OSError, sqlite3.Error) as e:
            if (ctx.obj or {}).get("debug"):
                raise
            where = "store catalog: " if isinstance(e, sqlite3.Error) else ""
            click.echo(f"error: {where}{e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             params=_shared_options(with_store=True))
@click.version_option(__version__, prog_name="mergehub")
def cli() -> None:
    """mergehub: keep fine-tunes and adapters of one base as compressed deltas, merge and ship them.

    A store keeps each base checkpoint once and every fine-tune as a lossless delta against it.
    Start with `hub demo`, or `hub init` then `hub add`. --store, --debug, --quiet and -v go
    before or after the command's name.
    """


for _command in (store.init, store.add, store.ls_, store.show, store.export, store.compress,
                 store.rm, store.gc, store.verify, merge.merge_, transfer.push, transfer.pull,
                 train.train_, demo.demo):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point of both ``hub`` and ``mergehub`` (and ``python -m
    mergehub``); usage lines name the one that was run."""
    invoked = Path(sys.argv[0]).stem
    keep_freed_memory()  # one command, then exit: what it frees is reused, not unmapped
    cli(prog_name={"mergehub": "mergehub", "__main__": "python -m mergehub"}.get(invoked, "hub"))
