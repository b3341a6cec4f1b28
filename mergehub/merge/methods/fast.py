"""The CPU's fast path for the sparsified merges: the bits of
:mod:`~mergehub.ops.sparsify`'s plain functions (the reference, and the GPU's
chunked path) in fewer and cheaper operations.

On a CPU a merge is a few dozen elementwise torch operations per chunk of ~1 MB, and their
costs differ far more than their count suggests: float arithmetic and ``hardshrink`` run at
~0.1-0.15 ns per element, a comparison that writes a boolean tensor ~0.7 ns, ``torch.where``
~3-5 ns, ``torch.rand`` ~7 ns (measured on the 2-core VM of ``benchmarks/RESULTS.md``, one
thread, 2^18-element chunks). The plain functions spend most of their time in the slow ones.
Here a trim is one ``hardshrink`` per input (:func:`shrink`; breadcrumbs' band two and a
subtraction, :func:`band_shrink`), the sign election uses only
float arithmetic (:func:`elect_combine`), and DARE's keep-masks are made from the same
stream's words with integer operations (:func:`dare_keep`).

Every function here gives exactly what the plain one gives, or says that it cannot
(``None``), where the plain one then runs: for finite inputs always the former. Signed zeros
may differ in intermediate values (a dropped entry is +0 here where ``x * mask`` gives -0
for negative x), never in a result; the tests compare results bit for bit on awkward inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergehub.kernels import dare_words
from mergehub.ops import sparsify
from mergehub.ops.selection import Cut


def below(value: float) -> float:
    """The largest float32 below ``value`` (a float32 value, not NaN or -inf): |x| > it holds
    exactly where |x| >= ``value``."""
    v = torch.tensor(value, dtype=torch.float32)
    return float(torch.nextafter(v, torch.tensor(-math.inf)))


def shrink(x: torch.Tensor, cut: Cut | None, offset: int) -> torch.Tensor | None:
    """``apply_mask(x, cut_mask(x, cut, offset))`` of a float32 chunk whose first flat
    position is ``offset``: ``x`` itself where nothing is cut, else a new tensor; ``None``
    where the cut's threshold is infinite but keeps something (the plain masks give NaN for
    an infinite entry there)."""
    if cut is None:
        return x
    if cut.tie_end <= 0 and cut.threshold == math.inf:  # keeps nothing: exactly x * False
        return x * 0.0
    return split_shrink(x, cut.threshold, min(max(cut.tie_end - offset, 0), x.numel()))


def band_shrink(x: torch.Tensor, band: sparsify.Band | None, offset: int
                ) -> torch.Tensor | None:
    """``apply_mask(x, band_mask(x, band, offset))`` of a float32 chunk whose first flat
    position is ``offset`` (breadcrumbs' band): what the keep cut keeps less what the outlier
    cut keeps, two :func:`shrink` and a subtraction (the outliers are among the entries the
    keep cut keeps, so each entry is x - x = +0, x - 0 = x or 0 - 0); ``None`` for a chunk
    that is not finite (where the plain mask drops an infinite entry it gives NaN, and where
    it keeps one, inf) or where a shrink is ``None``."""
    if band is None:
        return x
    if not math.isfinite(float(x.sum())):
        return None
    keep, outliers = band
    kept = x if keep is None else shrink(x, keep, offset)
    if kept is None or outliers is None:
        return kept
    top = shrink(x, outliers, offset)
    return None if top is None else kept - top


def split_shrink(x: torch.Tensor, threshold: float, split: int) -> torch.Tensor | None:
    """``x`` (float32) with its first ``split`` entries kept where |x| >= ``threshold`` and
    the others where |x| > it, +0 elsewhere, as a new tensor; ``None`` for an infinite
    threshold.

    ``hardshrink(x, t)`` keeps x where |x| > t (and NaN, as ``x * mask`` keeps it) and gives
    +0 elsewhere; |x| >= threshold is |x| > :func:`below` it.
    """
    if not math.isfinite(threshold):
        return None
    if split == 0:
        return torch.nn.functional.hardshrink(x, threshold)
    if split == x.numel():
        return torch.nn.functional.hardshrink(x, below(threshold))
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    torch.hardshrink(flat[:split], below(threshold), out=out[:split])
    torch.hardshrink(flat[split:], threshold, out=out[split:])
    return out.view(x.shape)


def elect_combine(kept: list[torch.Tensor], weights: list[float], elect: str,
                  normalize: bool, spare: list[bool] | None = None) -> torch.Tensor | None:
    """``sparsify.combine(kept, ..., elect, normalize)`` bit for bit (``elect``: ``"sum"``
    or ``"count"``), or ``None`` where a weighted entry or a sum of them is not finite.

    The ``kept`` tensors are left as they are, except those marked ``spare`` (the caller's
    temporaries), which are overwritten, also where ``None`` is returned: that saves a new
    tensor per input and step, whose fresh pages cost a CPU as much as the arithmetic.

    With s = +1 where the elected sign is + (score >= 0) and -1 elsewhere, an input agrees
    where s·dt > 0, so the disjoint sum is s·Σt max(s·dt, 0) and the agreeing weights sum to
    Σt wt·sign(max(s·dt, 0)): the plain function's partial sums in its order (adding a zero
    leaves a nonzero sum as it is, negating a sum negates each of its roundings), with no
    boolean tensor and no ``where``. ``threshold(v, 0, 0)`` is max(v, 0) with +0 for -0, so
    a sum of them is +0 where no input agrees, as the plain sum that starts from zeros; s is
    -1 only where some dt < 0, which then agrees. The divisor's zeros become 1 as in the
    plain function: with positive weights a divisor is either 0 or at least the least weight,
    so ``clamp_min`` to that weight does it in one step (0 / w = 0 / 1).
    """
    spare = spare or [False] * len(kept)
    ds = [x if w == 1.0 else x.mul_(w) if own else x * w
          for x, w, own in zip(kept, weights, spare)]
    spare = [own or w != 1.0 for own, w in zip(spare, weights)]  # a product is ours too
    if elect == "sum":
        score = ds[0] + ds[1] if len(ds) > 1 else ds[0].clone()
        for d in ds[2:]:
            score += d
        check = float(score.sum())
    else:
        score = torch.zeros_like(ds[0])
        for d in ds:
            score += torch.sign(d)
        check = sum(float(d.sum()) for d in ds)
    if not math.isfinite(check):
        return None
    side = score.sign_().add_(0.5).sign_()  # +1 where score >= 0, else -1
    mixed = divisor = None
    for d, w, own in zip(ds, weights, spare):
        agree = torch.nn.functional.threshold_(d.mul_(side) if own else d * side, 0.0, 0.0)
        if mixed is None:
            mixed = agree
            if normalize:
                divisor = torch.sign(agree)
                if w != 1.0:
                    divisor *= w
            continue
        mixed += agree
        if normalize:
            divisor.add_(agree.sign_(), alpha=w)  # w·1 or w·0: exact, fused or not
    mixed *= side
    if normalize:
        if min(weights) > 0:
            divisor.clamp_min_(min(weights))
        else:
            divisor += torch.abs(divisor).sign_().neg_().add_(1)  # 0 -> 1
        mixed /= divisor
    return mixed


def combine(kept: list[torch.Tensor], model_params: list[dict[str, Any]], elect: str | None,
            normalize: bool) -> torch.Tensor:
    """:func:`sparsify.combine`, through :func:`elect_combine` on the CPU where it applies."""
    if elect is not None and kept[0].device.type == "cpu":
        mixed = elect_combine(kept, [float(p["weight"]) for p in model_params], elect,
                              normalize)
        if mixed is not None:
            return mixed
    return sparsify.combine(kept, model_params, elect, normalize)


def finish(base: torch.Tensor, mixed: torch.Tensor, lam: float) -> torch.Tensor:
    """``base + lam * mixed`` (``mixed`` is overwritten)."""
    if lam != 1.0:
        mixed *= lam
    return mixed.add_(base)


def dare_keep(x: torch.Tensor, density: float, key: int, start: int, scale: float
              ) -> tuple[torch.Tensor, int]:
    """``apply_mask(x, bernoulli_mask(x, density, key, start), scale)`` for 0 < density < 1 on
    the CPU, and how many entries the mask keeps: the same words drawn, the mask made and
    applied with in-place integer operations (u < K ⇔ ⌊r/2⌋ − (K − 2^30) < 0, which cannot
    overflow; its sign bit spread over the word is the mask). For finite ``x``: an infinite
    entry dropped is 0 here, NaN in ``x * mask``."""
    mask = dare_words(x.numel(), key, start, x.device)
    mask.bitwise_right_shift_(1).sub_(sparsify.keep_threshold(density) - 2 ** 30)
    mask = mask.bitwise_right_shift_(31).view(x.shape)  # -1 where kept, else 0
    kept = torch.bitwise_and(x.view(torch.int32), mask).view(torch.float32)
    # summed in int32 where that cannot overflow: 20x faster than torch's int64 sum of int32
    count = -int(mask.sum(dtype=torch.int32 if mask.numel() < 1 << 31 else torch.int64))
    return (kept if scale == 1.0 else kept.mul_(scale)), count
