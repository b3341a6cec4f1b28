"""Sparsification and the generalized task-arithmetic combine step shared by TIES, DARE,
breadcrumbs and task arithmetic (mergekit's "generalized task arithmetic" flow): the masks
that apply a trim (a :class:`~mergehub.ops.selection.Cut`, found in
:mod:`mergehub.ops.selection`), DARE's random drop, breadcrumbs' band, the L1 rescale, and
the sign election with the disjoint combine. Conventions (docs/merging.md compares them with
mergekit and the papers):

* DARE drops each entry with probability 1 − density (to 2^-31; 31 random bits an entry) from
  a counter-based stream (Philox4x32-10) keyed by (seed, tensor, input), one word per flat
  position, and rescales survivors by 1/density
  (``rescale: true``, the paper's, keeps E[τ]) or to the original L1 norm (``rescale: l1``,
  mergekit 0.1.5);
* breadcrumbs keeps int(density·n) entries after dropping the int(gamma·n) first in the
  trims' order (fewer where they would not fit), mergekit's ``magnitude_outliers``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mergehub.ops.selection import (
    NOTHING, BracketPass, ChunkStream, Cut, kth_largest_abs, top_k_cuts)


#: :meth:`KeptTally.add` from the threads that merge tensors at once (one lock for all
#: tallies: a tally travels to Ray tasks, which a lock of its own could not)
_TALLY_LOCK = threading.Lock()


@dataclass
class KeptTally:
    """Task-vector entries a method's sparsification kept, per input, over the tensors merged
    so far: ``kept`` of ``seen``; ``approximate`` where some tensor's count is its nominal k
    (a cut from a sample, whose exact count would need a pass of its own)."""

    kept: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    approximate: list[bool] = field(default_factory=list)

    def add(self, t: int, kept: int | None, nominal: int, n: int) -> None:
        """Input t kept ``kept`` of a tensor's n entries (``None``: about ``nominal``)."""
        with _TALLY_LOCK:
            while len(self.kept) <= t:
                self.kept.append(0)
                self.seen.append(0)
                self.approximate.append(False)
            self.kept[t] += nominal if kept is None else kept
            self.seen[t] += n
            self.approximate[t] |= kept is None

    def __post_init__(self) -> None:
        self.approximate = self.approximate or [False] * len(self.kept)

    def absorb(self, other: "KeptTally") -> None:
        """Add the counts of ``other`` (a tally of other tensors, e.g. a Ray task's)."""
        for t, (kept, seen, approx) in enumerate(zip(other.kept, other.seen,
                                                     other.approximate)):
            self.add(t, None if approx else kept, kept, seen)


#: breadcrumbs' band: keep the entries inside the first cut and outside the second (the
#: outliers); ``None`` for either side: everything inside / nothing outside
Band = tuple[Cut | None, Cut | None]


