"""Open checkpoints without loading their tensors: HF model dirs, PEFT adapter dirs, files.

:func:`open_checkpoint` accepts

* an HF model dir: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
  (any ``*.safetensors.index.json`` / single ``*.safetensors`` works the same way);
* a PEFT adapter dir: ``adapter_config.json`` + ``adapter_model.safetensors``;
* a single ``.safetensors`` file.

Only headers are read on open; :meth:`Checkpoint.load` memory-maps one tensor at a time through
``safetensors``. Pickle checkpoints are refused: unpickling runs arbitrary code. So are files of
a model dir that are symlinks leading out of it (they would be stored and pushed as the model's
own; :func:`~mergehub.storage.paths.check_links`).

A model dir is kept whole (:func:`model_files`): besides the weights, every file at any depth is
a side file (``config.json``, tokenizer files, and the sub-folders of a sentence-transformers
model such as ``1_Pooling/config.json``), symlinks inside the folder read as the files they
lead to. Not kept, and listed in :attr:`Checkpoint.not_kept` with the reason: pickle files
(mergehub neither loads nor ships them) and tools' data: git's (``.git``, ``.gitattributes``,
``.gitignore``), the ``.cache`` that ``huggingface_hub`` downloads write, the ``mergehub``
folder of a pushed repo. Anything else it cannot hold (a device or socket file, a
broken or looping symlink, a file name with a backslash) is refused with one clear error.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from mergehub.errors import InputError, shown
from mergehub.safejson import read_json
from mergehub.storage import safetensors_format
from mergehub.storage.paths import check_links
from mergehub.storage.safetensors_format import (
    SafetensorsHeader, TensorSpec, read_header, read_range)

if TYPE_CHECKING:
    import torch

Format = Literal["hf", "peft", "safetensors"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: top-level folders of a model dir that hold tools' data, not the model's: not kept
TOOL_DIRS = {".git": "version control data", ".cache": "download tool data",
             "mergehub": "the data of a mergehub push (`hub pull` restores an entry from it)"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def pickle_refusal(path: str | Path) -> InputError:
    """The error for a pickle checkpoint: why it is refused and how to convert it."""
    return InputError(
        f"{path}: pickle checkpoint refused: loading .bin/.pt/.pth/.ckpt files unpickles them, "
        "which can run arbitrary code. Convert it once, where you trust it, to safetensors: "
        "for a transformers model `AutoModel.from_pretrained(DIR).save_pretrained(OUT)` (writes "
        "model.safetensors), for a plain state dict load it with torch.load and "
        "weights_only=True, then `safetensors.torch.save_file(state_dict, 'model.safetensors')`.")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its spec, the file (relative to the checkpoint) and byte range."""

    spec: TensorSpec
    file: str
    offset: int  # absolute offset of the first data byte in the file
    nbytes: int


