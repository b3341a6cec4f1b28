"""Merge inputs: HF model dirs, ``.safetensors`` files, store entries and PEFT LoRA adapters.

Every input is read one tensor at a time, in row ranges (see :func:`matrix_shape`), so a merge
holds a few chunks in memory rather than whole tensors (a store entry's tensor is decoded whole
once, up to :data:`STREAM_BYTES`, and a larger one a chunk at a time). A dense input gives
fine-tuned weights θt; a LoRA adapter gives its task vector directly, ``τ = B·A·scaling`` per target module (scaling =
``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA; ``alpha_pattern`` honoured), and
``θ = θ0 + τ``, so every method can ask any input for either. All values come back as float32
on the requested device (merge arithmetic is always float32).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mergehub.errors import BaseMismatchError, InputError
from mergehub.safejson import parse_json, read_json
from mergehub.storage.checkpoint import (
    ADAPTER_CONFIG, Checkpoint, check_adapter_config, peft_target_weight)
from mergehub.storage.hub_inputs import HubCheckpoint
from mergehub.storage.references import open_reference
from mergehub.storage.safetensors_format import TORCH_DTYPE, TensorSpec
from mergehub.storage.store import Store, StoredModel

#: a store input's tensor of more bytes than this (a large embedding) is decoded in order a
#: chunk at a time for each pass over its rows, rather than whole once and sliced: memory holds
#: a few chunks of it instead of all of it, at the price of decoding it again for each pass
#: (a method's statistics pass, then the merge)
STREAM_BYTES = 256 << 20



class _Held(threading.local):
    """What one thread's reads of a :class:`Source` keep between calls: a merge's threads
    (:meth:`~mergehub.merge.tensors.TensorMerger.map_tensors`) read different tensors of the
    same input at once, each through its own."""

    #: the last store tensor decoded whole: (name, device, flat tensor)
    cached: tuple[str, torch.device, torch.Tensor] | None = None
    #: a larger store tensor being decoded: (name, offset of ``buffer``, pieces, buffer)
    stream: tuple[str, int, Iterator[Any], bytearray] | None = None
    #: the last LoRA target's factors: (name, device, A, scaling·B)
    factors: tuple[str, torch.device, torch.Tensor, torch.Tensor] | None = None


class TensorReader(Protocol):
    """What :class:`~mergehub.storage.checkpoint.Checkpoint` and stored models both offer."""

    def specs(self) -> list[TensorSpec]: ...

    def load(self, name: str) -> torch.Tensor: ...


def matrix_shape(spec: TensorSpec) -> tuple[int, int]:
    """(rows, columns) of a tensor seen as a row-major matrix: the unit of chunked reading."""
    rows = spec.shape[0] if spec.shape else 1
    return rows, (math.prod(spec.shape) // rows if rows else 0)


@dataclass
class Source:
    """One resolved merge input, read in row ranges.

    Attributes:
        label: the input as the recipe names it (used in every message).
        reader: where its tensors come from.
        metrics: metrics from the store, or a JSON / ``trainer_state.json`` beside it.
        lora: for a LoRA adapter, target weight name -> (A name, B name, scaling, transpose).
        lora_config: its ``adapter_config.json``.
    """

    label: str
    reader: TensorReader
    metrics: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, tuple[str, str, float, bool]] | None = None
    lora_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.specs = {s.name: s for s in self.reader.specs()}
        self._held = _Held()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to a Ray task) without what its reads keep (:class:`_Held`)."""
        return {k: v for k, v in self.__dict__.items() if k != "_held"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _held=_Held())

    def release(self) -> None:
        """Drop what this thread's reads keep (:class:`_Held`): a merge calls it when a tensor
        is done, so that each of its threads does not hold every input's last decoded tensor
        until its next one."""
        self._held.__dict__.clear()

    @property
    def is_lora(self) -> bool:
        return self.lora is not None

    def in_order(self, name: str) -> bool:
        """Whether :meth:`rows` decodes tensor ``name`` a chunk at a time in order (a store
        entry's tensor above :data:`STREAM_BYTES`): each read out of order starts it over."""
        spec = self.specs.get(name)
        return (self.lora is None and isinstance(self.reader, StoredModel) and spec is not None
                and spec.nbytes > STREAM_BYTES)

    def rows(self, name: str, r0: int, r1: int, device: torch.device) -> torch.Tensor:
        """Rows [r0, r1) of a dense input's tensor as float32, shape (r1 - r0, columns).

        A file is read with ``pread`` for just those rows; any other reader (a store entry) is
        asked once per tensor for the whole tensor on ``device`` (a lossy blob is decoded there,
        as for :meth:`raw`), which is then sliced; a store entry's tensor above
        :data:`STREAM_BYTES` is decoded in order a chunk at a time instead
        (:meth:`_stored_range`).
        """
        spec = self.specs[name]
        rows, cols = matrix_shape(spec)
        dtype = TORCH_DTYPE[spec.dtype]
        width = spec.nbytes // max(1, rows * cols) if rows * cols else 0
        if isinstance(self.reader, Checkpoint) or (isinstance(self.reader, StoredModel)
                                                   and spec.nbytes > STREAM_BYTES):
            start, stop = r0 * cols * width, r1 * cols * width
            raw = (self.reader.read_bytes(name, start, stop) if isinstance(self.reader, Checkpoint)
                   else self._stored_range(name, start, stop, spec.nbytes))
            part = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        else:
            held = self._held
            if held.cached is None or held.cached[:2] != (name, device):
                held.cached = (name, device, self.reader.load(name, device=device).reshape(-1))
            part = held.cached[2][r0 * cols:r1 * cols]
        # move the stored dtype (half the bytes of float32 for bf16), then widen on the device
        return part.reshape(r1 - r0, cols).to(device).to(torch.float32)

    def _stored_range(self, name: str, start: int, stop: int, total: int) -> bytearray:
        """Bytes [start, stop) of a store input's ``total``-byte tensor, from its decoded
        pieces (:meth:`StoredModel.iter_bytes`): a range that starts where the last one ended
        takes the next pieces, any other starts the tensor over. The range that ends the
        tensor runs the pieces to their end, where the decoded bytes' sha256 is checked (a
        mismatch raises there, before the merge's output is complete)."""
        held = self._held
        if held.stream is None or held.stream[0] != name or held.stream[1] != start:
            held.stream = (name, 0, iter(self.reader.iter_bytes(name)), bytearray())
        _, pos, pieces, buf = held.stream
        while pos + len(buf) < stop:
            buf += next(pieces)
            if pos + len(buf) <= start:  # before the range: not kept
                pos += len(buf)
                buf.clear()
        out = buf[start - pos:stop - pos]
        del buf[:stop - pos]
        held.stream = (name, stop, pieces, buf)
        if stop == total:
            for _ in pieces:  # the end: the checksum
                pass
            held.stream = None
        return out

    def raw(self, name: str, device: torch.device) -> torch.Tensor:
        """A dense input's whole tensor in its stored dtype and shape, for the fused path on
        ``device`` (half the bytes of float32 for bf16). A file's bytes are read into CPU
        memory, page-locked when ``device`` is a GPU (it then copies there at full speed and
        asynchronously); a store entry is decoded on ``device`` where its codec allows."""
        spec = self.specs[name]
        if isinstance(self.reader, Checkpoint):
            out = torch.empty(spec.shape, dtype=TORCH_DTYPE[spec.dtype],
                              pin_memory=device.type == "cuda")
            if spec.nbytes:
                self.reader.read_bytes(name, into=memoryview(out.reshape(-1).view(torch.uint8)
                                                             .numpy()))
            return out
        return self.reader.load(name, device=device)

    def theta(self, name: str, base: torch.Tensor | None, device: torch.device,
              r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """The input's weights (rows [r0, r1), default all) as float32 (base + τ for a LoRA);
        ``base`` is the base's same rows."""
        if self.lora is None:
            r1 = matrix_shape(self.specs[name])[0] if r1 is None else r1
            return self.rows(name, r0, r1, device)
        if base is None:
            raise InputError(f"{self.label}: a LoRA adapter needs a base_model to merge into")
        return base + self.tau(name, base, device, r0, r1)

    def tau(self, name: str, base: torch.Tensor | None, device: torch.device,
            r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """The task vector θt − θ0 (rows [r0, r1)) as float32; zeros where a LoRA has no
        module. ``base`` is the base's same rows."""
        if self.lora is None:
            if base is None:
                raise InputError(f"{self.label}: task vectors need a base_model")
            return self.theta(name, None, device, r0, r1) - base
        entry = self.lora.get(name)
        if entry is None:
            if base is None:
                raise InputError(f"{self.label}: a LoRA adapter needs a base_model to merge into")
            return torch.zeros_like(base)
        transpose = entry[3]
        a, b = self._lora_factors(name, device)
        rows = a.shape[1] if transpose else b.shape[0]
        r1 = rows if r1 is None else r1
        delta = (b @ a[:, r0:r1]).T if transpose else b[r0:r1] @ a
        if base is not None and delta.shape != base.shape:
            raise BaseMismatchError(f"{self.label}: LoRA for {name!r} gives a {list(delta.shape)} "
                                    f"delta but the base tensor is {list(base.shape)}")
        return delta


    def _lora_factors(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA's A and scaling·B for target ``name`` as float32 on ``device`` (cached for the
        last tensor asked for)."""
        a_name, b_name, scaling, _ = self.lora[name]
        held = self._held
        if held.factors is None or held.factors[:2] != (name, device):
            a = self.reader.load(a_name).to(device=device, dtype=torch.float32)
            b = self.reader.load(b_name).to(device=device, dtype=torch.float32) * scaling
            held.factors = (name, device, a, b)
        return held.factors[2], held.factors[3]

    def factors(self, name: str, shape: tuple[int, int],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA input's task vector for the base's tensor ``name`` (a matrix of ``shape``) as
        factors (left, right) with left @ right = τ in the weight's orientation:
        (scaling·B, A), or (Aᵀ, scaling·Bᵀ) for a transposed (embedding) LoRA; zero-rank
        factors where the adapter has no module for ``name``. Only for LoRA inputs."""
        entry = self.lora.get(name)
        if entry is None:
            return (torch.zeros((shape[0], 0), device=device),
                    torch.zeros((0, shape[1]), device=device))
        a, b = self._lora_factors(name, device)
        return (a.T, b.T) if entry[3] else (b, a)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module name suffix."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def lora_targets(label: str, config: dict[str, Any],
                 specs: dict[str, TensorSpec]) -> dict[str, tuple[str, str, float, bool]]:
    """Map each base weight a LoRA adapter modifies to (A name, B name, scaling, transpose).

    The rank of each module is read off its A matrix (so ``rank_pattern`` needs no parsing);
    alpha comes from ``alpha_pattern`` or ``lora_alpha``. Embedding LoRAs (``lora_embedding_A``
    of shape (r, vocab), ``lora_embedding_B`` of (dim, r)) give ``(B @ A).T``, as in peft.
    """
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{label}: peft_type {peft_type} cannot be turned into dense deltas "
                         "(only LoRA, including rsLoRA, can)")
    if config.get("use_dora"):
        raise InputError(f"{label}: DoRA adapters rescale the whole weight and are not a plain "
                         "delta; merge them after peft's merge_and_unload instead")
    by_target: dict[str, dict[str, str]] = {}
    for name in specs:
        target = peft_target_weight(name)
        m = re.search(r"\.lora_(embedding_)?(A|B)(\.[^.]+)?(\.weight)?$", name)
        if target is None or m is None:
            raise InputError(f"{label}: adapter tensor {name!r} is not a LoRA A/B matrix "
                             "(modules_to_save and other extras cannot be merged as deltas)")
        by_target.setdefault(target, {})[m.group(2)] = name
    out = {}
    for target, parts in sorted(by_target.items()):
        if set(parts) != {"A", "B"}:
            missing = "A" if "A" not in parts else "B"
            raise InputError(f"{label}: {target!r} has no lora_{missing} matrix")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, target.removesuffix(".weight"),
                               config.get("lora_alpha", 8))
        a_shape, b_shape = specs[parts["A"]].shape, specs[parts["B"]].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] < 1 or b_shape[1] != a_shape[0]:
            raise InputError(f"{label}: {parts['A']!r} {list(a_shape)} and {parts['B']!r} "
                             f"{list(b_shape)} are not LoRA factors of one rank >= 1")
        r = a_shape[0]
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        embedding = "lora_embedding_" in parts["A"]
        out[target] = (parts["A"], parts["B"], scaling,
                       embedding != bool(config.get("fan_in_fan_out")))
    return out