def outlier_bands(chunks: ChunkStream, n: int, densities: list[float], gammas: list[float],
                  ties: str = "index", bracket: BracketPass | None = None
                  ) -> list[Band | None]:
    """Breadcrumbs, per input: keep = int(d·n) entries after the top = int(gamma·n) first of
    the ranking, top cut down to n − keep where both would not fit (mergekit's
    magnitude_outliers); ``None`` keeps everything (d >= 1).

    ``ties: index``: exactly those ranks (the cuts at top + keep and at top). ``threshold``:
    the band between the values at those ranks, lo < |x| <= hi, with lo the (top + keep + 1)-th
    largest |x| and hi the (top + 1)-th (so ties at the upper end are kept, at the lower end
    dropped, and the band may hold more or fewer than keep). ``bracket``: the compiled
    selection pass, as :func:`~mergehub.ops.selection.top_k_cuts` takes it.
    """
    ks, plans = [], []
    for d, g in zip(densities, gammas):
        keep = max(0, int(d * n))
        top = max(0, min(int(g * n), n - keep))
        if d >= 1 or not n:
            ks.append([])
            plans.append(None)
        elif keep == 0:
            ks.append([])
            plans.append("none")
        elif ties == "index":
            ks.append([top + keep] + ([top] if top else []))
            plans.append("ranks")
        else:  # the values at ranks top + keep + 1 (lower end) and top + 1 (upper end)
            ks.append([top + 1] + ([top + keep + 1] if top + keep < n else []))
            plans.append("values")
    if ties == "index":
        found = top_k_cuts(chunks, n, ks, ties, bracket=bracket)
    else:  # |x| > lo and not |x| > hi: cuts with no tied entry
        found = [[Cut(o.value, 0, o.above) for o in row]
                 for row in kth_largest_abs(chunks, n, ks, bracket)[0]]
    out: list[Band | None] = []
    for plan, f in zip(plans, found):
        if plan is None:
            out.append(None)
        elif plan == "none":
            out.append((NOTHING, None))
        elif plan == "ranks":
            out.append((None if f[0].kept == n else f[0], f[1] if len(f) > 1 else None))
        else:
            out.append((f[1] if len(f) > 1 else None, f[0]))
    return out


def band_kept(band: Band | None, n: int) -> int:
    """How many of a tensor's n entries a breadcrumbs band keeps."""
    if band is None:
        return n
    keep, outliers = band
    return (n if keep is None else keep.kept) - (0 if outliers is None else outliers.kept)


def _inside(x: torch.Tensor, cut: Cut, offset: int) -> torch.Tensor:
    """Whether each entry of ``x`` (a chunk starting at flat position ``offset``) is inside
    ``cut``. Only the chunk that holds the tie end compares positions."""
    mag = x.abs()
    if cut.tie_end >= offset + x.numel():
        return mag >= cut.threshold
    if cut.tie_end <= offset:
        return mag > cut.threshold
    pos = torch.arange(offset, offset + x.numel(), device=x.device).reshape(x.shape)
    return (mag > cut.threshold) | ((mag == cut.threshold) & (pos < cut.tie_end))


def cut_mask(x: torch.Tensor, cut: Cut | None, offset: int = 0) -> torch.Tensor | None:
    """The keep-mask of a trim on a chunk starting at flat position ``offset`` (``None``: all)."""
    return None if cut is None else _inside(x, cut, offset)


def band_mask(x: torch.Tensor, band: Band | None, offset: int = 0) -> torch.Tensor | None:
    """Breadcrumbs' keep-mask on a chunk starting at flat position ``offset`` (``None``: all)."""
    if band is None:
        return None
    keep, outliers = band
    mask = torch.ones_like(x, dtype=torch.bool) if keep is None else _inside(x, keep, offset)
    return mask if outliers is None else mask & ~_inside(x, outliers, offset)


#: Philox4x32-10's round multipliers and key increments (Salmon et al., 2011)
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_LOW = 0xFFFFFFFF


