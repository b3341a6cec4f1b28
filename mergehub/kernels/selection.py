"""TIES' and breadcrumbs' trims on the device: :func:`magnitude_cuts` (each input's exact or
sampled top-k cut without a sort), :func:`magnitude_cut` (one input) and :class:`CutMemo`
(cuts remembered while their tensors live unchanged)."""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any

import torch

from mergehub.errors import InputError
from mergehub.kernels import dispatch, reference
from mergehub.ops.selection import (
    NOTHING, Cut, Order, check_ties, cut_at, kth_rank, located, sample_positions, sampled_cut)

#: magnitude_cuts: ~SAMPLE_SIZE sampled values (blocks of 128) bracket each k-th largest
SAMPLE_BLOCK, SAMPLE_SIZE = 128, 1 << 16
#: candidate room per input: CAP_FACTOR x the count the sample predicts + CAP_SLACK
CAP_FACTOR, CAP_SLACK = 2.0, 4096


def magnitude_cuts(base: torch.Tensor, thetas: list[torch.Tensor], densities: list[float],
                   *, tolerance: float | None = None, ties: str = "index",
                   backend: str | None = None, name: str = "tensor") -> list[Cut | None]:
    """Per input, the TIES trim of τt = θt − θ0 at ``density``, as ``ops.selection.magnitude_cuts``:
    the top k = max(1, int(density·n)) entries by |τt|, ties by flat position (``ties:
    index``) or all entries tied with the k-th (``threshold``); ``None``: density >= 1, keep
    all; ``ops.selection.NOTHING``: density <= 0.

    On CUDA, one pass over the inputs (all K together) instead of a sort: a histogram of
    ``SAMPLE_SIZE`` sampled values brackets each k-th largest, the pass counts the values above
    the bracket and at its ends and gathers those inside (a few %), and a radix select over
    their float bits picks the k-th and counts the entries tied with it
    (:func:`triton_select.select`). Where the cut keeps only some of those ties (bf16 deltas:
    nearly always), one more pass counts them per block (:func:`triton_select.count_equal`)
    and the block holding the last kept one is searched. A bracket that misses or candidates
    that overflow their room (both tell) fall back to ``torch.topk`` over the whole input, so
    the result is exact either way.

    ``tolerance`` ε (0 < ε < 0.5): the cut of a random sample of the tensor instead
    (``ops.selection.sample_positions``: 72,744 values at ε = 0.01, whatever the tensor's size),
    which keeps a share within ε of the density with probability >= 1 − 1e-6 per input. On
    CUDA the sample's k-th value is gathered and radix-selected in a few small launches
    (:func:`triton_select.sample_select`) instead of a pass over the inputs. Both backends
    draw the same sample, so their results are equal. Tensors too small for a sample to save
    work are selected exactly.
    """
    dispatch.check_inputs(name, base, thetas, {"densities": densities})
    try:
        check_ties(ties)
    except ValueError as err:
        raise InputError(f"{name}: {err}") from None
    if not dispatch.use_triton(backend, base):
        return reference.magnitude_cuts(base, thetas, densities, tolerance, ties)
    n = base.numel()
    positions = sample_positions(n, tolerance) if tolerance else None
    ks = [kth_rank(d, n if positions is None else positions.numel()) for d in densities]
    out: list[Cut | None] = [None if d >= 1 or not n else NOTHING for d in densities]
    which = [t for t, kk in enumerate(ks) if kk is not None]
    if not which:
        return out
    flat = base.contiguous().reshape(-1)
    picked = [thetas[t].contiguous().reshape(-1) for t in which]
    if len({t.dtype for t in picked}) > 1:
        # the selection kernels take the inputs as one tuple of pointers, one dtype; float32
        # holds every bf16 and fp16 value exactly, so τ and the cuts are the same
        picked = [t.float() for t in picked]
    if positions is None:
        found = _select(flat, picked, [ks[t] for t in which], ties)
    else:
        from mergehub.kernels import triton_select

        on_device = _positions_on(n, tolerance, base.device)
        values = triton_select.sample_select(flat, picked, on_device,
                                             [ks[t] for t in which]).tolist()
        found = []
        for theta, t, value in zip(picked, which, values):
            sample = (theta[on_device].float() - flat[on_device].float()).abs()
            cut = cut_at(Order.of(sample, value), ks[t], sample.numel(), ties, sample, locate=True)
            found.append(sampled_cut(cut, positions, n, ties))
    for t, cut in zip(which, found):
        out[t] = cut
    return out


class CutMemo:
    """:func:`magnitude_cuts` that remembers each input's cut while its tensors live unchanged.

    A cut depends only on the base tensor, the input's tensor and the trim's settings, so a
    caller that merges the same tensor objects again (:class:`mergehub.compose.Composer`, whose
    delta cache hands out the same device tensors on every warm ``apply``) finds it without
    another selection pass and without the device sync that bringing the cut to the host costs.
    An entry is keyed by the tensors' identities and version counters (bumped by every in-place
    write) and holds weak references to them, so a freed or modified tensor never matches.
    """

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], tuple[weakref.ref, weakref.ref, Cut | None]] = {}
        self._prune_at = 1024

    def __call__(self, base: torch.Tensor, thetas: list[torch.Tensor], densities: list[float],
                 **options: Any) -> list[Cut | None]:
        """:func:`magnitude_cuts` (same arguments), from memory where known."""
        settings = tuple(sorted(options.items()))
        keys = [(id(base), base._version, id(t), t._version, float(d), settings)
                for t, d in zip(thetas, densities)]
        out: list[Cut | None] = []
        missing = []
        for i, (key, theta) in enumerate(zip(keys, thetas)):
            hit = self._memo.get(key)
            if hit is not None and hit[0]() is base and hit[1]() is theta:
                out.append(hit[2])
            else:
                out.append(None)
                missing.append(i)
        if missing:
            found = magnitude_cuts(base, [thetas[i] for i in missing],
                                   [densities[i] for i in missing], **options)
            for i, cut in zip(missing, found):
                out[i] = cut
                self._memo[keys[i]] = (weakref.ref(base), weakref.ref(thetas[i]), cut)
            if len(self._memo) > self._prune_at:
                self._memo = {k: v for k, v in self._memo.items()
                              if v[0]() is not None and v[1]() is not None}
                self._prune_at = max(1024, 2 * len(self._memo))
        return out

    def clear(self) -> None:
        self._memo.clear()


