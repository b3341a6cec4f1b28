"""Sparsification and the generalized task-arithmetic combine step shared by TIES, DARE,
breadcrumbs and task arithmetic (mergekit's "generalized task arithmetic" flow).

Tensors arrive in row chunks, so whole-tensor quantities (the magnitude threshold of a trim, an
L1 norm) are computed first by streaming over the chunks (:class:`ChunkStream`), then applied
chunk by chunk. Conventions (docs/merging.md compares them with mergekit 0.1.5 and the papers):

* magnitude trim keeps k = max(1, int(density·n)) entries by |τ|; entries tied with the k-th
  largest are all kept (the TIES paper's rule), which is deterministic on every device;
* DARE drops each entry with probability 1 − density from a generator seeded by (seed, tensor,
  input, chunk) and rescales survivors by 1/density (``rescale: true``, the paper's, keeps E[τ])
  or to the original L1 norm (``rescale: l1``, mergekit 0.1.5);
* breadcrumbs keeps int(density·n) entries after dropping the int(gamma·n) largest (and as many
  of the smallest as needed), mergekit's ``magnitude_outliers``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

#: chunks() or chunks(which): yields (base rows, [rows of each input, or of those in which])
ChunkStream = Callable[..., Iterable[tuple[torch.Tensor | None, list[torch.Tensor]]]]

_SAMPLE = 1 << 17  # values sampled per tensor and input to bracket an order statistic
_EXACT = 1 << 20  # tensors this small are selected exactly in one pass


def kth_largest_abs(chunks: ChunkStream, n: int, ks: list[list[int]]) -> list[list[float]]:
    """For each input t and each k in ``ks[t]``, the k-th largest |x| over the whole tensor.

    Exact, without a sort of the tensor: a first pass samples every ``n / 2**17``-th value to
    bracket each order statistic, a second counts the values above the bracket and keeps those
    inside it (about 1% of the tensor), among which the k-th is selected. If a bracket misses
    (a sampling outlier; the counts tell), that input's values are gathered whole instead.
    """
    which = [t for t, k in enumerate(ks) if k]
    if not which:
        return [[] for _ in ks]
    out: list[list[float]] = [[] for _ in ks]
    if n <= _EXACT:
        values = _gather(chunks, which, lambda v: torch.ones_like(v, dtype=torch.bool))
        for t, v in zip(which, values):
            out[t] = [_kth(v, k) for k in ks[t]]
        return out
    stride = max(1, n // _SAMPLE)
    samples = [[] for _ in which]
    for _, xs in chunks(which):
        for s, x in zip(samples, xs):
            s.append(x.reshape(-1)[::stride].abs())
    brackets = []
    for t, s in zip(which, samples):
        s = torch.sort(torch.cat(s), descending=True).values
        m = s.numel()
        per_k = []
        for k in ks[t]:
            p = k * m / n
            margin = 6 * math.sqrt(p * max(0.0, 1 - p / m)) + 16
            hi = s[int(p - margin)].item() if p - margin >= 0 else math.inf
            lo = s[int(p + margin)].item() if p + margin < m else -math.inf
            per_k.append((lo, hi))
        brackets.append(per_k)
    above = [[0] * len(ks[t]) for t in which]
    inside: list[list[list[torch.Tensor]]] = [[[] for _ in ks[t]] for t in which]
    for _, xs in chunks(which):
        for i, x in enumerate(xs):
            v = x.reshape(-1).abs()
            for j, (lo, hi) in enumerate(brackets[i]):
                above[i][j] += int((v > hi).sum())
                inside[i][j].append(v[(v >= lo) & (v <= hi)])
    missed = []
    for i, t in enumerate(which):
        row = []
        for j, k in enumerate(ks[t]):
            cand = torch.cat(inside[i][j])
            if above[i][j] < k <= above[i][j] + cand.numel():
                row.append(_kth(cand, k - above[i][j]))
            else:
                row.append(None)
                missed.append(t)
        out[t] = row
    if missed:
        redo = sorted(set(missed))
        values = _gather(chunks, redo, lambda v: torch.ones_like(v, dtype=torch.bool))
        for t, v in zip(redo, values):
            out[t] = [_kth(v, k) for k in ks[t]]
    return out


def _kth(values: torch.Tensor, k: int) -> float:
    return float(torch.kthvalue(values.reshape(-1).float(), values.numel() - k + 1).values)


def _gather(chunks: ChunkStream, which: list[int], keep: Callable) -> list[torch.Tensor]:
    parts = [[] for _ in which]
    for _, xs in chunks(which):
        for p, x in zip(parts, xs):
            v = x.reshape(-1).abs()
            p.append(v[keep(v)])
    return [torch.cat(p) for p in parts]


def kth_rank(density: float, n: int) -> int | None:
    """How many of n entries a magnitude trim at ``density`` keeps, k = max(1, int(density·n));
    ``None`` where no selection is needed (density >= 1 keeps all, <= 0 none, or n = 0)."""
    return max(1, int(density * n)) if 0 < density < 1 and n else None


def magnitude_thresholds(chunks: ChunkStream, n: int,
                         densities: list[float]) -> list[float | None]:
    """Per input: keep |τ| >= threshold; ``None`` keeps all (density >= 1), inf keeps none."""
    ks = [[k] if (k := kth_rank(d, n)) else [] for d in densities]
    found = kth_largest_abs(chunks, n, ks)
    return [None if d >= 1 or not n else math.inf if d <= 0 else f[0]
            for d, f in zip(densities, found)]


def outlier_bounds(chunks: ChunkStream, n: int, densities: list[float],
                   gammas: list[float]) -> list[tuple[float, float] | None]:
    """Breadcrumbs: per input keep lo < |τ| <= hi, or ``None`` to keep everything."""
    ks, plans = [], []
    for d, g in zip(densities, gammas):
        keep, top = int(d * n), int(g * n)
        bottom = max(0, n - keep - top)
        if d >= 1 or not n:
            ks.append([])
            plans.append(None)
        elif keep <= 0:
            ks.append([])
            plans.append("none")
        else:  # j-th smallest = (n − j + 1)-th largest
            ks.append([n - bottom - keep + 1] + ([n - bottom + 1] if bottom else []))
            plans.append("band")
    found = kth_largest_abs(chunks, n, ks)
    out: list[tuple[float, float] | None] = []
    for plan, f in zip(plans, found):
        if plan is None:
            out.append(None)
        elif plan == "none":
            out.append((math.inf, -math.inf))
        else:
            out.append((f[1] if len(f) > 1 else -math.inf, f[0]))
    return out


def threshold_mask(x: torch.Tensor, threshold: float | None) -> torch.Tensor | None:
    return None if threshold is None else x.abs() >= threshold


def band_mask(x: torch.Tensor, bounds: tuple[float, float] | None) -> torch.Tensor | None:
    if bounds is None:
        return None
    mag = x.abs()
    return (mag > bounds[0]) & (mag <= bounds[1])


def bernoulli_mask(x: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor | None:
    """DARE: keep each entry with probability ``density``."""
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    return torch.rand(x.shape, generator=gen, device=x.device) < density


def l1_scales(chunks: ChunkStream, masks: Callable[[int, int, torch.Tensor], torch.Tensor | None],
              count: int) -> list[float]:
    """mergekit's L1 rescale per input: Σ|τ| / Σ|kept τ| over the tensor (1 if either < 1e-7).

    ``masks(input index, chunk index, rows)`` gives the chunk's keep-mask (``None``: all).
    """
    before, after = [0.0] * count, [0.0] * count
    for c, (_, xs) in enumerate(chunks()):
        for t, x in enumerate(xs):
            mask = masks(t, c, x)
            a = float(x.abs().sum())
            before[t] += a
            after[t] += a if mask is None else float((x.abs() * mask).sum())
    return [b / a if b >= 1e-7 and a >= 1e-7 else 1.0 for b, a in zip(before, after)]


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
    """Zero the dropped entries and multiply the survivors by ``scale``."""
    if mask is None:
        return x
    kept = x * mask
    return kept * scale if scale != 1.0 else kept


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
    if elect is None:
        mixed = torch.zeros_like(deltas[0])
        for d, w in zip(deltas, weights):
            mixed += d * w  # two roundings, as mergekit: a fused multiply-add differs by an ulp
        if normalize:
            total = sum(weights)
            mixed /= total if abs(total) >= 1e-8 else 1.0
        return mixed
    weighted = [d * w for d, w in zip(deltas, weights)]
    score = torch.zeros_like(deltas[0])
    for d in weighted:
        score += d if elect == "sum" else torch.sign(d)
    positive = score >= 0
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for d, w in zip(weighted, weights):
        agree = torch.where(positive, d > 0, d < 0)
        mixed += d * agree
        divisor += w * agree
    if normalize:
        mixed /= torch.where(divisor == 0, 1.0, divisor)
    return mixed
