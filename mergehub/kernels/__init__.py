"""Fused kernels for merging and decompress-and-apply, with torch references.

Merging is pure memory traffic (read a base and K fine-tunes, write one tensor), so each
operation here makes one pass over memory in a Triton kernel when its tensors are on a CUDA
device, and falls back to a plain-torch reference (:mod:`mergehub.kernels.reference`, built
from the merge methods' own functions) otherwise or when Triton is not installed:

* :func:`merge_tensor`: task arithmetic / TIES (trim, sign election, disjoint mean) / consensus
  (TALL masks) of K fine-tuned tensors against their base, τt = θt − θ0 computed in registers;
* :func:`magnitude_cuts`: each τt's exact top-k trim (TIES' and breadcrumbs' cut: the k-th
  largest magnitude, and where a run of entries tied with it ends) without a sort: a sample's
  histogram brackets the k-th, one pass counts the values around the bracket and gathers those
  inside, a radix select among those few picks it, and where the cut splits a run of ties a
  counting pass finds the position of its last kept entry; or, given a ``tolerance``, the cut
  of a random sample, radix-selected without a pass;
* :func:`apply_deltas`: W + Σk sk·decode(δk) for BitDelta, ComPEFT and low-rank deltas
  (:mod:`mergehub.kernels.deltas`), decoded tile by tile, never materialized;
* :func:`zo_direction` / :func:`zo_step` / :func:`zo_steps`: MeZO's perturbation drawn from
  Philox, materialized or added to a parameter in one pass with the draw in registers, or to
  many parameters in one launch, Sparse MeZO's mask computed in the same pass (their oracle is
  torch ops on the materialized draw; the CPU path of MeZO draws with ``torch.randn``
  instead); :func:`smallest_magnitudes`: Sparse MeZO's per-tensor quantiles of |θ|, exact.

Tolerances (tests/test_kernels.py checks them): float32 arithmetic is done in the reference's
order with its roundings, so merge results and sign/ternary deltas are bit-identical to the
reference in every output dtype; low-rank products differ by summation order only (relative
error ~1e-6 of the product, before rounding to the output dtype).

``backend``: ``None`` picks Triton for CUDA tensors (when importable), torch otherwise;
``"triton"`` forces the kernels (on CPU tensors they need ``TRITON_INTERPRET=1`` set before
Triton is imported), ``"torch"`` the reference.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mergehub.errors import InputError
from mergehub.kernels import reference
from mergehub.kernels.deltas import (
    KIND_ORDER, Delta, LowRankDelta, SignDelta, TernaryDelta, dense, matrix_shape, pack_bits,
    unpack_bits)
from mergehub.ops.sparsify import (
    NOTHING, Cut, Order, check_ties, cut_at, kth_rank, located, sample_positions, sampled_cut)

__all__ = ["merge_tensor", "MergeBatch", "MergeReplay", "magnitude_cuts", "magnitude_cut", "Cut", "CutMemo", "apply_deltas",
           "zo_direction", "zo_step", "zo_steps", "zo_mask_bytes", "seed_table",
           "smallest_magnitudes",
           "SignDelta", "TernaryDelta", "LowRankDelta", "dense", "triton_available"]

_ELECT = {None: 0, "sum": 1, "count": 2}
#: magnitude_cuts: ~SAMPLE_SIZE sampled values (blocks of 128) bracket each k-th largest
SAMPLE_BLOCK, SAMPLE_SIZE = 128, 1 << 16
#: candidate room per input: CAP_FACTOR x the count the sample predicts + CAP_SLACK
CAP_FACTOR, CAP_SLACK = 2.0, 4096


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels can be imported (Triton installed); asked once per process,
    since a failed import is searched for again on every try."""
    try:
        import mergehub.kernels.triton_base  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(backend: str | None, tensor: torch.Tensor) -> bool:
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', not {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise InputError("backend 'triton' asked for, but Triton is not installed")
        return True
    return tensor.is_cuda and triton_available()


