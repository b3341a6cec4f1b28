"""The CPU's merge of one chunk in one compiled loop (Numba): TIES's one-pass chunk
(:func:`mergehub.merge.methods.onepass.one_pass_ties`) and DARE-TIES's chunk, without a
temporary tensor per input and step; DARE's words (Philox4x32-10), drawn in the loop; and the
counting pass of the streamed top-k selection (:func:`bracket_pass`, breadcrumbs' and the
magnitude trims' cuts).

In eager torch that work is about ten elementwise passes per input over each ~1 MB chunk
(trim or drop, count, weight, sum the scores, agree, sum and count the agreeing entries, and
for TIES note the entries inside a bracket), each cheap but together ~3.5 ns per input entry
on one core, 2-3x what task arithmetic spends on the whole merge (`benchmarks/RESULTS.md`,
issue 16 item 2). Here each block of 1024 entries stays in the cache while every step runs
over it, in the same float32 operations and order as the torch path
(:func:`mergehub.merge.methods.fast.dare_keep`, ``fast.elect_combine``, ``fast.finish``),
so the results are those bits (tests: against that path and the plain reference, every
weight, ``elect`` and ``normalize``). Compiled without fast-math, so no multiply-add is
contracted.

Numba compiles a loop the first time a process calls it for a number of inputs, and keeps the
machine code in its cache (``__pycache__`` beside the loops' module
:mod:`~mergehub.kernels.numba_loops`, or the user's cache where that is not writable), so
later processes only load it (~0.4 s, once per process). :func:`available` is false where
Numba cannot be imported; the torch path then runs.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.cache
def available() -> bool:
    """Whether Numba can be imported (then the loops compile)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def applies(base: torch.Tensor, xs: list[torch.Tensor]) -> bool:
    """Whether the loops take this chunk: Numba installed, float32 task vectors and a float32
    or 16-bit base (widened exactly), all on the CPU."""
    return available() and base.dtype in (torch.float32, torch.bfloat16, torch.float16) \
        and base.device.type == "cpu" \
        and all(x.dtype == torch.float32 and x.device.type == "cpu" for x in xs)


@functools.cache
def _loops():  # noqa: ANN202  (the module, imported on first use)
    from mergehub.kernels import numba_loops

    return numba_loops


def draw_words(n: int, key: int, start: int) -> torch.Tensor:
    """:func:`mergehub.ops.sparsify.draw_words` on the CPU, compiled: the same int32 words
    (~0.4 ns a word, where the reference's int64 torch operations take ~40)."""
    if n == 0:
        return torch.empty(0, dtype=torch.int32)
    first = start >> 2
    blocks = ((start + n - 1) >> 2) - first + 1
    out = np.empty(4 * blocks, dtype=np.uint32)
    _loops().philox_words(np.uint64(key), first, blocks, out)
    return torch.from_numpy(out[start & 3:(start & 3) + n].view(np.int32))


