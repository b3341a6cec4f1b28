"""User-facing errors.

Every problem caused by the user's input (a bad path, an unknown model name, a corrupt file)
raises a :class:`MergehubError` subclass whose message is one line naming the file, tensor or
model and the problem. The ``hub`` CLI prints that line and exits with status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class MergehubError(Exception):
    """Base class of errors caused by bad input; the message is shown to the user as is."""


class InputError(MergehubError):
    """An input checkpoint is missing, unreadable, not safetensors, or pickle-based."""


class StoreError(MergehubError):
    """A store operation cannot proceed (no store, unknown or duplicate name, in use)."""


class BaseMismatchError(MergehubError):
    """A fine-tune or adapter does not fit the base model it is added against."""


class IntegrityError(MergehubError):
    """Stored bytes do not match their checksum, or a referenced blob is missing."""


class RemoteError(MergehubError):
    """A Hub repository, revision or file cannot be read or written (not found, no permission,
    unreachable endpoint)."""
