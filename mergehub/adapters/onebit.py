"""1-bit adapters (Jie et al. 2023, "Revisiting the parameter efficiency of adapters from the
perspective of precision redundancy").

The adapter here is a peft LoRA (any ``peft:`` LoRA options). During training the forward pass
uses, per group (``group: row``: each output channel, i.e. each row of A and of B; or
``group: matrix``)::

    Wq = α · sign(W − μ) + μ,   μ = mean(W) (``mean: true``; 0 with ``mean: false``),
    α = mean|W − μ|             (the L2-optimal scale for a fixed sign code)

with sign(0) = +1, and the backward pass hands the gradient to the latent full-precision W
unchanged (straight-through estimator). This is our reading of the paper: sign
code per channel with the mean-absolute scale, optional mean offset, STE. It departs from the
authors' adapters in using LoRA factors rather than their bottleneck adapters.

**Storage.** The adapter dir written at the end is a standard peft dir whose tensors are the
quantized Wq (exactly two values per group, so peft, ``hub merge`` and ``hub export`` read it
as any LoRA), plus ``adapter_model.1bit.safetensors``: per tensor the payload of mergehub's
``bit1`` codec (α per group as float32, then the sign bits packed 8 per byte; encoded against
the reference μ, so the codec's per-row mean-absolute scale is exactly α) and μ per group:
about 1 bit per weight. :func:`unpack` rebuilds Wq from it, bit for bit in float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from mergehub.errors import InputError

PACKED_FILE = "adapter_model.1bit.safetensors"


def _groups(w: torch.Tensor, group: str) -> torch.Tensor:
    """``w`` as (groups, elements per group)."""
    if group not in ("row", "matrix"):
        raise InputError(f"onebit group must be 'row' or 'matrix', not {group!r}")
    return w.reshape(w.shape[0] if group == "row" and w.dim() >= 2 else 1, -1)


def _offset(g: torch.Tensor, mean: bool) -> torch.Tensor:
    """μ per group of ``g`` (groups, elements), as a column: the mean, or 0 without ``mean``."""
    return g.mean(dim=1, keepdim=True) if mean else torch.zeros_like(g[:, :1])


def quantize(w: torch.Tensor, group: str = "row", mean: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Wq, α, μ): the 1-bit code of ``w`` per group (α and μ have one entry per group)."""
    g = _groups(w, group)
    mu = _offset(g, mean)
    d = g - mu
    alpha = d.abs().mean(dim=1, keepdim=True)
    wq = torch.where(d >= 0, alpha, -alpha) + mu
    return wq.reshape(w.shape), alpha.reshape(-1), mu.reshape(-1)


class SignQuant(torch.nn.Module):
    """Parametrization: forward with the 1-bit code, gradient straight through to W."""

    def __init__(self, group: str, mean: bool):
        super().__init__()
        self.group, self.mean = group, mean

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wq = quantize(w, self.group, self.mean)[0]
        return w + (wq - w).detach()


def attach(model: torch.nn.Module, group: str, mean: bool) -> int:
    """Quantize every LoRA A/B weight of a peft model in its forward pass; how many."""
    from mergehub.adapters.lora import lora_layers

    count = 0
    for layer in lora_layers(model).values():
        for part in (layer.lora_A, layer.lora_B):
            for lin in part.values():
                parametrize.register_parametrization(lin, "weight", SignQuant(group, mean))
                count += 1
    if not count:
        raise InputError("onebit: the peft config targets no module of this model")
    return count


def detach(model: torch.nn.Module) -> None:
    """Replace every quantized weight by its 1-bit value (Wq), ready for ``save_pretrained``."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, SignQuant) for p in module.parametrizations.weight):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def pack(tensors: dict[str, torch.Tensor], group: str, mean: bool) -> dict[str, torch.Tensor]:
    """The packed form of quantized adapter tensors: per name the ``bit1`` payload (uint8)
    and μ per group (float32)."""
    from mergehub.storage.codecs import LOSSY

    out = {}
    for name, w in tensors.items():
        g = _groups(w.float(), group)
        mu = _offset(g, mean)
        _, payload = LOSSY["bit1"].encode(g, mu.expand_as(g), {"granularity": "row"})
        out[f"{name}.bit1"] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        out[f"{name}.mu"] = mu.reshape(-1).contiguous()
    return out


def write_packed(adapter_dir: Path, tensors: dict[str, torch.Tensor], group: str,
                 mean: bool) -> None:
    """Write :data:`PACKED_FILE` beside a saved adapter (shapes and options in its metadata)."""
    from safetensors.torch import save_file

    meta = {"format": "mergehub-onebit-1", "group": group, "mean": json.dumps(mean),
            "shapes": json.dumps({n: list(t.shape) for n, t in tensors.items()})}
    save_file(pack(tensors, group, mean), str(adapter_dir / PACKED_FILE), metadata=meta)


def unpack(path: Path) -> dict[str, torch.Tensor]:
    """The float32 Wq of every tensor of a packed file (what the adapter was trained with)."""
    from safetensors import safe_open

    from mergehub.storage.codecs import LOSSY

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if not meta or meta.get("format") != "mergehub-onebit-1":
            raise InputError(f"{path}: not a mergehub 1-bit adapter file")
        out = {}
        for name, shape in json.loads(meta["shapes"]).items():
            mu = f.get_tensor(f"{name}.mu")
            rows = mu.numel()
            params = {"rows": rows, "shape": [rows, math.prod(shape) // rows]}
            payload = memoryview(f.get_tensor(f"{name}.bit1").numpy().tobytes())
            base = mu[:, None].expand(rows, params["shape"][1])
            out[name] = LOSSY["bit1"].decode(payload, params, base).reshape(shape)
    return out