class Checkpoint:
    """A safetensors checkpoint opened for streaming: names, shapes, dtypes, one tensor at a time.

    Attributes:
        path: the directory (or the single file) that was opened.
        format: ``"hf"``, ``"peft"`` or ``"safetensors"`` (a lone file).
        headers: parsed header of each weight file, keyed by its name relative to ``root``.
        tensors: every tensor by name, in file order.
        side_files: the other files kept with the model (config, tokenizer, index json,
            sub-folders, ...), relative POSIX paths under ``root``.
        not_kept: files and folders of a model dir that are not kept, by relative path
            (``/``-terminated for a folder), with the reason.
        adapter_config: the parsed ``adapter_config.json`` of a PEFT dir, else ``None``.
    """

    def __init__(self, path: Path, format: Format, root: Path, weight_files: list[str],
                 side_files: list[str], adapter_config: dict[str, Any] | None = None,
                 not_kept: dict[str, str] | None = None):
        self.path = path
        self.format: Format = format
        self.root = root
        self.side_files = side_files
        self.not_kept = not_kept or {}
        self.adapter_config = adapter_config
        self.headers: dict[str, SafetensorsHeader] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for rel in weight_files:
            header = self._read_header(rel)
            self.headers[rel] = header
            for name, entry in sorted(header.entries.items(), key=lambda kv: kv[1].begin):
                if name in self.tensors:
                    raise InputError(f"{root / rel}: tensor {name!r} is also in "
                                     f"{root / self.tensors[name].file}")
                self.tensors[name] = TensorInfo(entry.spec, rel, header.data_start + entry.begin,
                                                entry.nbytes)
        self._handles: dict[str, Any] = {}

    def _read_header(self, rel: str) -> SafetensorsHeader:
        """The parsed header of weight file ``rel``."""
        return read_header(self.root / rel)

    def local_file(self, rel: str) -> Path:
        """The path of file ``rel`` (relative to :attr:`root`) on this machine (a Hub input
        downloads it first)."""
        return self.root / rel

    def side_file(self, rel: str) -> bytes:
        """The content of side file ``rel`` (``config.json``, tokenizer files, ...)."""
        return self.local_file(rel).read_bytes()

    def specs(self) -> list[TensorSpec]:
        """Specs of all tensors, in file order."""
        return [t.spec for t in self.tensors.values()]

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"{self.path}: no tensor named {name!r}") from None

    def read_bytes(self, name: str, start: int = 0, stop: int | None = None,
                   into: memoryview | None = None) -> bytearray | memoryview:
        """The tensor's data exactly as stored in the file (no dtype conversion), or the byte
        range ``[start, stop)`` of it (read with ``pread``: no memory map stays behind); into
        the buffer ``into`` when given."""
        info = self._info(name)
        stop = info.nbytes if stop is None else stop
        path = self.local_file(info.file)
        try:
            with open(path, "rb") as f:
                return read_range(f, info.offset + start, stop - start, into)
        except OSError as e:
            raise InputError(f"{path}: cannot read tensor {name!r}: {e}") from e

    def sha256(self, name: str, chunk: int = 1 << 26) -> str:
        """sha256 of the tensor's bytes as stored, read ``chunk`` bytes at a time (a tensor of
        any size costs one chunk of memory)."""
        digest = hashlib.sha256()
        size = self._info(name).nbytes
        for start in range(0, size, chunk):
            digest.update(self.read_bytes(name, start, min(size, start + chunk)))
        return digest.hexdigest()

    def load(self, name: str) -> torch.Tensor:
        """Load one tensor (memory-mapped by safetensors, then materialized on the CPU)."""
        from safetensors import safe_open  # imports torch: only when tensors are loaded

        info = self._info(name)
        if info.spec.dtype not in safetensors_format.TORCH_DTYPE:
            raise InputError(f"{self.root / info.file}: tensor {name!r} has dtype "
                             f"{info.spec.dtype}, which torch cannot represent")
        handle = self._handles.get(info.file)
        if handle is None:
            handle = safe_open(str(self.local_file(info.file)), framework="pt")
            self._handles[info.file] = handle
        return handle.get_tensor(name)

    def close(self) -> None:
        """Release the memory maps opened by :meth:`load`."""
        self._handles.clear()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to a Ray task) without its open memory maps: they reopen on use."""
        return {**self.__dict__, "_handles": {}}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, tensors={len(self.tensors)})"


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open an HF model dir, a PEFT adapter dir or a ``.safetensors`` file (headers only).

    Raises :class:`InputError` with the path and the problem for anything else: a missing path,
    a pickle checkpoint, a directory without safetensors weights, a corrupt file, or an index
    json that disagrees with its shards.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise pickle_refusal(path)
        return Checkpoint(path, "safetensors", path.parent, [path.name], [])
    if not path.is_dir():
        raise InputError(f"{path}: not a regular file or directory")
    tree, not_kept = model_files(path)
    return open_listing(str(path), tree, not_kept, lambda name: read_json(path / name),
                        lambda fmt, weights, side, config: Checkpoint(
                            path, fmt, path, weights, side, config, not_kept))


#: makes the checkpoint of a listing: (format, weight files, side files, adapter config)
CheckpointMaker = Callable[[Format, list[str], list[str], "dict[str, Any] | None"], Checkpoint]


def open_listing(where: str, tree: list[str], not_kept: dict[str, str],
                 read: Callable[[str], Any], make: CheckpointMaker) -> Checkpoint:
    """The checkpoint that a model folder is, from its listing: ``tree``, the files it keeps
    at any depth, and ``not_kept`` (as :func:`model_files` returns them). A PEFT adapter dir
    or an HF model dir (one ``.safetensors`` file, or an index and its shards, at the top);
    every other kept file is a side file. Errors name ``where``. ``read(name)`` parses a JSON
    file of the folder; ``make`` opens the checkpoint. Shared by local folders and Hub repos
    (:mod:`mergehub.storage.hub_inputs`)."""
    files = [f for f in tree if "/" not in f]  # the weights are at the top
    pickles = [f for f in not_kept if "/" not in f and f.lower().endswith(PICKLE_SUFFIXES)]
    if ADAPTER_CONFIG in files:
        config = check_adapter_config(read(ADAPTER_CONFIG), f"{where}/{ADAPTER_CONFIG}")
        if ADAPTER_WEIGHTS not in files:
            if pickles:
                raise pickle_refusal(f"{where}/{pickles[0]}")
            raise InputError(f"{where}: PEFT adapter dir without {ADAPTER_WEIGHTS}")
        return make("peft", [ADAPTER_WEIGHTS], [f for f in tree if f != ADAPTER_WEIGHTS], config)
    indexes = [f for f in files if f.endswith(".safetensors.index.json")]
    singles = [f for f in files if f.endswith(".safetensors")]
    if len(indexes) > 1:
        raise InputError(f"{where}: several safetensors index files ({', '.join(indexes)}); "
                         "pass the one model's directory")
    weight_map = None
    if indexes:
        weight_map = _weight_map(f"{where}/{indexes[0]}", read(indexes[0]), files)
        weights = sorted(set(weight_map.values()))
    elif len(singles) == 1:
        weights = singles
    elif len(singles) > 1:
        raise InputError(f"{where}: {len(singles)} .safetensors files but no "
                         "model.safetensors.index.json saying which tensors each holds")
    else:
        if pickles:
            raise pickle_refusal(f"{where}/{pickles[0]}")
        raise InputError(f"{where}: no safetensors weights (model.safetensors or "
                         "model.safetensors.index.json) in this directory")
    ckpt = make("hf", weights, [f for f in tree if f not in weights], None)
    if weight_map is not None:
        _check_index(f"{where}/{indexes[0]}", weight_map, ckpt)
    return ckpt


#: suffixes of a model's weights in formats other than safetensors, besides pickles (ONNX,
#: TensorFlow, Flax, rust-bert, GGUF, TF Lite): kept by ``hub add`` as files, but not
#: downloaded by ``hub pull`` from a Hub repo nor carried into merge outputs
OTHER_WEIGHTS = (".onnx", ".onnx_data", ".h5", ".msgpack", ".ot", ".gguf", ".tflite")


def not_kept_reason(rel: str) -> str | None:
    """Why the file ``rel`` (a relative POSIX path) of a model dir is not kept, or ``None``
    when it is: it lies in one of :data:`TOOL_DIRS`, is git's configuration
    (``.gitattributes``, ``.gitignore``) or is a pickle."""
    top = rel.split("/", 1)[0]
    if "/" in rel and top in TOOL_DIRS:
        return TOOL_DIRS[top]
    if rel in (".gitattributes", ".gitignore"):
        return TOOL_DIRS[".git"]
    if rel.lower().endswith(PICKLE_SUFFIXES) or rel.endswith(".bin.index.json"):
        return "pickle: mergehub neither loads nor stores pickle files"
    return None


def split_listing(rels: list[str], reason: Callable[[str], str | None] = not_kept_reason
                  ) -> tuple[list[str], dict[str, str]]:
    """Split the files of a model folder listed by relative POSIX path (a Hub repo's files)
    as :func:`model_files` splits a local folder's: the sorted kept ones, and those
    ``reason`` gives a reason for, a tool folder of :data:`TOOL_DIRS` named once as ``NAME/``."""
    kept: list[str] = []
    not_kept: dict[str, str] = {}
    for rel in sorted(rels):
        why = reason(rel)
        if why is None:
            kept.append(rel)
        else:
            top = rel.split("/", 1)[0]
            not_kept[f"{top}/" if "/" in rel and top in TOOL_DIRS else rel] = why
    return kept, not_kept


def model_files(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Every file of the model dir ``folder`` at any depth, as sorted relative POSIX paths,
    and what is not kept (:func:`not_kept_reason`; a folder as ``NAME/``) with the reason.

    A symlink is read as what it leads to (a file, or a folder walked like any other) under
    its own name, once :func:`~mergehub.storage.paths.check_links` has found its target inside
    the folder. Raises :class:`InputError` for what cannot be kept: a file that is not a
    regular file (device, socket, pipe), a broken symlink, a symlink to a folder that contains
    it (a loop), a name with a backslash (not a portable path), an unreadable folder.
    """
    kept: list[str] = []
    not_kept: dict[str, str] = {}

    def walk(directory: Path, prefix: str, seen: tuple[Path, ...]) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            raise InputError(f"{directory}: cannot list: {e.strerror or e}") from e
        for entry in entries:
            rel, path = prefix + entry.name, Path(entry.path)
            if "\\" in entry.name:
                raise InputError(f"{path}: a file name with a backslash cannot be stored "
                                 "(it is no portable path); rename it")
            if not prefix and entry.name in TOOL_DIRS and entry.is_dir(follow_symlinks=False):
                not_kept[rel + "/"] = TOOL_DIRS[entry.name]
                continue
            if entry.is_symlink():
                check_links(folder, [rel])
                if not path.exists():
                    raise InputError(f"{path}: a broken symlink (to {os.readlink(path)})")
            if entry.is_dir():
                real = path.resolve()
                if real in seen:
                    raise InputError(f"{path}: a symlink to {real}, a folder that contains "
                                     "it: the folder would never end")
                walk(path, rel + "/", (*seen, real))
            elif entry.is_file():
                reason = not_kept_reason(rel)
                if reason:
                    not_kept[rel] = reason
                else:
                    kept.append(rel)
            else:
                raise InputError(f"{path}: not a regular file or folder (a device, socket or "
                                 "pipe): it cannot be stored")

    walk(folder, "", (folder.resolve(),))
    return sorted(kept), not_kept


def _weight_map(where: str, index: Any, files: list[str]) -> dict[str, str]:
    """The ``weight_map`` of a parsed index json, checked: every shard it names is a plain
    file name among ``files``."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{where}: no 'weight_map' object of tensor -> file")
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or shard.startswith("."):
            raise InputError(f"{where}: shard name {shard!r} is not a plain file name")
        if shard not in files:
            raise InputError(f"{where}: lists shard {shard}, which is missing")
    return weight_map


def _check_index(where: str, weight_map: dict[str, str], ckpt: Checkpoint) -> None:
    for name, info in ckpt.tensors.items():
        listed = weight_map.get(name)
        if listed != info.file:
            raise InputError(f"{where}: tensor {name!r} is in {info.file} but the index "
                             f"says {listed or 'nothing'}")
    missing = sorted(set(weight_map) - set(ckpt.tensors))
    if missing:
        raise InputError(f"{where}: tensor {missing[0]!r} is listed in the index but not "
                         f"in {weight_map[missing[0]]}")


def check_adapter_config(config: Any, where: str) -> dict[str, Any]:
    """``config`` (a parsed ``adapter_config.json``) after checking the values mergehub and
    peft compute with: ``r`` and ``rank_pattern`` ranks are integers >= 1, ``lora_alpha`` and
    ``alpha_pattern`` alphas finite numbers, pattern keys valid regular expressions, flags
    true/false. ``where`` names the file in the :class:`InputError` for a bad one."""
    if not isinstance(config, dict):
        raise InputError(f"{where}: not a JSON object")

    def rank(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    def alpha(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    checks = {"r": (rank, "an integer >= 1"), "lora_alpha": (alpha, "a finite number"),
              "peft_type": (lambda v: isinstance(v, str), "a string"),
              "base_model_name_or_path": (lambda v: v is None or isinstance(v, str),
                                          "a string or null")}
    checks.update({flag: (lambda v: v is None or isinstance(v, bool), "true or false")
                   for flag in ("use_rslora", "use_dora", "fan_in_fan_out")})
    for key, (ok, what) in checks.items():
        if key in config and not ok(config[key]):
            raise InputError(f"{where}: {key} must be {what}, not {shown(config[key])}")
    for key, (ok, what) in (("rank_pattern", (rank, "an integer >= 1")),
                            ("alpha_pattern", (alpha, "a finite number"))):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise InputError(f"{where}: {key} must map module patterns to values, not "
                             f"{shown(patterns)}")
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?{pattern}")
            except (re.error, RecursionError) as e:
                raise InputError(f"{where}: {key} key {shown(pattern)} is not a valid regular "
                                 f"expression ({e})") from None
            if not ok(value):
                raise InputError(f"{where}: {key}[{shown(pattern)}] must be {what}, not "
                                 f"{shown(value)}")
    return config


_PEFT_MODULE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?:lora_[A-Za-z_]+|ia3_l|hada_\w+|lokr_\w+|vera_lambda_\w+|oft_\w+|boft_\w+)(?:\.|$)")


def peft_target_weight(tensor_name: str) -> str | None:
    """The base-model weight a PEFT adapter tensor modifies, or ``None`` if it names no module.

    ``base_model.model.model.layers.0.q_proj.lora_A.weight`` -> ``model.layers.0.q_proj.weight``.
    """
    m = _PEFT_MODULE.match(tensor_name)
    return f"{m.group('module')}.weight" if m else None