@functools.lru_cache(maxsize=64)
def _positions_on(n: int, tolerance: float, device: torch.device) -> torch.Tensor:
    """``sample_positions(n, tolerance)`` on ``device``, cached (so shared, never written):
    copied once per tensor size, not per call."""
    return sample_positions(n, tolerance).to(device)


def magnitude_cut(base: torch.Tensor, theta: torch.Tensor, density: float,
                  **kwargs: Any) -> Cut | None:
    """:func:`magnitude_cuts` for one input."""
    return magnitude_cuts(base, [theta], [density], **kwargs)[0]


def _select(base: torch.Tensor, thetas: list[torch.Tensor], ks: list[int],
            ties: str) -> list[Cut]:
    """Exact top-k cut of |θt − base| per input (flat tensors): a sample brackets each k-th
    largest, one pass counts around the brackets and keeps the values inside, a radix select
    over those picks it and counts its ties (:func:`triton_select.select`); an input whose
    bracket missed or whose candidates overflowed their room (``CAP_FACTOR`` times the sample's
    prediction plus ``CAP_SLACK``) is selected whole with ``torch.topk``. Where a cut splits its
    ties, :func:`_tie_ends` finds where they end."""
    from mergehub.kernels import triton_select

    n = base.numel()
    blocks = n // SAMPLE_BLOCK
    stride = max(1, blocks * SAMPLE_BLOCK // SAMPLE_SIZE)
    m = min(n, -(-blocks // stride) * SAMPLE_BLOCK) if blocks else n
    bracket, inside = [], 0
    for kk in ks:
        p = kk * m / n
        margin = 8 * math.sqrt(p * max(0.0, 1 - p / m)) + 32
        hi = int(p - margin) if p - margin >= 0 else -1
        lo = int(p + margin) if p + margin < m else m
        bracket.append((hi, lo))
        inside = max(inside, (lo - hi + 1) * n // m)
    values, counts = triton_select.select(base, thetas, ks, SAMPLE_BLOCK, stride * SAMPLE_BLOCK,
                                           m, bracket, int(CAP_FACTOR * inside) + CAP_SLACK)
    cuts: list[Cut | None] = []
    split = []
    for i, (theta, kk, value, (kept_tied, tied)) in enumerate(
            zip(thetas, ks, values.tolist(), counts.tolist())):
        if math.isnan(value):
            cuts.append(_select_whole(base, theta, kk, ties))
            continue
        order = Order(value, kk - kept_tied, tied)
        if located(order, kk, ties):
            split.append((i, order))
            cuts.append(None)
        else:
            cuts.append(cut_at(order, kk, n, ties))
    if split:
        ends = _tie_ends(base, [thetas[i] for i, _ in split], [o.value for _, o in split],
                         [ks[i] - o.above for i, o in split])
        for (i, order), end in zip(split, ends):
            cuts[i] = Cut(order.value, end, ks[i])
    return cuts


def _select_whole(base: torch.Tensor, theta: torch.Tensor, k: int, ties: str) -> Cut:
    """The top-k cut of |θ − base| by ``torch.topk`` over the whole input (the slow path)."""
    mags = (theta.float() - base.float()).abs().reshape(-1)
    value = float(torch.topk(mags, k, sorted=False).values.min())
    return cut_at(Order.of(mags, value), k, mags.numel(), ties, mags)


def _tie_ends(base: torch.Tensor, thetas: list[torch.Tensor], values: list[float],
              ranks: list[int]) -> list[int]:
    """Per input, the flat position + 1 of the ranks[t]-th entry (in flat order) with
    |θt − base| == values[t]: per-block counts from one pass (:func:`triton_select.
    count_equal`), their running sums tell the block, and a search of that block the entry."""
    from mergehub.kernels import triton_select

    counts = triton_select.count_equal(base, thetas, values)
    running = torch.cumsum(counts, 1, dtype=torch.int64)
    rank = torch.tensor(ranks, dtype=torch.int64, device=base.device)[:, None]
    block = torch.searchsorted(running, rank)  # the first block whose running count reaches it
    before = (running.gather(1, block) - counts.gather(1, block)).reshape(-1).tolist()
    ends = []
    size = triton_select.COUNT_BLOCK
    for theta, value, r, b, passed in zip(thetas, values, ranks, block.reshape(-1).tolist(),
                                          before):
        lo = b * size
        at = (theta[lo:lo + size].float() - base[lo:lo + size].float()).abs() == value
        ends.append(lo + int(torch.nonzero(at).reshape(-1)[r - passed - 1]) + 1)
    return ends
