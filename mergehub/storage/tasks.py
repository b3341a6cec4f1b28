"""Exporting one task of a ``bundle`` entry: a store entry that keeps T task vectors with a
multi-model codec, one entry for all tasks (:mod:`mergehub.storage.codecs.multi`; the
``rmm`` codec's reversible merges).

The entry has the codec's manifest side file (``tasks``: the tasks' labels; ``base_model``:
the base, a reference as a recipe writes it, :func:`~mergehub.storage.references.open_reference`)
and, for each tensor ``X`` that some task changes, tensors ``X::KEY``: the codec's shared
tensors and its codes stacked by task. Task t's tensor is θ0 + ``decode(shared, code_t,
manifest)`` (the parsed side file as the parameters) in the base tensor's dtype; every other
tensor is the base's. The output is an HF model dir with the entry's other side files (the
base's config and tokenizer files the merge kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergehub.errors import StoreError, spelled
from mergehub.safejson import parse_json
from mergehub.storage.codecs.multi import MULTI, MultiCodec, bundle_task
from mergehub.storage.references import open_reference
from mergehub.storage.safetensors_format import TORCH_DTYPE, TensorSpec
from mergehub.storage.writer import write_model_dir

if TYPE_CHECKING:
    from mergehub.storage.reading import StoredModel
    from mergehub.storage.store import Store


def bundle_codec(entry: StoredModel) -> MultiCodec | None:
    """The multi-model codec whose ``bundle`` entry ``entry`` is (it has the codec's manifest),
    or ``None``."""
    return next((c for c in MULTI.values()
                 if c.layout == "bundle" and c.manifest in entry.side_files), None)


def export_task(store: Store, name: str, task: str | int, out: str | Path, *,
                overwrite: bool = False, progress: bool | None = None) -> Path:
    """Rebuild task ``task`` (its label, or index from 0) of the bundle entry ``name`` as an HF
    model dir at ``out``, atomically (see the module docstring): θ0 + the codec's
    ``decode(shared, code_t, manifest)`` for every tensor the entry has parts of, the base's
    tensor elsewhere."""
    entry = store.open(name)
    codec = bundle_codec(entry)
    if codec is None:
        kinds = [c for c in MULTI.values() if c.layout == "bundle"]
        raise StoreError(f"model {name!r} is not " + " or ".join(
            f"{c.made_by[0]} (no {c.manifest})" for c in kinds) + f"; "
            f"{spelled('revert', '--task')} only applies to "
            + " or ".join(c.made_by[1] for c in kinds) + " entries")
    manifest = parse_json(entry.side_file(codec.manifest), f"model {name!r}: {codec.manifest}")
    tasks = manifest["tasks"]
    if isinstance(task, str) and task.isdigit():
        task = int(task)
    index = task if isinstance(task, int) else tasks.index(task) if task in tasks else -1
    if not 0 <= index < len(tasks):
        raise StoreError(f"model {name!r} has no task {task!r}; its tasks are "
                         + ", ".join(f"{i}: {t!r}" for i, t in enumerate(tasks)))
    base = open_reference(manifest["base_model"], store, f"base of {name!r}")
    keys: dict[str, list[str]] = {}
    for spec in entry.specs():
        tensor, sep, key = spec.name.rpartition("::")
        if sep:
            keys.setdefault(tensor, []).append(key)

    def get(spec: TensorSpec) -> torch.Tensor:
        theta = base.load(spec.name)
        if spec.name not in keys:
            return theta
        parts = {key: entry.load(f"{spec.name}::{key}") for key in keys[spec.name]}
        shared, code = bundle_task(codec, parts, index)
        return (theta.float() + codec.decode(shared, code, manifest)).to(TORCH_DTYPE[spec.dtype])

    side = {p: entry.side_file(p) for p in entry.side_files if p != codec.manifest}
    return write_model_dir(out, base.specs(), get, side_files=side, overwrite=overwrite,
                           progress=progress)