def _check_inputs(name: str, base: torch.Tensor, thetas: list[torch.Tensor],
                  per_input: dict[str, list | None]) -> None:
    if not thetas:
        raise InputError(f"{name}: no fine-tuned tensors to merge")
    for i, t in enumerate(thetas):
        if t.shape != base.shape:
            raise InputError(f"{name}: input {i} has shape {tuple(t.shape)}, "
                             f"the base {tuple(base.shape)}")
        if t.device != base.device:
            raise InputError(f"{name}: input {i} is on {t.device}, the base on {base.device}")
    for what, values in per_input.items():
        if values is not None and len(values) != len(thetas):
            raise InputError(f"{name}: {len(values)} {what} for {len(thetas)} inputs")
    for t in (base, *thetas):
        if not t.is_floating_point():
            raise InputError(f"{name}: cannot merge a {t.dtype} tensor")


def merge_tensor(base: torch.Tensor, thetas: list[torch.Tensor], *, weights: list[float],
                 lam: float, cuts: list[Cut | None] | None = None,
                 elect: str | None = None, normalize: bool = True,
                 masks: list[torch.Tensor] | torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None, scales: list[float] | None = None,
                 tall_lambdas: list[float] | None = None, k: int = 2,
                 backend: str | None = None, name: str = "tensor",
                 out: torch.Tensor | None = None, batch: MergeBatch | None = None
                 ) -> torch.Tensor:
    """θ0 + λ·τm for one tensor, τt = θt − θ0 from the raw weights ``thetas`` (same shape as
    ``base``; bf16, fp16 or fp32, mixed allowed).

    Args:
        weights: wt per input.
        lam: λ.
        cuts: TIES trim per input (``None`` for an input, or for all, keeps everything), e.g.
            from :func:`magnitude_cuts`: keep |τt| > threshold, and |τt| == threshold at flat
            positions below its tie end.
        elect: ``None``: task arithmetic, τm = Σ wt τt (/ Σ wt with ``normalize``);
            ``"sum"`` / ``"count"``: TIES sign election and disjoint (weighted) mean.
        normalize: as ``sparsify.combine``.
        masks: consensus over given TALL masks: bool/uint8 [K, *shape], or bit-packed uint8
            [K, ceil(n / 8)] (np.packbits order, as the ``tall`` codec stores them);
            τm is kept where at least ``k`` masks are set.
        tall_lambdas: consensus over TALL masks computed on the fly,
            mt = |xt| > λt·|τm − xt|, xt = wt·τt (÷ Σ wt for a normalized task arithmetic)
            (``consensus_task_arithmetic`` / ``consensus_ties``).
        k: consensus vote count.
        scales: TIES ``rescale`` factors applied to the kept entries (inputs with a cut).
        out_dtype: result dtype (default: the base's).
        name: the tensor's name, for error messages.
        out: write the result into this tensor (the base's shape, ``out_dtype``, not one of
            the inputs) and return it.
        batch: with ``out``, on the Triton path, queue the merge in ``batch`` instead of
            launching it (given TALL ``masks`` excepted): ``out`` holds the result once
            :meth:`MergeBatch.run` has launched the batch.
    """
    _check_inputs(name, base, thetas, {"weights": weights, "cuts": cuts,
                                       "scales": scales, "TALL lambdas": tall_lambdas})
    if elect not in _ELECT:
        raise InputError(f"{name}: elect must be None, 'sum' or 'count', not {elect!r}")
    if masks is not None and tall_lambdas is not None:
        raise InputError(f"{name}: give TALL masks or TALL lambdas, not both")
    out_dtype = out_dtype or base.dtype
    if out is not None and (out.shape != base.shape or out.dtype != out_dtype
                            or out.device != base.device):
        raise InputError(f"{name}: out is {out.dtype} {tuple(out.shape)} on {out.device}, the "
                         f"result {out_dtype} {tuple(base.shape)} on {base.device}")
    packed = _packed_masks(name, masks, base, len(thetas))
    if cuts is not None and scales is not None:  # apply_mask ignores the scale of None
        scales = [1.0 if cut is None else s for cut, s in zip(cuts, scales)]
    if not _use_triton(backend, base):
        bool_masks = None if packed is None else [
            unpack_bits(p, base.numel()) for p in packed]
        result = reference.merge_tensor(base, thetas, weights, lam, cuts, scales, elect,
                                        normalize, tall_lambdas, bool_masks, k, out_dtype)
        return result if out is None else out.copy_(result)
    from mergehub.kernels import triton_base, triton_merge

    nk = len(thetas)
    trims = [(-math.inf, 0) if c is None else (c.threshold, c.tie_end)
             for c in (cuts or [None] * nk)]
    total = sum(weights)
    total = total if abs(total) >= 1e-8 else 1.0
    settings = dict(trim=cuts is not None, scale=scales is not None, elect=_ELECT[elect],
                    normalize=normalize,
                    consensus=1 if tall_lambdas is not None else 2 if packed is not None else 0)
    scales, tall_lambdas = scales or [1.0] * nk, tall_lambdas or [0.0] * nk
    if batch is not None and out is not None and packed is None \
            and MergeBatch.fits(base, thetas, out):
        batch.add(base, thetas, out, trims, weights, scales, tall_lambdas, float(lam), total,
                  int(k), settings)
        return out
    coef = [weights, [c for c, _ in trims],
            *triton_base.split_ints([tie for _, tie in trims]), scales, tall_lambdas]
    flat = [t.contiguous().reshape(-1) for t in (base, *thetas)]
    into = out.view(-1) if out is not None and out.is_contiguous() else \
        torch.empty(base.numel(), dtype=out_dtype, device=base.device)
    if base.numel():
        triton_merge.merge(flat[0], flat[1:], into, coef, packed, float(lam), total, int(k),
                             **settings)
    if out is None:
        return into.reshape(base.shape)
    return out if into.data_ptr() == out.data_ptr() else out.copy_(into.reshape(out.shape))


