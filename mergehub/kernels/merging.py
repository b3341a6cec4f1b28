"""The merge kernels' entry points: :func:`merge_tensor` (task arithmetic, TIES, the consensus
merges of one tensor in one pass), :class:`MergeBatch` (merges queued and launched together),
:class:`MergeReplay` (a batch's launches made again) and :func:`dare_words` (DARE's draws)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from mergehub.errors import InputError
from mergehub.kernels import dispatch, reference
from mergehub.kernels.deltas import pack_bits, unpack_bits
from mergehub.ops.selection import Cut

_ELECT = {None: 0, "sum": 1, "count": 2}


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
    dispatch.check_inputs(name, base, thetas, {"weights": weights, "cuts": cuts,
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
    if not dispatch.use_triton(backend, base):
        bool_masks = None if packed is None else [
            unpack_bits(p, base.numel()) for p in packed]
        result = reference.merge_tensor(base, thetas, weights, lam, cuts, scales, elect,
                                        normalize, tall_lambdas, bool_masks, k, out_dtype)
        return result if out is None else out.copy_(result)
    from mergehub.kernels import triton_merge

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
    coef = [weights, [c for c, _ in trims], [tie for _, tie in trims], scales, tall_lambdas]
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


def dare_words(n: int, key: int, start: int, device: torch.device | str,
               backend: str | None = None) -> torch.Tensor:
    """DARE's words :func:`mergehub.ops.sparsify.draw_words` (int32 [n] on ``device``, the
    same bits) where they are cheapest: Triton on CUDA (one launch: the reference's int64
    torch operations take ~260 launches), Numba's compiled loop on the CPU
    (:func:`mergehub.kernels.numba_merge.draw_words`), else the reference. ``backend`` as for
    :func:`merge_tensor`; positions must stay below 2^34 for Triton."""
    from mergehub.kernels import numba_merge
    from mergehub.ops.sparsify import draw_words

    probe = torch.empty(0, device=device)
    if backend != "torch":
        if dispatch.use_triton(backend, probe) and start + n <= 1 << 34:
            from mergehub.kernels import triton_merge

            return triton_merge.dare_words(n, key, start, probe.device)
        if probe.device.type == "cpu" and numba_merge.available():
            return numba_merge.draw_words(n, key, start)
    return draw_words(n, key, start, device)
