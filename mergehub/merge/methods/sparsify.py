"""Sparsification and the generalized task-arithmetic combine step shared by TIES, DARE,
breadcrumbs and task arithmetic (mergekit's "generalized task arithmetic" flow).

Conventions (docs/merging.md has the comparison with mergekit 0.1.5 and the papers):

* magnitude trim keeps k = max(1, int(density·n)) entries by |τ|; entries tied with the k-th
  largest are all kept (the TIES paper's rule), which is deterministic on every device;
* DARE drops each entry with probability 1 − density from a generator seeded by (seed, tensor,
  input) and rescales survivors by 1/density (``rescale: true``, the paper's, keeps E[τ]) or to
  the original L1 norm (``rescale: l1``, mergekit 0.1.5);
* breadcrumbs keeps int(density·n) entries after dropping the int(gamma·n) largest (and as many
  of the smallest as needed), mergekit's ``magnitude_outliers``.
"""

from __future__ import annotations

from typing import Any

import torch


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor (1 <= k <= numel), without a full sort."""
    return torch.kthvalue(values.reshape(-1), values.numel() - k + 1).values


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor | None:
    """Entries to keep by magnitude, or ``None`` for "keep everything" (density >= 1)."""
    if density >= 1 or x.numel() == 0:
        return None
    if density <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    k = max(1, int(density * x.numel()))
    mag = x.abs()
    return mag >= kth_largest(mag, k)


def outlier_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Breadcrumbs: keep int(density·n) entries below the int(gamma·n) largest magnitudes."""
    if density >= 1 or x.numel() == 0:
        return None
    n = x.numel()
    keep, top = int(density * n), int(gamma * n)
    if keep <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    bottom = max(0, n - keep - top)
    mag = x.abs()
    flat = mag.reshape(-1)
    hi = torch.kthvalue(flat, bottom + keep).values  # largest kept, counted from the bottom
    mask = mag <= hi
    if bottom > 0:
        mask &= mag > torch.kthvalue(flat, bottom).values
    return mask


def bernoulli_mask(x: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor | None:
    """DARE: keep each entry with probability ``density``."""
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    return torch.rand(x.shape, generator=gen, device=x.device) < density


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None, density: float,
               rescale: bool | str) -> torch.Tensor:
    """Zero the dropped entries and rescale the survivors as ``rescale`` says."""
    if mask is None:
        return x
    kept = x * mask
    if rescale == "l1":
        before, after = x.abs().sum(), kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
    elif rescale is True and density > 0:
        kept = kept / density
    return kept


def combine(deltas: list[torch.Tensor], model_params: list[dict[str, Any]],
            elect: str | None, normalize: bool) -> torch.Tensor:
    """Weight the (sparsified) task vectors, optionally elect signs, and merge them.

    * ``elect=None``: Σ wt τt, divided by Σ wt when ``normalize`` (by 1 if |Σ wt| < 1e-8).
    * ``elect="sum"`` (TIES: sign of the total mass Σ wt τt, ties to +) or ``"count"`` (sign of
      Σ sign(wt τt)): keep each entry only from the inputs that agree with the elected sign
      (exact zeros never agree) and, with ``normalize``, divide by the sum of the agreeing
      inputs' weights: the disjoint (weighted) mean.
    """
    weights = [float(p["weight"]) for p in model_params]
    weighted = [d * w for d, w in zip(deltas, weights)]
    if elect is None:
        mixed = sum(weighted)
        if normalize:
            total = sum(weights)
            mixed = mixed / (total if abs(total) >= 1e-8 else 1.0)
        return mixed
    score = sum(weighted) if elect == "sum" else sum(torch.sign(d) for d in weighted)
    majority = torch.where(score >= 0, 1.0, -1.0)
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for d, w in zip(weighted, weights):
        agree = torch.sign(d) == majority
        mixed += d * agree
        divisor += w * agree
    if normalize:
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    return mixed