class MergeBatch:
    """Triton merges queued by :func:`merge_tensor` (``out=``, ``batch=``) and launched together.

    A launch costs tens of microseconds of host time, as much as a GPU takes to merge a tensor
    of a few MB, so merging a model's tensors one launch each is bound by the host. A batch
    groups its merges by everything but the tensors themselves (method, weights, λ, dtypes)
    and :meth:`run` launches each group once over all its tensors
    (:func:`triton_merge.merge_many`): the same per-entry arithmetic as one launch per tensor,
    so the same bits. ``with MergeBatch() as batch:`` runs it when the block ends without error.

    ``flush_bytes``: launch what is queued once its tensors hold this many bytes, so that the
    device merges while the host prepares the next merges (default: 1 GiB, ~0.3 ms of an
    H200's memory traffic; ``None``: only :meth:`run` launches). :attr:`replay` can launch
    everything the batch launched again (:class:`MergeReplay`).
    """

    def __init__(self, flush_bytes: int | None = 1 << 30) -> None:
        self._groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
        self.flush_bytes = flush_bytes
        self._queued = 0
        #: merges queued so far, launched or not
        self.added = 0
        #: every launch so far, to run again
        self.replay = MergeReplay()

    @staticmethod
    def fits(base: torch.Tensor, thetas: list[torch.Tensor], out: torch.Tensor) -> bool:
        """Whether a merge of these tensors can join a batch: every one contiguous, not empty
        and starting on 16 bytes (each is addressed from its group's first tensor in whole
        16-byte units, which also keeps the kernel's loads 16 bytes wide)."""
        return base.numel() > 0 and all(
            t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (base, *thetas, out))

    def add(self, base: torch.Tensor, thetas: list[torch.Tensor], out: torch.Tensor,
            trims: list[tuple[float, int]], weights: list[float], scales: list[float],
            tall_lambdas: list[float], lam: float, total: float, k: int,
            settings: dict[str, Any]) -> None:
        """Queue one merge (checked by :func:`merge_tensor`, which calls this)."""
        key = (base.device, base.dtype, tuple(t.dtype for t in thetas), out.dtype,
               tuple(weights), tuple(scales), tuple(tall_lambdas), lam, total, k,
               tuple(settings.items()))
        self._groups.setdefault(key, []).append((base, thetas, out, trims))
        self.added += 1
        self._queued += base.numel() * (base.element_size() + out.element_size()
                                        + sum(t.element_size() for t in thetas))
        if self.flush_bytes is not None and self._queued >= self.flush_bytes:
            self.run()

    def __len__(self) -> int:
        """Merges queued and not launched yet."""
        return sum(map(len, self._groups.values()))

    def run(self) -> None:
        """Launch every queued merge (one launch per group) and empty the batch."""
        from mergehub.kernels import triton_merge

        groups, self._groups, self._queued = self._groups, {}, 0
        for key, items in groups.items():
            _, _, _, _, weights, scales, tall_lambdas, lam, total, k, settings = key
            bases, thetas, outs, trims = (list(x) for x in zip(*items))
            launch = triton_merge.merge_many(
                bases, thetas, outs, trims, list(weights), list(scales), list(tall_lambdas),
                lam, total, k, **dict(settings))
            self.replay.record(launch, bases, thetas, outs)

    def __enter__(self) -> MergeBatch:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.run()


