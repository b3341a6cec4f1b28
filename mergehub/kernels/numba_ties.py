"""TIES of one chunk on the CPU in one compiled loop (Numba): the one-pass TIES's per-chunk
work (:func:`mergehub.merge.methods.onepass.one_pass_ties`) without a temporary tensor per
input and step.

In eager torch that work is about ten elementwise passes per input over each ~1 MB chunk
(trim above the bracket, count, note the entries inside it, weight, sum the scores, agree,
sum and count the agreeing entries), each cheap but together ~3.5 ns per input entry on one
core, 2-3x what task arithmetic spends on the whole merge (`benchmarks/RESULTS.md`, issue 16
item 2). Here each block of :data:`BLOCK` entries stays in the cache while every step runs
over it, in the same float32 operations and order as
:func:`mergehub.merge.methods.fast.elect_combine` and ``fast.finish``, so the results are
those bits (tests: against that path and the plain reference, every weight, ``elect`` and
``normalize``). Compiled without fast-math, so no multiply-add is contracted.

Numba compiles the loop the first time a process calls it for a number of inputs, and keeps
the machine code in its cache (``__pycache__`` beside this file, or the user's cache where
that is not writable), so later processes only load it. :func:`available` is false where
Numba cannot be imported; the torch path then runs.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

#: entries per block: K inputs' weighted values, the scores, sums and divisors of a block
#: (4 bytes each) stay in a 32 KiB L1 cache for K = 4
BLOCK = 1024
#: the largest finite float32: a value beyond it (or NaN) makes the chunk decline
_MAX = float(np.finfo(np.float32).max)


@functools.cache
def available() -> bool:
    """Whether Numba can be imported (then :func:`ties_chunk` compiles)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():  # noqa: ANN202  (a Numba dispatcher)
    import numba

    @numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def ties_loop(xs, base, hi, lo, w, lam, count, normalize, out, above, at,  # noqa: ANN001
                  noted_values):  # noqa: ANN001
        k, m = len(xs), base.size
        zero, one = np.float32(0.0), np.float32(1.0)
        big = np.float32(_MAX)
        wmin = w.min()
        noted = 0
        d = np.empty((k, BLOCK), np.float32)
        score = np.empty(BLOCK, np.float32)
        mixed = np.empty(BLOCK, np.float32)
        div = np.empty(BLOCK, np.float32)
        inside = np.empty(BLOCK, np.bool_)
        for s0 in range(0, m, BLOCK):
            n = min(BLOCK, m - s0)
            bad = False
            for j in range(n):
                inside[j] = False
            for t in range(k):
                x_t, h, low, wt = xs[t], hi[t], lo[t], w[t]
                kept = 0
                for j in range(n):
                    x = x_t[s0 + j]
                    a = abs(x)
                    bad |= not a <= big
                    keep = a > h
                    kept += keep
                    inside[j] |= (a > low) & (a <= h)
                    v = x if keep else zero
                    if wt != one:
                        v = v * wt
                        bad |= not abs(v) <= big
                    d[t, j] = v
                    if count:  # the score counts signs: sign(v) as torch.sign gives it
                        v = one if v > zero else -one if v < zero else zero
                    score[j] = v if t == 0 else score[j] + v
                above[t] += kept
            for j in range(n):
                bad |= not abs(score[j]) <= big
                score[j] = one if score[j] >= zero else -one  # the side: + where score >= 0
            for t in range(k):
                wt = w[t]
                for j in range(n):
                    agree = d[t, j] * score[j]
                    agree = agree if agree > zero else zero
                    s = one if agree > zero else zero
                    if t == 0:
                        mixed[j] = agree
                        div[j] = s if wt == one else s * wt
                    else:
                        mixed[j] = mixed[j] + agree
                        div[j] = div[j] + s * wt
            for j in range(n):
                value = mixed[j] * score[j]
                bad |= not abs(value) <= big
                if normalize:  # a divisor of 0 counts as 1 (with positive weights: >= wmin)
                    if wmin > zero:
                        value = value / (div[j] if div[j] > wmin else wmin)
                    else:
                        value = value / (div[j] if div[j] != zero else one)
                if lam != one:
                    value = value * lam
                out[s0 + j] = value + base[s0 + j]
            if bad:
                return -1
            for j in range(n):
                if inside[j]:
                    at[noted] = s0 + j
                    noted_values[0, noted] = base[s0 + j]
                    for t in range(k):
                        noted_values[t + 1, noted] = xs[t][s0 + j]
                    noted += 1
        return noted

    return ties_loop


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
    noted = _kernel()(tuple(x.reshape(-1).numpy() for x in xs),
                      base.reshape(-1).to(torch.float32).numpy(),
                      np.asarray(hi, np.float32), np.asarray(lo, np.float32),
                      np.asarray(weights, np.float32), np.float32(lam), elect == "count",
                      normalize, out.numpy(), above, at, spare)
    if noted < 0:
        return None
    return torch.from_numpy(at[:noted]), torch.from_numpy(spare[:, :noted])
