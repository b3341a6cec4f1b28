"""User-facing errors.

Every problem caused by the user's input (a bad path, an unknown model name, a corrupt file)
raises a :class:`MergehubError` subclass whose message is one line naming the file, tensor or
model and the problem. The ``hub`` CLI prints that line and exits with status 2; anything else
is a bug and keeps its traceback.

A message that tells the user what to pass names the option as the caller spells it
(:func:`spelled`): ``missing="take-base"`` from Python, ``--missing take-base`` under the CLI.
"""

from __future__ import annotations

import contextlib
import difflib
import reprlib
from collections.abc import Iterator
from typing import Any


class MergehubError(Exception):
    """Base class of errors caused by bad input; the message is shown to the user as is."""


class InputError(MergehubError):
    """An input checkpoint is missing, unreadable, not safetensors, or pickle-based."""


class StoreError(MergehubError):
    """A store operation cannot proceed (no store, unknown or duplicate name, in use)."""


class CatalogDamagedError(StoreError):
    """A store's catalog or marker is missing, empty or unreadable although the store is there:
    ``hub verify --repair`` rebuilds it from the store's entry records."""


class BaseMismatchError(MergehubError):
    """A fine-tune or adapter does not fit the base model it is added against."""


class IntegrityError(MergehubError):
    """Stored bytes do not match their checksum, or a referenced blob is missing."""


class RemoteError(MergehubError):
    """A Hub repository, revision or file cannot be read or written (not found, no permission,
    unreachable endpoint)."""


class _BoundedRepr(reprlib.Repr):
    """``reprlib.Repr`` that also abbreviates dict and list subclasses (parsed YAML mappings)
    instead of falling back to their full ``repr``."""

    def repr1(self, x: Any, level: int) -> str:
        if isinstance(x, dict) and type(x) is not dict:
            return self.repr_dict(dict(x), level)
        if isinstance(x, list) and type(x) is not list:
            return self.repr_list(list(x), level)
        return super().repr1(x, level)

    def repr_int(self, x: int, level: int) -> str:
        # repr of an int of over 4300 digits raises; one of 60 is already unreadable
        return f"<an integer of {x.bit_length()} bits>" if x.bit_length() > 200 else repr(x)


_REPR = _BoundedRepr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple = 3, 4, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def shown(value: Any, limit: int = 80) -> str:
    """A value as an error message shows it: its ``repr``, abbreviated to at most ``limit``
    characters however large the value (a YAML alias bomb or a 100 MB string stays one short
    line, and formatting it looks at a bounded part of it)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_cli_spelling = False


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Inside the block, :func:`spelled` names options as the ``hub`` command line spells them
    (the CLI runs every command in one)."""
    global _cli_spelling
    before, _cli_spelling = _cli_spelling, True
    try:
        yield
    finally:
        _cli_spelling = before


def spelled(python: str, cli: str) -> str:
    """An option as the caller spells it, for error messages: ``python`` (``overwrite=True``)
    from the Python API, ``cli`` (``--overwrite``) inside :func:`cli_spelling`."""
    return cli if _cli_spelling else python


def did_you_mean(word: object, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string (also for anything
    but a short string: difflib's time grows with the product of the lengths)."""
    if not isinstance(word, str) or len(word) > 100:
        return ""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