def bracket_candidates(values: np.ndarray, at: np.ndarray, lo: int, hi: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The magnitude bits (int32) of the float32 ``values`` that lie within [lo, hi] (bits)
    and their positions ``at`` (int64), in order: numpy's boolean indexing of both, in one
    compiled pass (~4x faster: 0.36 -> ~0.09 CPU s for the 54M values a 211M-parameter TIES
    merge notes)."""
    cand = np.empty(values.size, dtype=np.int32)
    where = np.empty(values.size, dtype=np.int64)
    n = _loops().bracket_candidates(values.view(np.int32), at, np.int32(lo), np.int32(hi),
                                    cand, where)
    return cand[:n], where[:n]


def _flat32(x: torch.Tensor) -> np.ndarray:
    """A tensor's entries as a flat float32 array (a 16-bit one widened, exactly)."""
    return x.reshape(-1).to(torch.float32).numpy()


def ties_chunk(base: torch.Tensor, xs: list[torch.Tensor], hi: list[float], lo: list[float],
               weights: list[float], elect: str, normalize: bool, lam: float,
               above: np.ndarray, out: torch.Tensor, spare: np.ndarray
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The TIES merge of one chunk as if each input t kept exactly its entries with |x| >
    ``hi[t]`` (``hardshrink``), written to ``out`` (float32, the chunk's size): what
    ``fast.finish(base, fast.elect_combine(kept, weights, elect, normalize), lam)`` gives,
    bit for bit. Adds each input's kept count to ``above[t]`` (int64) and returns the
    positions (int64, ascending) where some input has lo[t] < |x| <= hi[t], with the base's
    and each input's values there (float32 [1 + K, positions]); ``None`` where an input, a
    weighted value, a score or a sum is not finite (the caller's other path then merges the
    tensor; ``above`` is then partial).

    ``hi[t] = -1`` keeps all of input t, ``hi[t] = lo[t] = inf`` none of it. Contiguous
    float32 tensors of one size (``base`` float32 or 16-bit, widened); ``elect``: ``"sum"``
    or ``"count"``. ``spare``: float32 [1 + K, >= size] for the noted values, reused from
    chunk to chunk (the result's values are a view of it)."""
    at = np.empty(base.numel(), dtype=np.int64)
    noted = _loops().ties(tuple(x.reshape(-1).numpy() for x in xs), _flat32(base),
                          np.asarray(hi, np.float32), np.asarray(lo, np.float32),
                          np.asarray(weights, np.float32), np.float32(lam), elect == "count",
                          normalize, out.view(-1).numpy(), above, at, spare)
    if noted < 0:
        return None
    return torch.from_numpy(at[:noted]), torch.from_numpy(spare[:, :noted])


def dare_chunk(base: torch.Tensor, xs: list[torch.Tensor], keys: list[int], start: int,
               thresholds: list[int], scales: list[float], weights: list[float], elect: str,
               normalize: bool, lam: float, out: torch.Tensor) -> list[int] | None:
    """The DARE-TIES merge of one chunk into ``out`` (contiguous float32, the chunk's size):
    each input t dropped by the words of stream ``keys[t]`` at the chunk's flat positions
    (from ``start``; drawn in the loop, as :func:`mergehub.ops.sparsify.draw_words` gives
    them: kept where ⌊r/2⌋ + 2^30 < ``thresholds[t]``, the :func:`~mergehub.ops.sparsify.
    keep_threshold`), the kept entries times ``scales[t]``, then elected and combined as
    :func:`ties_chunk` does: what ``fast.dare_keep`` per input and ``fast.finish(base,
    fast.elect_combine(...), lam)`` give, bit for bit. Returns how many entries each input
    kept, or ``None`` where an input or a value is not finite."""
    counts = np.zeros(len(xs), dtype=np.int64)
    done = _loops().dare(tuple(x.reshape(-1).numpy() for x in xs),
                         np.asarray(keys, dtype=np.uint64), start,
                         np.asarray(thresholds, np.int64), np.asarray(scales, np.float32),
                         _flat32(base), np.asarray(weights, np.float32), np.float32(lam),
                         elect == "count", normalize, out.view(-1).numpy(), counts)
    return [int(c) for c in counts] if done else None


def bracket_pass(x: torch.Tensor, brackets: list[tuple[float, float]], offset: int
                 ) -> tuple[list[int], list[int | tuple[torch.Tensor, torch.Tensor]]] | None:
    """The bracket pass of :func:`mergehub.ops.selection.kth_largest_abs` over one input's
    chunk ``x`` (flat positions from ``offset``) in one compiled loop: per bracket (lo, hi) of
    |x|, how many entries lie above hi, and either how many equal it (a bracket of one value,
    lo == hi) or the entries within [lo, hi] with their flat positions (float32, int64), in
    order: the counts and values of the torch path (float32 comparisons against bounds that
    are float32 values), with the positions besides. ``None`` where it does not apply (not
    a float32 tensor on the CPU, or Numba missing)."""
    if not available() or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    flat = x.reshape(-1).contiguous().numpy()
    nb = len(brackets)
    single = np.array([lo == hi for lo, hi in brackets], dtype=np.bool_)
    above = np.zeros(nb, dtype=np.int64)
    counts = np.zeros(nb, dtype=np.int64)
    room = 0 if single.all() else flat.size
    cand = torch.empty((nb, room), dtype=torch.float32)  # torch's memory: see codec.new_buffer
    where = torch.empty((nb, room), dtype=torch.int64)
    _loops().bracket_pass(flat, np.array([lo for lo, _ in brackets], np.float32),
                          np.array([hi for _, hi in brackets], np.float32), single, offset,
                          above, counts, cand.numpy(), where.numpy())
    inside = [int(c) if s else (cand[j, :c], where[j, :c])
              for j, (s, c) in enumerate(zip(single, counts))]
    return [int(a) for a in above], inside
