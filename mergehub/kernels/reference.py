"""Plain-torch versions of the kernels: the CPU path and the kernels' test oracle.

They are the primitives the merge methods are built from (:mod:`mergehub.ops.sparsify`,
:mod:`mergehub.ops.consensus`) applied to one whole tensor, so a kernel that matches them
computes what ``hub merge`` computes on the CPU.
"""

from __future__ import annotations

import torch

from mergehub.kernels.deltas import Delta, dense
from mergehub.ops.consensus import consensus
from mergehub.ops.selection import Cut, magnitude_cuts as streamed_cuts
from mergehub.ops.sparsify import apply_mask, combine, cut_mask


def merge_tensor(base: torch.Tensor, thetas: list[torch.Tensor], weights: list[float],
                 lam: float, cuts: list[Cut | None] | None, scales: list[float] | None,
                 elect: str | None, normalize: bool, tall_lambdas: list[float] | None,
                 masks: list[torch.Tensor] | None, k: int,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """θ0 + λ·τm with τm from ``combine`` over the trimmed τt = θt − θ0 (as TIES and task
    arithmetic merge), restricted to the consensus of TALL masks (computed from
    ``tall_lambdas`` as ``consensus`` does, or the given boolean ``masks``) when asked."""
    b = base.float()
    taus = [t.float() - b for t in thetas]
    params = [{"weight": w, "tall_lambda": lt} for w, lt in
              zip(weights, tall_lambdas or [0.0] * len(weights))]
    trimmed = taus
    if cuts is not None:
        trimmed = [apply_mask(x, cut_mask(x, cut), s)
                   for x, cut, s in zip(taus, cuts, scales or [1.0] * len(taus))]
    mixed = combine(trimmed, params, elect, normalize)
    if tall_lambdas is not None:
        mixed = consensus(taus, mixed, params, k, normalized=normalize and elect is None)
    elif masks is not None:
        mixed = mixed * (torch.stack([mk.reshape(mixed.shape) for mk in masks]).sum(0) >= k)
    return (b + float(lam) * mixed).to(out_dtype)


def magnitude_cuts(base: torch.Tensor, thetas: list[torch.Tensor], densities: list[float],
                   tolerance: float | None = None, ties: str = "index") -> list[Cut | None]:
    """``selection.magnitude_cuts`` over the whole tensor as one chunk."""
    b = base.float()

    def chunks(which: list[int] | None = None):
        picked = range(len(thetas)) if which is None else which
        yield b, [thetas[t].float() - b for t in picked]

    return streamed_cuts(chunks, base.numel(), densities, tolerance, ties)


def apply_deltas(base: torch.Tensor, deltas: list[Delta], scales: list[float],
                 out_dtype: torch.dtype) -> torch.Tensor:
    """W + Σk sk·decode(δk), added in the given order, in float32 (each product rounded, then
    added: no fused multiply-add). Accumulated in place: on a CPU each fresh tensor of this
    size costs its page faults on top of the arithmetic."""
    out = base.to(torch.float32, copy=True)
    for d, s in zip(deltas, scales):
        term = dense(d, base.shape)
        if float(s) != 1.0:
            term.mul_(float(s))
        out.add_(term)
    return out.to(out_dtype)
