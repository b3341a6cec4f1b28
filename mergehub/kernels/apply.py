"""Decompress-and-apply: :func:`apply_deltas`, W + Σk sk·decode(δk) for BitDelta, ComPEFT and
low-rank deltas (:mod:`mergehub.kernels.deltas`) in one pass over W."""

from __future__ import annotations

import torch

from mergehub.errors import InputError
from mergehub.kernels import dispatch, reference
from mergehub.kernels.deltas import (
    KIND_ORDER, Delta, LowRankDelta, SignDelta, TernaryDelta, matrix_shape)


def apply_deltas(base: torch.Tensor, deltas: list[Delta], scales: list[float] | None = None, *,
                 out_dtype: torch.dtype | None = None, backend: str | None = None,
                 name: str = "tensor") -> torch.Tensor:
    """W + Σk sk·decode(δk) in one pass over W: the deltas are decoded tile by tile in
    registers, never materialized. The sum runs over the deltas in kind order (:class:`SignDelta`,
    then :class:`TernaryDelta`, then :class:`LowRankDelta`), in the given order within a kind,
    on both paths. ``scales`` default to 1; the result is ``out_dtype`` (default: W's)."""
    scales = [1.0] * len(deltas) if scales is None else list(scales)
    if len(scales) != len(deltas):
        raise InputError(f"{name}: {len(scales)} scales for {len(deltas)} deltas")
    out_dtype = out_dtype or base.dtype
    rows, cols = matrix_shape(base.shape)
    order = sorted(range(len(deltas)), key=lambda i: KIND_ORDER.index(type(deltas[i])))
    for i in order:
        _check_delta(name, deltas[i], rows, cols, base.device)
    deltas, scales = [deltas[i] for i in order], [scales[i] for i in order]
    if not dispatch.use_triton(backend, base):
        return reference.apply_deltas(base, deltas, scales, out_dtype)
    from mergehub.kernels import triton_apply

    pairs = list(zip(deltas, scales))
    signs = [(d.bits, d.scales.float().expand(rows).contiguous()) for d, _ in pairs
             if isinstance(d, SignDelta)]
    terns = [(d.mask, d.signs) for d, _ in pairs if isinstance(d, TernaryDelta)]
    lows = [(d.left.float().contiguous(), d.right.float().contiguous()) for d, _ in pairs
            if isinstance(d, LowRankDelta)]
    coef = [s for d, s in pairs if isinstance(d, SignDelta)]
    coef += [x for d, s in pairs if isinstance(d, TernaryDelta) for x in (s, d.value)]
    coef += [s for d, s in pairs if isinstance(d, LowRankDelta)]
    out = torch.empty(rows, cols, dtype=out_dtype, device=base.device)
    if base.numel():
        triton_apply.apply(base.contiguous().reshape(rows, cols), out, signs, terns, lows,
                             torch.tensor(coef + [0.0], dtype=torch.float32, device=base.device))
    return out.reshape(base.shape)


def _check_delta(name: str, d: Delta, rows: int, cols: int, device: torch.device) -> None:
    """Shapes and devices of a compressed delta against a [rows, cols] tensor."""
    nbytes = (rows * cols + 7) // 8
    if isinstance(d, SignDelta):
        parts = {"sign bits": (d.bits, (nbytes,)), "scales": (d.scales, None)}
        if d.scales.numel() not in (1, rows):
            raise InputError(f"{name}: BitDelta with {d.scales.numel()} scales for {rows} rows")
    elif isinstance(d, TernaryDelta):
        parts = {"ternary mask": (d.mask, (nbytes,)), "ternary signs": (d.signs, (nbytes,))}
    elif isinstance(d, LowRankDelta):
        parts = {"low-rank left factor": (d.left, None), "low-rank right factor": (d.right, None)}
        if d.left.dim() != 2 or d.right.dim() != 2 or d.left.shape[0] != rows \
                or d.right.shape[1] != cols or d.left.shape[1] != d.right.shape[0]:
            raise InputError(f"{name}: low-rank factors {tuple(d.left.shape)} @ "
                             f"{tuple(d.right.shape)} do not make a {rows}x{cols} matrix")
    else:
        raise InputError(f"{name}: not a compressed delta: {type(d).__name__}")
    for what, (tensor, shape) in parts.items():
        if shape is not None and (tensor.dtype != torch.uint8 or tuple(tensor.shape) != shape):
            raise InputError(f"{name}: {what} must be uint8 {shape}, not {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        if tensor.device != device:
            raise InputError(f"{name}: {what} on {tensor.device}, the tensor on {device}")