def _side_metrics(read: Callable[[str], Any]) -> dict[str, Any]:
    """Metrics kept beside a checkpoint: ``metrics.json``, ``all_results.json`` or the last
    ``log_history`` entry with a loss in ``trainer_state.json`` (plus its ``global_step``).
    ``read(name)`` parses the JSON file ``name`` beside it, ``None`` when there is none."""
    for name in ("metrics.json", "all_results.json", "eval_results.json"):
        data = read(name)
        if isinstance(data, dict):
            return data
    state = read("trainer_state.json")
    if state is not None:
        history = state.get("log_history") if isinstance(state, dict) else None
        if not isinstance(history, list):
            return {}
        metrics: dict[str, Any] = {"step": state.get("global_step")}
        for entry in history:
            for key in ("eval_loss", "loss"):
                if isinstance(entry, dict) and key in entry:
                    metrics[key] = entry[key]
        return metrics
    return {}


def _checkpoint_source(ref: str, ckpt: Checkpoint, read: Callable[[str], Any]) -> Source:
    """A local or Hub checkpoint as a :class:`Source` (``read`` as :func:`_side_metrics`)."""
    lora = None
    if ckpt.format == "peft":
        lora = lora_targets(ref, ckpt.adapter_config or {}, {s.name: s for s in ckpt.specs()})
    return Source(ref, ckpt, _side_metrics(read), lora, ckpt.adapter_config or {})


