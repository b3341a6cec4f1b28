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

import functools
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


#: approximate thresholds (``tolerance``): the chance that one input's threshold misses its
#: bound, per tensor; a tolerance whose sample would hold more than ``SAMPLE_MAX_SHARE`` of the
#: tensor selects exactly
SAMPLE_FAILURE, SAMPLE_MAX_SHARE = 1e-6, 0.25


@functools.lru_cache(maxsize=64)
def sample_positions(n: int, tolerance: float) -> torch.Tensor | None:
    """The random sample that approximate thresholds are selected from: sorted flat positions
    (int64) of c values drawn uniformly with replacement; ``None`` where c would exceed
    ``SAMPLE_MAX_SHARE`` of n (select exactly then).

    The draws are rejection-sampled from 62-bit integers with a fixed seed, so the sample is
    exactly uniform and the same on every device and in every run. c is the least count with
    2·exp(−2c(ε − 1/c)²) <= ``SAMPLE_FAILURE``: Hoeffding's bound on the sampled share above a
    value, which holds however the values are arranged (see :func:`magnitude_thresholds`);
    about 14.5 / (2ε²), e.g. 72,744 at ε = 0.01, whatever n is.
    """
    if not 0 < tolerance < 0.5:
        raise ValueError(f"tolerance must be in (0, 0.5), not {tolerance!r}")
    a = math.log(2 / SAMPLE_FAILURE)
    # ε·c − 1 >= sqrt(a·c / 2) is a quadratic in sqrt(c): its root, then up past rounding
    c = math.ceil(((math.sqrt(a / 2) + math.sqrt(a / 2 + 4 * tolerance)) / (2 * tolerance)) ** 2)
    while 2 * c * (tolerance - 1 / c) ** 2 < a:
        c += 1
    if c > SAMPLE_MAX_SHARE * n:
        return None
    limit = (1 << 62) // n * n  # draws below it are uniform modulo n
    gen = torch.Generator().manual_seed(0x5EED)
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < c:
        draws = torch.randint(0, 1 << 62, (c,), generator=gen, dtype=torch.int64)
        picked = torch.cat([picked, draws[draws < limit] % n])
    return picked[:c].sort().values


def sampled(chunks: ChunkStream, positions: torch.Tensor) -> ChunkStream:
    """``chunks`` restricted to the values at ``positions`` (sorted flat positions; one drawn
    twice is yielded twice), in the same order."""

    def stream(which: list[int] | None = None):
        start = 0
        for base, xs in chunks(which):
            m = xs[0].numel() if xs else base.numel()
            lo, hi = (int(torch.searchsorted(positions, v)) for v in (start, start + m))
            pick = positions[lo:hi] - start
            yield (None if base is None else base.reshape(-1)[pick.to(base.device)],
                   [x.reshape(-1)[pick.to(x.device)] for x in xs])
            start += m
    return stream


def magnitude_thresholds(chunks: ChunkStream, n: int, densities: list[float],
                         tolerance: float | None = None) -> list[float | None]:
    """Per input: keep |τ| >= threshold; ``None`` keeps all (density >= 1), inf keeps none.

    ``tolerance`` ε: instead of the exact k-th largest |τ|, the exact k_s-th largest of a
    random sample of S values (:func:`sample_positions`), k_s = max(1, int(d·S)); tensors too
    small to gain select exactly. With probability at least 1 − ``SAMPLE_FAILURE`` per input,
    the result lies between the exact thresholds at densities d + ε and d − ε, i.e. the trim
    keeps a share of the tensor within ε of d (up to entries tied with the threshold).

    Why: say it exceeded u, the exact threshold at d − ε. Then at least k_s >= d·S − 1 sampled
    values exceed u, while at most a share d − ε of the tensor does: the sample's share beats
    its mean by more than ε − 1/S. Had it fallen below the threshold at d + ε, which at least
    a share d + ε − 1/n reaches, fewer than d·S sampled values would reach it. Hoeffding
    bounds each event by exp(−2S(ε − 1/S)²).
    """
    if tolerance and (positions := sample_positions(n, tolerance)) is not None:
        return magnitude_thresholds(sampled(chunks, positions), positions.numel(), densities)
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


def weight_total(model_params: list[dict[str, Any]]) -> float:
    """Σ wt, what a normalized task arithmetic divides by (1 where |Σ wt| < 1e-8)."""
    total = sum(float(p["weight"]) for p in model_params)
    return total if abs(total) >= 1e-8 else 1.0


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
            mixed /= weight_total(model_params)
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
