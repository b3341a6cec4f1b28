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
* :func:`dare_words`: DARE's random words (Philox4x32-10 by flat position) in one launch on
  CUDA, compiled on the CPU, their reference :func:`mergehub.ops.sparsify.draw_words`;
* :func:`apply_deltas`: W + Σk sk·decode(δk) for BitDelta, ComPEFT and low-rank deltas
  (:mod:`mergehub.kernels.deltas`), decoded tile by tile, never materialized;
* :func:`zo_direction` / :func:`zo_step` / :func:`zo_steps`: MeZO's perturbation drawn from
  Philox, materialized or added to a parameter in one pass with the draw in registers, or to
  many parameters in one launch (:class:`ZoTensors`: those parameters checked and laid out
  once for a step's launches), Sparse MeZO's mask computed in the same pass (their oracle is
  torch ops on the materialized draw; the CPU path of MeZO draws with ``torch.randn``
  instead); :func:`smallest_magnitudes`: Sparse MeZO's per-tensor quantiles of |θ|, exact.

Tolerances (tests/test_kernels.py checks them): float32 arithmetic is done in the reference's
order with its roundings, so merge results and sign/ternary deltas are bit-identical to the
reference in every output dtype; low-rank products differ by summation order only (relative
error ~1e-6 of the product, before rounding to the output dtype).

``backend``: ``None`` picks Triton for CUDA tensors (when importable), torch otherwise;
``"triton"`` forces the kernels (on CPU tensors they need ``TRITON_INTERPRET=1`` set before
Triton is imported), ``"torch"`` the reference.

The entry points live by concern, re-exported here: :mod:`~mergehub.kernels.merging`
(merges, batches, replays), :mod:`~mergehub.kernels.selection` (trims),
:mod:`~mergehub.kernels.apply` (decompress-and-apply), :mod:`~mergehub.kernels.zo` (MeZO), what
they share :mod:`~mergehub.kernels.dispatch` (the backend choice, input checks); the Triton
kernels themselves in the ``triton_*`` modules. On the CPU, the one-pass TIES's and
DARE-TIES's chunk loops are compiled by Numba (:mod:`~mergehub.kernels.numba_merge`, imported
where they run), their oracle the torch operations they replace.
"""

from mergehub.kernels.apply import apply_deltas
from mergehub.kernels.deltas import LowRankDelta, SignDelta, TernaryDelta, dense
from mergehub.kernels.dispatch import triton_available
from mergehub.kernels.merging import MergeBatch, MergeReplay, dare_words, merge_tensor
from mergehub.kernels.selection import CutMemo, magnitude_cut, magnitude_cuts
from mergehub.kernels.zo import (
    ZoTensors, seed_table, smallest_magnitudes, zo_direction, zo_mask_bytes, zo_step, zo_steps)
from mergehub.ops.selection import Cut

__all__ = ["merge_tensor", "MergeBatch", "MergeReplay", "dare_words", "magnitude_cuts", "magnitude_cut", "Cut",
           "CutMemo", "apply_deltas", "zo_direction", "zo_step", "zo_steps", "ZoTensors",
           "zo_mask_bytes", "seed_table", "smallest_magnitudes", "SignDelta", "TernaryDelta",
           "LowRankDelta", "dense", "triton_available"]