def resolve_input(ref: str, store: Store | None, where: str) -> Source:
    """Turn a recipe's model reference into a :class:`Source`.

    ``ref`` is ``hf://org/name[@revision]`` (a Hub repo), the name of a model in ``store``, a
    path (HF dir, PEFT dir, ``.safetensors`` file), or else ``org/name[@revision]`` on the Hub
    (:func:`~mergehub.storage.references.open_reference` says which). ``where`` locates the
    reference in the recipe for error messages.
    """
    model = open_reference(ref, store, where)
    if isinstance(model, StoredModel):
        lora, config = None, {}
        if model.info.format == "peft":
            config_file = f"model {ref!r}: {ADAPTER_CONFIG}"
            config = check_adapter_config(parse_json(model.side_file(ADAPTER_CONFIG),
                                                     config_file), config_file)
            lora = lora_targets(ref, config, {s.name: s for s in model.specs()})
        return Source(ref, model, dict(model.info.metrics), lora, config)
    if isinstance(model, HubCheckpoint):
        return _checkpoint_source(ref, model, lambda name: parse_json(
            model.side_file(name), f"{ref}: {name}") if name in model.side_files else None)
    path = Path(ref).expanduser()
    root = path if path.is_dir() else path.parent
    return _checkpoint_source(ref, model, lambda name: read_json(
        root / name) if (root / name).is_file() else None)