class MergeReplay:
    """The launches a :class:`MergeBatch` made, to make again: the same kernels with the same
    arguments over the same tensors, so the same bits, for none of the host work of
    preparing them (what a live composer does when a recipe is applied again onto the same
    cached inputs). It holds the tensors weakly: calling it launches only while every one
    still lives and no input has been written in place since (its version counter), and
    returns whether it launched."""

    def __init__(self) -> None:
        #: per launch: the function, the tensors it reads (every base, then every input's
        #: tensors, tensor by tensor) and their versions, the tensors it writes
        self._launches: list[tuple[Callable[[list[torch.Tensor]], None], list[weakref.ref],
                                   list[int], list[weakref.ref]]] = []

    def record(self, launch: Callable[[list[torch.Tensor]], None], bases: list[torch.Tensor],
               thetas: list[list[torch.Tensor]], outs: list[torch.Tensor]) -> None:
        """Add one launch: ``launch(likes)`` as :func:`triton_merge.merge_many` returns it."""
        read = [*bases, *(t for ts in thetas for t in ts)]
        self._launches.append((launch, [weakref.ref(t) for t in read],
                               [t._version for t in read], [weakref.ref(t) for t in outs]))

    def __call__(self) -> bool:
        """Launch everything again if every tensor is as recorded; else launch nothing."""
        likes = []
        for _, read_refs, versions, write_refs in self._launches:
            read, written = [r() for r in read_refs], [r() for r in write_refs]
            if any(t is None for t in read + written) or [t._version for t in read] != versions:
                return False
            tensors = len(written)  # the first base, the first tensor's K inputs, first output
            likes.append([read[0], *read[tensors:tensors + len(read) // tensors - 1],
                          written[0]])
        for (launch, *_), first in zip(self._launches, likes):
            launch(first)
        return bool(self._launches)


def _packed_masks(name: str, masks: Any, base: torch.Tensor, k: int) -> torch.Tensor | None:
    """TALL masks as packed uint8 [K, ceil(n / 8)] on the base's device."""
    if masks is None:
        return None
    n = base.numel()
    stacked = torch.stack(list(masks)) if isinstance(masks, (list, tuple)) else masks
    if stacked.shape[0] != k:
        raise InputError(f"{name}: {stacked.shape[0]} TALL masks for {k} inputs")
    nbytes = (n + 7) // 8
    if stacked.dtype == torch.uint8 and stacked.reshape(k, -1).shape[1] == nbytes \
            and stacked.numel() != k * n:
        return stacked.reshape(k, nbytes).contiguous().to(base.device)
    if stacked.reshape(k, -1).shape[1] != n:
        raise InputError(f"{name}: TALL masks of {stacked[0].numel()} values for a tensor of {n} "
                         f"(want {n} booleans or {nbytes} packed bytes each)")
    return pack_bits(stacked.reshape(k, -1).bool()).to(base.device)


def magnitude_cuts(base: torch.Tensor, thetas: list[torch.Tensor], densities: list[float],
                   *, tolerance: float | None = None, ties: str = "index",
                   backend: str | None = None, name: str = "tensor") -> list[Cut | None]:
    """Per input, the TIES trim of τt = θt − θ0 at ``density``, as ``sparsify.magnitude_cuts``:
    the top k = max(1, int(density·n)) entries by |τt|, ties by flat position (``ties:
    index``) or all entries tied with the k-th (``threshold``); ``None``: density >= 1, keep
    all; ``sparsify.NOTHING``: density <= 0.

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
    (``sparsify.sample_positions``: 72,744 values at ε = 0.01, whatever the tensor's size),
    which keeps a share within ε of the density with probability >= 1 − 1e-6 per input. On
    CUDA the sample's k-th value is gathered and radix-selected in a few small launches
    (:func:`triton_select.sample_select`) instead of a pass over the inputs. Both backends
    draw the same sample, so their results are equal. Tensors too small for a sample to save
    work are selected exactly.
    """
    _check_inputs(name, base, thetas, {"densities": densities})
    try:
        check_ties(ties)
    except ValueError as err:
        raise InputError(f"{name}: {err}") from None
    if not _use_triton(backend, base):
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


def _check_stream(name: str, start: int, n: int) -> None:
    if start % 4 or start < 0:
        raise InputError(f"{name}: start must be a multiple of 4, not {start}")
    if start + n > 2 ** 33:
        raise InputError(f"{name}: stream positions up to {start + n} exceed 2^33")


def zo_direction(n: int, seed: int, eps: float, *, start: int = 0,
                 device: torch.device | str = "cuda") -> torch.Tensor:
    """MeZO's perturbation d = eps·z for stream positions [start, start + n) of ``seed``
    (``start`` a multiple of 4): z ~ N(0, 1) from Philox, four values per counter
    (``tl.randn4x``), so a chunk drawn alone equals the same entries of one long draw; the
    lowest float32 mantissa bit of d is set (``mezo._sticky``). Triton only (CUDA, or the
    interpreter): the CPU path of MeZO draws with ``torch.randn``."""
    _check_stream("zo_direction", start, n)
    from mergehub.kernels import triton_zo

    d = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        triton_zo.zo(None, d, n, start, seed, eps, 0, None)
    return d


def zo_step(x: torch.Tensor, seed: int, eps: float, times: int, *, start: int = 0,
            update: float | None = None) -> None:
    """In place on the flat contiguous ``x`` (bf16, fp16 or fp32): ``times`` successive
    rounded adds of d = :func:`zo_direction` (subtractions for times < 0), then one add of
    ``update``·d, exactly as those torch in-place ops on the materialized d would do, in one
    pass over ``x`` with d drawn in registers."""
    if not (x.is_contiguous() and x.dim() == 1 and x.dtype in
            (torch.bfloat16, torch.float16, torch.float32)):
        raise InputError(f"zo_step: want a flat contiguous float tensor, not {x.dtype} "
                         f"{tuple(x.shape)}")
    _check_stream("zo_step", start, x.numel())
    from mergehub.kernels import triton_zo

    if x.numel():
        triton_zo.zo(x, None, x.numel(), start, seed, eps, times, update)


_ZO_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_many(name: str, xs: list[torch.Tensor]) -> None:
    """Flat contiguous tensors of one float dtype on one device, each below 2^31 entries."""
    for x in xs:
        if not (x.is_contiguous() and x.dim() == 1 and x.dtype in _ZO_DTYPES):
            raise InputError(f"{name}: want flat contiguous float tensors, not {x.dtype} "
                             f"{tuple(x.shape)}")
        if x.dtype != xs[0].dtype or x.device != xs[0].device:
            raise InputError(f"{name}: tensors of one dtype on one device, not {x.dtype} on "
                             f"{x.device} beside {xs[0].dtype} on {xs[0].device}")
        if x.numel() >= 2 ** 31:
            raise InputError(f"{name}: a tensor of {x.numel()} entries (at most 2^31 - 1)")


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor copied to ``device`` without waiting for the device's queued work
    (through pinned memory on CUDA): kernel arguments that change from call to call."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def seed_table(seeds: list[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """uint64 seeds as the int64 [T] (same bits) :func:`zo_steps` takes, on ``device``."""
    return to_device(torch.from_numpy(np.asarray(seeds, dtype=np.uint64).view(np.int64)), device)


def zo_mask_bytes(xs: list[torch.Tensor]) -> int:
    """Bytes of the packed masks :func:`zo_steps` keeps for ``xs``: ceil(numel / 8) each."""
    return sum(-(-x.numel() // 8) for x in xs)


def zo_steps(xs: list[torch.Tensor], seeds: list[int] | torch.Tensor, eps: float, times: int,
             *, update: float | None = None, bounds: torch.Tensor | None = None,
             bits: torch.Tensor | None = None, fresh: bool = False) -> None:
    """:func:`zo_step` on each of the flat contiguous tensors ``xs`` (one dtype: bf16, fp16 or
    fp32) from stream position 0 of its seed (``seeds``: ints, or int64 [T] on their device
    holding the uint64 seeds' bits), in one launch: every tensor ends as ``zo_step(x, seed,
    eps, times, update=update)`` leaves it.

    With ``bounds`` (float32 [T], e.g. from :func:`smallest_magnitudes`) the move is Sparse
    MeZO's: d is multiplied by the mask |x| <= bounds[t] (d·1 or d·0, as torch ops on a
    materialized d and mask would), the mask of the parameter as it was when ``fresh`` (the
    step's first move, which computes it and stores it into ``bits``) and read back from
    ``bits`` otherwise. ``bits``: uint8 of :func:`zo_mask_bytes` entries, tensor t's
    ceil(numel / 8) bytes after tensor t − 1's, each in ``np.packbits`` order."""
    _check_many("zo_steps", xs)
    if not any(x.numel() for x in xs):
        return
    if bounds is not None and (bits is None or bits.dtype != torch.uint8
                               or bits.numel() < zo_mask_bytes(xs)):
        raise InputError("zo_steps: masked moves need a uint8 bits buffer of zo_mask_bytes(xs)")
    from mergehub.kernels import triton_zo

    if not isinstance(seeds, torch.Tensor):
        seeds = seed_table(seeds, xs[0].device)
    triton_zo.zo_many(xs, seeds, eps, times, update, bounds, bits, fresh)


def smallest_magnitudes(xs: list[torch.Tensor], ks: list[int]) -> torch.Tensor:
    """float32 [T] on the tensors' device: the ks[t]-th smallest |x| of each flat contiguous
    tensor in ``xs`` (one dtype: bf16, fp16 or fp32; 1 <= k <= numel), exactly (NaN sorts
    last), without a host synchronization: a radix select over the magnitudes' bit patterns,
    one counting pass over all the tensors per digit (:func:`triton_zo.
    smallest_magnitudes`). Triton only (CUDA, or the interpreter)."""
    _check_many("smallest_magnitudes", xs)
    if len(ks) != len(xs) or any(not 1 <= k <= x.numel() for x, k in zip(xs, ks)):
        raise InputError(f"smallest_magnitudes: want one k in [1, numel] per tensor, got {ks} "
                         f"for {[x.numel() for x in xs]} entries")
    from mergehub.kernels import triton_zo

    return triton_zo.smallest_magnitudes(xs, to_device(torch.tensor(ks, dtype=torch.int64),
                                                            xs[0].device))


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
    if not _use_triton(backend, base):
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
