"""What the ``hub`` commands share: progress bars and notes as ``--quiet`` says, the store
``--store`` names, JSON option values and an entry's one-line summary."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mergehub.errors import InputError
from mergehub.safejson import parse_json
from mergehub.storage.store import ModelInfo, Store
from mergehub.units import human_bytes


def progress_bars() -> bool:
    """Progress bars: on a terminal only, and never with ``--quiet``."""
    return sys.stderr.isatty() and not click.get_current_context().obj.get("quiet")


def note(text: str) -> None:
    """A note on stderr (what a merge or a training run reports on the way), unless ``--quiet``."""
    if not click.get_current_context().obj.get("quiet"):
        click.echo(text, err=True)


class HelpFrom(click.Option):
    """An option whose help text ``help_from()`` makes each time it is read, so that it can be
    built from registries (the codecs) that import torch, which starting the CLI does not."""

    def __init__(self, *args: Any, help_from: Callable[[], str], **kwargs: Any) -> None:
        self.help_from = help_from
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def help(self) -> str:
        return self.help_from()

    @help.setter
    def help(self, value: str | None) -> None:
        """click's constructor sets ``help``; the text is ``help_from()``'s."""


def open_store(ctx: click.Context, create: bool = False) -> Store:
    return Store(ctx.obj["store"], create=create)


def json_arg(value: str | None, option: str) -> dict[str, Any] | None:
    """Parse a JSON object given inline or as ``@FILE`` / a path to a JSON file."""
    if value is None:
        return None
    text = value
    if value.startswith("@") or Path(value).is_file():
        path = Path(value.removeprefix("@"))
        try:
            text = path.read_text()
        except OSError as e:
            raise click.BadParameter(f"{path}: {e.strerror or e}", param_hint=option) from e
    try:
        obj = parse_json(text, "value")
    except InputError as e:
        raise click.BadParameter(str(e), param_hint=option) from None
    if not isinstance(obj, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return obj


def not_both(ctx: click.Context, param: str, other: Any, other_hint: str, hint: str) -> None:
    """Refuse an option given under both of its spellings (a positional OUT and ``-o``;
    mergekit's ``--out-shard-size`` and ``--max-shard-size``)."""
    if other is not None and (ctx.get_parameter_source(param)
                              == click.core.ParameterSource.COMMANDLINE):
        raise click.BadParameter(f"given twice, as {other_hint} and as {hint}: give one",
                                 param_hint=hint)


def summary(info: ModelInfo) -> str:
    of = f" of {info.base!r}" if info.base else ""
    return (f"{info.name!r} ({info.kind}{of}): {info.tensors} tensors, "
            f"{human_bytes(info.logical_bytes)} logical, {human_bytes(info.stored_bytes)} stored "
            f"({info.saving:.1%} saved)")