def _mul_hi_lo(c: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of c·m for 32-bit values ``c`` (int64) and ``m``, exactly in
    int64 arithmetic (c split into 16-bit halves: no product overflows)."""
    a, b = (c >> 16) * m, (c & 0xFFFF) * m  # c·m = a·2^16 + b, each below 2^48
    return (a + (b >> 16)) >> 16, (((a & 0xFFFF) << 16) + b) & _LOW


def philox4x32(counters: torch.Tensor, key: int) -> torch.Tensor:
    """Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2,
    3", SC 2011; Random123's reference): int64 [n, 4] blocks of four 32-bit words from int64
    [n, 4] counters (32-bit words) under a 64-bit ``key`` (its low word first). Counter-based:
    any block is computed from its counter alone, so any range of a stream can be drawn on
    its own, on any device, in the same bits."""
    c0, c1, c2, c3 = counters.unbind(-1)
    k0, k1 = key & _LOW, (key >> 32) & _LOW
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _LOW, (k1 + PHILOX_W[1]) & _LOW
        hi0, lo0 = _mul_hi_lo(c0, PHILOX_M[0])
        hi1, lo1 = _mul_hi_lo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), dim=-1)


def draw_words(n: int, key: int, start: int, device: torch.device | str) -> torch.Tensor:
    """int32 [n]: the 32-bit words at positions [start, start + n) of stream ``key`` (a 64-bit
    integer), word p being word p mod 4 of :func:`philox4x32` of the counter (⌊p/4⌋'s low and
    high 32 bits, 0, 0). A chunk's words are those of its flat positions in the tensor, so
    they do not depend on how the tensor is chunked, nor on the device."""
    if n == 0:
        return torch.empty(0, dtype=torch.int32, device=device)
    first, last = start >> 2, (start + n - 1) >> 2
    blocks = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    zero = torch.zeros_like(blocks)
    words = philox4x32(torch.stack((blocks & _LOW, blocks >> 32, zero, zero), dim=-1), key)
    words = words.reshape(-1)[start & 3:(start & 3) + n]
    return (words - ((words >> 31) << 32)).to(torch.int32)  # the same bits as int32


def keep_threshold(density: float) -> int:
    """K = ⌈f·2^31⌉ for f the float32 value of ``density`` (0 < f, exact: f·2^31 is a float):
    DARE keeps an entry whose word r (:func:`draw_words`, as int32) gives the 31-bit uniform
    u = ⌊r/2⌋ + 2^30 < K, so with probability K/2^31, within 2^-31 above f."""
    f = float(np.float32(density))  # rounded to nearest as torch does (~0.1 us, not ~5)
    return math.ceil(math.ldexp(f, 31))


def bernoulli_mask(x: torch.Tensor, density: float, key: int, start: int = 0,
                   words: torch.Tensor | None = None) -> torch.Tensor | None:
    """DARE: keep each entry with probability ``density`` (:func:`keep_threshold`), from the
    word of stream ``key`` at its flat position (``start``: that of x's first entry);
    ``words``: those words already drawn (:func:`mergehub.kernels.dare_words`), else
    :func:`draw_words` draws them."""
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if words is None:
        words = draw_words(x.numel(), key, start, x.device)
    u = (words.to(torch.int64) >> 1) + 2 ** 30
    return (u < keep_threshold(density)).view(x.shape)


def l1_scales(chunks: ChunkStream,
              masks: Callable[[int, int, int, torch.Tensor], torch.Tensor | None],
              count: int) -> list[float]:
    """mergekit's L1 rescale per input: Σ|τ| / Σ|kept τ| over the tensor (1 if either < 1e-7).

    ``masks(input index, chunk index, chunk's first flat position, values)`` gives the chunk's
    keep-mask (``None``: all).
    """
    before, after = [0.0] * count, [0.0] * count
    offset = 0
    for c, (_, xs) in enumerate(chunks()):
        for t, x in enumerate(xs):
            mask = masks(t, c, offset, x)
            a = _abs_sum(x)
            before[t] += a
            after[t] += a if mask is None else _abs_sum(x * mask)
        offset += xs[0].numel() if xs else 0
    return [b / a if b >= 1e-7 and a >= 1e-7 else 1.0 for b, a in zip(before, after)]


def _abs_sum(x: torch.Tensor) -> float:
    """Σ|x| in float64, the same whatever torch's thread count: torch's CPU sum splits the work
    by thread, so its float32 result changes with the threads (which a merge chooses by the
    machine's load), and a rescale with it; numpy's pairwise sum does not. On a GPU, torch's
    (its order is fixed by the launch)."""
    if x.device.type != "cpu":
        return float(x.abs().sum(dtype=torch.float64))
    values = x.detach().reshape(-1)
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    return float(np.abs(values.numpy()).sum(dtype=np.float64))


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
