"""Model references as recipes and entries write them: a Hub repo, a store entry or a path,
opened as something whose tensors can be read (:func:`open_reference`).

One place decides what a reference means, so a merge's inputs (:mod:`mergehub.merge.inputs`)
and the base of a stored multi-task entry (``hub export NAME --task T``,
:mod:`mergehub.storage.tasks`) read the same model for the same words.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mergehub.errors import InputError, RemoteError, shown
from mergehub.storage.checkpoint import Checkpoint, open_checkpoint
from mergehub.storage.hub_inputs import HF_PREFIX, HubCheckpoint, hub_ref, open_hub_input
from mergehub.storage.store import names_entry

if TYPE_CHECKING:
    from mergehub.storage.reading import StoredModel
    from mergehub.storage.store import Store


def open_reference(ref: str, store: Store | None,
                   where: str) -> Checkpoint | HubCheckpoint | StoredModel:
    """The model ``ref`` names, headers read.

    ``ref`` is ``hf://org/name[@revision]`` (a Hub repo, :mod:`mergehub.storage.hub_inputs`),
    the name of a model in ``store`` (:func:`~mergehub.storage.store.names_entry`), a path (HF
    dir, PEFT dir, ``.safetensors`` file), or else ``org/name[@revision]`` on the Hub.
    ``where`` locates the reference (a recipe line) for error messages: an
    :class:`~mergehub.errors.InputError` when it names nothing, a
    :class:`~mergehub.errors.RemoteError` when the Hub repo it names cannot be read.
    """
    if ref.startswith(HF_PREFIX):
        return _hub(ref, where)
    if names_entry(ref, store):
        return store.open(ref)
    path = Path(ref).expanduser()
    try:
        exists = path.exists()
    except OSError as e:  # a name too long for the file system, ...
        raise InputError(f"{where}: input {shown(ref)}: {e.strerror}") from None
    if exists:
        return open_checkpoint(path)
    where_store = (f" nor a model in store {store.root}{store.did_you_mean(ref)}"
                   if store is not None else "")
    if hub_ref(ref):
        try:
            return _hub(ref, where)
        except RemoteError as e:
            raise InputError(f"{where}: input {ref!r} is neither a local path{where_store} nor "
                             f"a Hub repo ({e})") from None
    raise InputError(f"{where}: input {ref!r} is neither a local path{where_store} nor a Hub "
                     "repo (write org/name or hf://org/name[@revision])")


def _hub(ref: str, where: str) -> HubCheckpoint:
    """The Hub repo ``ref`` names, headers read; its errors name ``where`` when ``ref`` says
    ``hf://``."""
    try:
        return open_hub_input(ref, where)
    except RemoteError as e:
        if ref.startswith(HF_PREFIX):
            raise RemoteError(f"{where}: input {ref!r}: {e}") from None
        raise
