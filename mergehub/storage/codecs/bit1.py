"""``bit1``: one sign bit per weight plus a scale (BitDelta, Liu et al. 2024).

τ ≈ s·sign(τ) with s = mean|τ| over the whole matrix (``granularity: matrix``, the default and
BitDelta's: one scale per weight matrix, initialised to mean|τ|) or over each row
(``granularity: row``, a mergehub option): for a fixed sign pattern, mean|τ| is the scale that
minimizes the L2 error. Entries with τ = 0 get +s, as in BitDelta's code. Stored: the scales
(float32) and the packed sign bits: about 1 bit per weight, 16x smaller than a bf16 delta.

Which tensors are sign-coded (``scope``): ``bitdelta`` (the default) takes BitDelta's selection,
the weight of every projection module (a module whose name contains ``proj``) inside an
attention or MLP block (a parent module path containing ``self_attn`` or ``mlp``): q/k/v/o and
gate/up/down in a Llama. Embeddings, the LM head, norms and biases keep their lossless blobs,
as BitDelta keeps them exact. That rule names Llama's modules and selects nothing in other
architectures; ``linear`` (a mergehub option) selects the same kind of weights by shape and
place instead, every 2-D ``weight`` inside a numbered block of the model (``layers.3.``,
``layer.3.``, ``h.3.``): a Llama's projections as ``bitdelta`` does, a BERT encoder's query, key,
value and dense layers. ``all`` sign-codes every changed float tensor (norms and biases
included, which a sign code with one scale per row approximates badly).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mergehub.kernels import SignDelta, apply_deltas
from mergehub.kernels.deltas import matrix_shape
from mergehub.storage.codecs import LossyCodec, register

GRANULARITIES, SCOPES = ("matrix", "row"), ("bitdelta", "linear", "all")


def in_bitdelta_scope(name: str) -> bool:
    """Whether BitDelta compresses tensor ``name``: the ``weight`` of a child module whose name
    contains ``proj`` of a module whose path contains ``mlp`` or ``self_attn``."""
    parts = name.split(".")
    if len(parts) < 3 or parts[-1] != "weight" or "proj" not in parts[-2]:
        return False
    parent = ".".join(parts[:-2])
    return "mlp" in parent or "self_attn" in parent


def in_block_linear(name: str, shape: tuple[int, ...]) -> bool:
    """Whether ``name`` is a 2-D ``weight`` inside a numbered block (a path component that is
    an integer, as ``encoder.layer.3.attention.self.query.weight``): scope ``linear``."""
    parts = name.split(".")
    return len(shape) == 2 and parts[-1] == "weight" and any(p.isdigit() for p in parts[:-2])


def applies(name: str, shape: tuple[int, ...], params: dict[str, Any]) -> bool:
    """The tensors ``scope`` selects (see the module docstring)."""
    if params["scope"] == "linear":
        return in_block_linear(name, shape)
    return params["scope"] == "all" or in_bitdelta_scope(name)


def check(params: dict[str, Any]) -> None:
    """``granularity`` and ``scope``, where given, are one of their names."""
    for key, names in (("granularity", GRANULARITIES), ("scope", SCOPES)):
        if key in params and params[key] not in names:
            raise ValueError(f"bit1 {key} must be {' or '.join(map(repr, names))}, "
                             f"not {params[key]!r}")


def _rows(shape: list[int], granularity: str) -> int:
    check({"granularity": granularity})
    return matrix_shape(shape)[0] if granularity == "row" else 1


def encode(theta: torch.Tensor, base: torch.Tensor,
           params: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    shape = list(theta.shape)
    rows = _rows(shape, params["granularity"])
    tau = (theta.float() - base.float()).reshape(rows, -1)
    scales = tau.abs().mean(dim=1).numpy().astype("<f4")
    bits = np.packbits((tau >= 0).numpy().reshape(-1))
    return ({"granularity": params["granularity"], "shape": shape, "rows": rows},
            scales.tobytes() + bits.tobytes())


def decode(payload: memoryview, params: dict[str, Any], base: torch.Tensor,
           extras: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """θ̂ = base + τ̂ in float32, on the base's device (one fused pass there when on CUDA)."""
    rows, n = params["rows"], math.prod(params["shape"])
    if not (type(rows) is int and rows >= 0 and (n % rows == 0 if rows else n == 0)
            and len(payload) == 4 * rows + -(-n // 8)):
        raise ValueError(f"bit1 payload of {len(payload)} bytes does not fit {rows} rows of "
                         f"{n} entries")
    scales = torch.from_numpy(np.frombuffer(payload[:4 * rows], "<f4").copy())
    bits = torch.from_numpy(np.frombuffer(payload[4 * rows:], np.uint8).copy())
    delta = SignDelta(bits.to(base.device), scales.to(base.device))
    return apply_deltas(base.reshape(params["shape"]), [delta], out_dtype=torch.float32)


register(LossyCodec("bit1", {"granularity": "matrix", "scope": "bitdelta"}, encode, decode,
                    "1 sign bit per weight + one mean|τ| scale per matrix, attention and MLP "
                    "projections only (BitDelta)", applies=applies, check=check))
