"""The compiled loops of :mod:`mergehub.kernels.numba_merge` (imported by it where they run:
importing Numba costs ~0.2 s). Module-level functions, so that Numba's cache holds them
across processes (a closure's is made anew in each)."""

import numba
import numpy as np

from mergehub.ops.sparsify import PHILOX_M, PHILOX_W

#: entries per block: K inputs' weighted values, the scores, sums and divisors of a block
#: (4 bytes each) stay in a 32 KiB L1 cache for K = 4
BLOCK = 1024
#: the largest finite float32: a value beyond it (or NaN) makes the chunk decline
_MAX = float(np.finfo(np.float32).max)

_jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")


@_jit
def weigh(v, wt, count, t, j, d, score):
    """Input t's kept value v at j of the block: weighted (``x * w``), stored in d[t, j] and
    added to the block's score (its sign, with count, as torch.sign gives it); whether the
    weighted value is not finite."""
    one, zero = np.float32(1.0), np.float32(0.0)
    if wt != one:
        v = v * wt
    d[t, j] = v
    s = v
    if count:
        s = one if v > zero else -one if v < zero else zero
    score[j] = s if t == 0 else score[j] + s
    return not abs(v) <= np.float32(_MAX)


@_jit
def elect_finish(d, score, mixed, div, n, w, lam, normalize, base, out, s0):
    """The sign election, disjoint (weighted) mean and base + lam * mean of a block whose
    weighted values are d[t, :n] and scores score[:n] (``fast.elect_combine``, then
    ``fast.finish``, their operations in their order); whether a value is not finite."""
    k = d.shape[0]
    zero, one = np.float32(0.0), np.float32(1.0)
    big = np.float32(_MAX)
    wmin = w.min()
    bad = False
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
    return bad


@_jit
def ties(xs, base, hi, lo, w, lam, count, normalize, out, above, at,
         noted_values):
    k, m = len(xs), base.size
    zero = np.float32(0.0)
    big = np.float32(_MAX)
    noted = 0
    d = np.empty((k, BLOCK), np.float32)
    score, mixed, div = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), \
        np.empty(BLOCK, np.float32)
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
                keep = a > h  # hardshrink(x, h)
                kept += keep
                inside[j] |= (a > low) & (a <= h)
                bad |= weigh(x if keep else zero, wt, count, t, j, d, score)
            above[t] += kept
        bad |= elect_finish(d, score, mixed, div, n, w, lam, normalize, base, out, s0)
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


@_jit
def philox_words(key, first, blocks, out):
    """Words 4·first .. 4·(first + blocks) − 1 of stream ``key`` into ``out`` (uint32):
    :func:`mergehub.ops.sparsify.philox4x32` of the counters (block's low and high words, 0,
    0), in uint64 arithmetic on 32-bit values."""
    low = np.uint64(0xFFFFFFFF)
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    w0, w1 = np.uint64(PHILOX_W[0]), np.uint64(PHILOX_W[1])
    key0, key1 = np.uint64(key) & low, np.uint64(key) >> np.uint64(32)
    for i in range(blocks):
        b = np.uint64(first + i)
        c0, c1, c2, c3 = b & low, b >> np.uint64(32), np.uint64(0), np.uint64(0)
        k0, k1 = key0, key1
        for r in range(10):
            if r:
                k0, k1 = (k0 + w0) & low, (k1 + w1) & low
            p0, p1 = c0 * m0, c2 * m1
            c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & low,
                              (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & low)
        out[4 * i] = np.uint32(c0)
        out[4 * i + 1] = np.uint32(c1)
        out[4 * i + 2] = np.uint32(c2)
        out[4 * i + 3] = np.uint32(c3)


@_jit
def dare(xs, keys, start, thresholds, scales, base, w, lam, count, normalize, out,
         kept_counts):
    k, m = len(xs), base.size
    zero, one = np.float32(0.0), np.float32(1.0)
    big = np.float32(_MAX)
    d = np.empty((k, BLOCK), np.float32)
    score, mixed, div = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), \
        np.empty(BLOCK, np.float32)
    words = np.empty(BLOCK + 8, np.uint32)
    for s0 in range(0, m, BLOCK):
        n = min(BLOCK, m - s0)
        first = (start + s0) >> 2
        lane = (start + s0) & 3
        bad = False
        for t in range(k):
            philox_words(keys[t], first, ((start + s0 + n - 1) >> 2) - first + 1, words)
            x_t, big_k, sc, wt = xs[t], thresholds[t], scales[t], w[t]
            kept = 0
            for j in range(n):
                x = x_t[s0 + j]
                bad |= not abs(x) <= big
                # u = floor(r / 2) + 2^30 of the word r as int32: (r >> 1) ^ 2^30 of it unsigned
                keep = ((np.int64(words[lane + j]) >> 1) ^ 0x40000000) < big_k
                kept += keep
                v = x if keep else zero
                bad |= weigh(v if sc == one else v * sc, wt, count, t, j, d, score)
            kept_counts[t] += kept
        bad |= elect_finish(d, score, mixed, div, n, w, lam, normalize, base, out, s0)
        if bad:
            return False
    return True


@_jit
def bracket_candidates(bits, at, lo, hi, cand, where):
    """The magnitudes (bits of float32 values as int32, sign cleared) within [lo, hi] and
    their positions ``at``, compacted into ``cand`` and ``where`` in order; how many."""
    n = 0
    span = np.uint32(hi - lo)
    for i in range(bits.size):
        key = bits[i] & 0x7FFFFFFF
        if np.uint32(key - lo) <= span:
            cand[n] = key
            where[n] = at[i]
            n += 1
    return n


@_jit
def bracket_pass(x, los, his, single, offset, above, counts, cand, where):
    """One chunk ``x`` (float32) of an input against its brackets [los[j], his[j]] of |x|:
    adds the entries above his[j] to above[j]; for a bracket of a single value (``single[j]``)
    counts the entries equal to it in counts[j], else writes those within it, in order, to
    cand[j] with their flat positions (``offset`` + index) to where[j], how many in counts[j].
    A pass over the chunk per bracket, its counts in registers and without a branch (the
    chunk stays in the cache; one pass for all brackets, counting in memory and branching on
    each comparison, took ~5 ns an entry, this ~1 per bracket).
    ``cand`` and ``where`` need room for the whole chunk per bracket."""
    for j in range(los.size):
        lo, hi = los[j], his[j]
        a, c = 0, 0
        if single[j]:
            for i in range(x.size):
                v = abs(x[i])
                a += v > hi
                c += v == hi
        else:
            values, places = cand[j], where[j]
            for i in range(x.size):
                v = abs(x[i])
                a += v > hi
                values[c] = v  # written always, kept by moving on: no branch to mispredict
                places[c] = offset + i
                c += (v >= lo) & (v <= hi)
        above[j] += a
        counts[j] = c
