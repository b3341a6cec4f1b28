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
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
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
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def pickle_refusal(path: Path) -> InputError:
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
        side_files: other files kept with the model (config, tokenizer, index json, ...),
            relative to ``root``.
        adapter_config: the parsed ``adapter_config.json`` of a PEFT dir, else ``None``.
    """

    def __init__(self, path: Path, format: Format, root: Path, weight_files: list[str],
                 side_files: list[str], adapter_config: dict[str, Any] | None = None):
        self.path = path
        self.format: Format = format
        self.root = root
        self.side_files = side_files
        self.adapter_config = adapter_config
        self.headers: dict[str, SafetensorsHeader] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for rel in weight_files:
            header = read_header(root / rel)
            self.headers[rel] = header
            for name, entry in sorted(header.entries.items(), key=lambda kv: kv[1].begin):
                if name in self.tensors:
                    raise InputError(f"{root / rel}: tensor {name!r} is also in "
                                     f"{root / self.tensors[name].file}")
                self.tensors[name] = TensorInfo(entry.spec, rel, header.data_start + entry.begin,
                                                entry.nbytes)
        self._handles: dict[str, Any] = {}

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
        path = self.root / info.file
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
            handle = safe_open(str(self.root / info.file), framework="pt")
            self._handles[info.file] = handle
        return handle.get_tensor(name)

    def close(self) -> None:
        """Release the memory maps opened by :meth:`load`."""
        self._handles.clear()

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
    files = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    check_links(path, files)
    if ADAPTER_CONFIG in files:
        return _open_peft(path, files)
    indexes = [f for f in files if f.endswith(".safetensors.index.json")]
    singles = [f for f in files if f.endswith(".safetensors")]
    if len(indexes) > 1:
        raise InputError(f"{path}: several safetensors index files ({', '.join(indexes)}); "
                         "pass the one model's directory")
    if indexes:
        weights = _shards_from_index(path, indexes[0])
    elif len(singles) == 1:
        weights = singles
    elif len(singles) > 1:
        raise InputError(f"{path}: {len(singles)} .safetensors files but no "
                         "model.safetensors.index.json saying which tensors each holds")
    else:
        pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise pickle_refusal(path / pickles[0])
        raise InputError(f"{path}: no safetensors weights (model.safetensors or "
                         "model.safetensors.index.json) in this directory")
    ckpt = Checkpoint(path, "hf", path, weights, _side_files(files, weights))
    if indexes:
        _check_index(path / indexes[0], ckpt)
    return ckpt


def _side_files(files: list[str], weights: list[str]) -> list[str]:
    """Files kept beside the weights: everything but weights and pickles."""
    skip = set(weights)
    return [f for f in files if f not in skip and not f.lower().endswith(PICKLE_SUFFIXES)
            and not f.endswith(".bin.index.json")]


def _shards_from_index(root: Path, index_name: str) -> list[str]:
    index = read_json(root / index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{root / index_name}: no 'weight_map' object of tensor -> file")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if "/" in shard or shard.startswith("."):
            raise InputError(f"{root / index_name}: shard name {shard!r} is not a plain file name")
        if not (root / shard).is_file():
            raise InputError(f"{root / index_name}: lists shard {shard}, which is missing")
    return shards


def _check_index(index_path: Path, ckpt: Checkpoint) -> None:
    weight_map: dict[str, str] = read_json(index_path)["weight_map"]
    for name, info in ckpt.tensors.items():
        listed = weight_map.get(name)
        if listed != info.file:
            raise InputError(f"{index_path}: tensor {name!r} is in {info.file} but the index "
                             f"says {listed or 'nothing'}")
    missing = sorted(set(weight_map) - set(ckpt.tensors))
    if missing:
        raise InputError(f"{index_path}: tensor {missing[0]!r} is listed in the index but not "
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


def _open_peft(path: Path, files: list[str]) -> Checkpoint:
    config = check_adapter_config(read_json(path / ADAPTER_CONFIG), str(path / ADAPTER_CONFIG))
    if ADAPTER_WEIGHTS not in files:
        pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise pickle_refusal(path / pickles[0])
        raise InputError(f"{path}: PEFT adapter dir without {ADAPTER_WEIGHTS}")
    return Checkpoint(path, "peft", path, [ADAPTER_WEIGHTS], _side_files(files, [ADAPTER_WEIGHTS]),
                      adapter_config=config)


_PEFT_MODULE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?:lora_[A-Za-z_]+|ia3_l|hada_\w+|lokr_\w+|vera_lambda_\w+|oft_\w+|boft_\w+)(?:\.|$)")


def peft_target_weight(tensor_name: str) -> str | None:
    """The base-model weight a PEFT adapter tensor modifies, or ``None`` if it names no module.

    ``base_model.model.model.layers.0.q_proj.lora_A.weight`` -> ``model.layers.0.q_proj.weight``.
    """
    m = _PEFT_MODULE.match(tensor_name)
    return f"{m.group('module')}.weight" if m else None
