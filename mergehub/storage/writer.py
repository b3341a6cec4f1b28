"""Write HF model dirs: sharded safetensors plus ``model.safetensors.index.json``, streamed.

The tensor list is planned up front (names, dtypes, shapes), so each shard's header is written
before its data and every tensor is requested, written and dropped one at a time: peak memory
is one tensor, whatever the model size. (``safetensors.torch.save_file`` needs every tensor of a
file in memory at once, which is why the header is serialized here.) The layout follows
transformers' ``save_pretrained``: one ``model.safetensors`` when everything fits in one shard,
else ``model-0000i-of-0000n.safetensors`` with an index.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from mergehub.errors import InputError
from mergehub.progress import bar_disabled
from mergehub.storage.checkpoint import OTHER_WEIGHTS
from mergehub.storage.atomic import atomic_output_dir, start_writeback
from mergehub.storage.paths import inside
from mergehub.storage import safetensors_format
from mergehub.storage.safetensors_format import TensorSpec, build_header
from mergehub.units import parse_size

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
SHARD_METADATA = {"format": "pt"}
#: start writing a shard to disk every this many bytes, so the final fsync has little left
WRITEBACK_BYTES = 64 << 20

#: The config, generation config and tokenizer files of a model (a merge's
#: ``tokenizer_source`` gives the tokenizer ones).
MODEL_SIDE_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|"
    r"added_tokens\.json|vocab\..*|merges\.txt|.*\.model|chat_template\..*|"
    r"preprocessor_config\.json)$")
#: The index of a model's safetensors shards: a re-sharded copy writes its own.
WEIGHTS_INDEX = re.compile(r"^[^/]*\.safetensors\.index\.json$")
#: Files of a model that a merge output does not take over from its base, because they would
#: be wrong for the merge: the shards' index, the model card, the base's own training state and
#: results, and its weights in other formats (ONNX, TensorFlow, Flax, GGUF, ...). Every other
#: file is carried, at any depth (e.g. a sentence-transformers model's ``modules.json`` and
#: ``1_Pooling/config.json``).
NOT_CARRIED = re.compile(
    r"^([^/]*\.safetensors\.index\.json|README\.md|trainer_state\.json|training_args\.[^/]*|"
    r"(all|train|eval|test)_results\.json|metrics\.json)$"
    rf"|({'|'.join(map(re.escape, OTHER_WEIGHTS))})$")

def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split ``specs`` in order into shards of at most ``max_shard_size`` data bytes.

    A tensor larger than the limit gets a shard of its own, as in transformers.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def tensor_bytes(part: "torch.Tensor", spec: TensorSpec) -> memoryview:
    """The raw little-endian bytes of ``part``: the tensor of ``spec`` or a row chunk of it.

    The dtype must match; a full-size tensor must have the planned shape (the byte total of
    all chunks is checked by the writer).
    """
    import torch

    dtype = safetensors_format.SAFETENSORS_DTYPE.get(part.dtype)
    full = part.numel() == math.prod(spec.shape)
    if dtype != spec.dtype or (full and part.dim() == len(spec.shape)
                               and tuple(part.shape) != spec.shape):
        raise InputError(f"tensor {spec.name!r}: got {dtype} {tuple(part.shape)}, "
                         f"planned {spec.dtype} {spec.shape}")
    flat = part.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


TensorSource = Callable[[TensorSpec], Any]


def write_shard(path: Path, shard: list[TensorSpec], get: TensorSource,
                done: Callable[[TensorSpec], Any] | None = None) -> None:
    """Write one safetensors file holding ``shard``'s tensors, in order: its header first,
    then each tensor as ``get`` gives it (see :func:`write_model_dir`), one at a time;
    ``done(spec)`` is called after each tensor. Disk writeback is started every
    :data:`WRITEBACK_BYTES`, so the final fsync has little left."""
    with open(path, "wb") as f:
        f.write(build_header(shard, SHARD_METADATA))
        flushed = 0  # bytes handed to start_writeback so far
        for spec in shard:
            data = get(spec)
            single = isinstance(data, (bytes, bytearray, memoryview)) or hasattr(data, "dtype")
            written = 0
            for part in [data] if single else data:
                if hasattr(part, "dtype"):  # a torch tensor
                    part = tensor_bytes(part, spec)
                f.write(part)
                written += len(part)
            if written != spec.nbytes:
                raise InputError(f"tensor {spec.name!r}: got {written} bytes, "
                                 f"expected {spec.nbytes}")
            if done is not None:
                done(spec)
            if f.tell() - flushed >= WRITEBACK_BYTES:
                f.flush()
                start_writeback(f.fileno(), flushed, f.tell() - flushed)
                flushed = f.tell()


@contextmanager
def model_dir_layout(out: str | Path, specs: list[TensorSpec], *,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                     side_files: Mapping[str, bytes | Path] | None = None,
                     overwrite: bool = False, weights_name: str = "model.safetensors"
                     ) -> Iterator[list[tuple[Path, list[TensorSpec]]]]:
    """The shard files of an HF model dir to write at ``out``: yields (path, tensors) per
    shard, the paths inside a temp folder beside ``out``; once the caller has written them
    all (:func:`write_shard`, from this process or any other that sees the folder), writes
    the index and the side files and renames the folder into place
    (:func:`~mergehub.storage.atomic.atomic_output_dir`: on an exception, nothing appears).
    Arguments as :func:`write_model_dir`."""
    shards = plan_shards(specs, parse_size(max_shard_size))
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        stem = weights_name.removesuffix(".safetensors")
        names = ([weights_name] if len(shards) == 1 else
                 [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        yield [(tmp / name, shard) for name, shard in zip(names, shards)]
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                     "weight_map": {s.name: n for n, shard in zip(names, shards) for s in shard}}
            (tmp / f"{weights_name}.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name, content in (side_files or {}).items():
            dest = inside(tmp, name, f"{out}: a side file's name")
            if isinstance(content, Path):
                shutil.copyfile(content, dest)
            else:
                dest.write_bytes(content)


def write_model_dir(out: str | Path, specs: list[TensorSpec], get: TensorSource, *,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    side_files: Mapping[str, bytes | Path] | None = None,
                    overwrite: bool = False, progress: bool | None = None,
                    weights_name: str = "model.safetensors") -> Path:
    """Write an HF model dir at ``out`` atomically, streaming tensors one at a time.

    Args:
        out: the directory to create (must not exist or be empty unless ``overwrite``).
        specs: every tensor to write, in order.
        get: called once per spec, returns the tensor (or its raw bytes) to write, or an
            iterable of consecutive row chunks of it (tensors or bytes).
        max_shard_size: bytes per shard (``"2GB"`` style strings accepted).
        side_files: extra files by name (``config.json``, tokenizer files, ...), as bytes or a
            path to copy; see :func:`model_side_files`.
        overwrite: replace a non-empty ``out``.
        progress: a progress bar (bytes/s) on stderr: None (default) on a terminal only
            (:mod:`mergehub.progress`), True always, False never.
        weights_name: file name of a single shard (``adapter_model.safetensors`` for PEFT);
            several shards are named ``<stem>-0000i-of-0000n.safetensors`` with an index.
    """
    total = sum(s.nbytes for s in specs)
    with model_dir_layout(out, specs, max_shard_size=max_shard_size, side_files=side_files,
                          overwrite=overwrite, weights_name=weights_name) as files, \
            tqdm(total=total, unit="B", unit_scale=True, desc="write", disable=bar_disabled(progress),
                 leave=False) as bar:
        for path, shard in files:
            write_shard(path, shard, get, lambda spec: bar.update(spec.nbytes))
    return Path(out)


def model_side_files(source: str | Path) -> dict[str, Path]:
    """The config, generation config and tokenizer files of the model dir ``source``."""
    source = Path(source)
    if not source.is_dir():
        raise InputError(f"{source}: not a model directory to copy config/tokenizer files from")
    return {p.name: p for p in sorted(source.iterdir())
            if p.is_file() and MODEL_SIDE_FILES.match(p.name)}
