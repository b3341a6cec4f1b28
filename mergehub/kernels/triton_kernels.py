"""The Triton kernels and their launchers (imported only when Triton is, see :mod:`mergehub.kernels`).

Every kernel makes one pass over memory and does its float32 arithmetic in the same order, with
the same roundings, as the torch reference: launches pass ``enable_fp_fusion=False`` (no
multiply-add contraction), divisions are correctly rounded (``div_rn``, or for the disjoint mean
a table of float64 reciprocals or :func:`_quotient`, which give the same float32) and bf16
outputs are rounded to nearest-even by :func:`_round_bf16` (Triton's interpreter truncates
instead), so on float32 math the kernels are bit-identical to the references (low-rank products
excepted: a ``tl.dot`` sums in another order than a CPU matmul).
"""

from __future__ import annotations

import functools
import math
import os
import struct
from collections.abc import Callable

import numpy as np
import torch
import triton
import triton.language as tl

MERGE_BLOCK = 512  # elements per program (measured best on an H100: benchmarks/RESULTS.md)
MERGE_WARPS = 4
#: magnitude selection (measured on an H100: benchmarks/RESULTS.md): values per sample program;
#: the pass's block and warps; candidate lists per input and each one's room beyond its share;
#: the radix select's digit bits, keys per step and warps
SAMPLE_CHUNK = 1024
SELECT_BLOCK, SELECT_WARPS, SELECT_SLOTS, LIST_SLACK = 1024, 4, 64, 256
RADIX_BITS, RADIX_CHUNK, RADIX_WARPS = 8, 4096, 8
#: approximate selection over a sample: values per gathering / histogram program (its digits
#: are RADIX_BITS wide: tl.histogram's cost grows with its bins)
SAMPLE_BLOCK_VALUES = 1024
ZO_BLOCK = 1024  # MeZO perturbation: entries per program
APPLY_BM, APPLY_BN = 32, 128  # decompress-and-apply tile; low-rank factors are padded to 16
_FAST = {"enable_fp_fusion": False}
#: under Triton's interpreter a float32 -> bf16 cast truncates: :func:`_round_bf16` rounds first
#: (compiled, the cast itself rounds to nearest-even, in one instruction)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _round_bf16(x):
    """Round float32 to the nearest bf16 value (ties to even), returned as float32."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store(ptr, off, val, m, OUT_BF16: tl.constexpr):
    if OUT_BF16:
        val = _round_bf16(val)
    tl.store(ptr + off, val.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def _packed_bit(ptr, off, m):
    """Bit ``off`` of a np.packbits-ordered (most significant bit first) uint8 array."""
    byte = tl.load(ptr + (off >> 3), mask=m, other=0).to(tl.int32)
    return ((byte >> (7 - (off & 7).to(tl.int32))) & 1) != 0


@triton.jit
def _tile_bits(ptr, r, c0, rows, cols, off, m, ALIGNED: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr):
    """The packed bits of a [BM, BN] tile at rows ``r``, columns from ``c0``, as bool. With
    ``ALIGNED`` (cols % 8 == 0) each byte is loaded once and split into its 8 bits."""
    if ALIGNED:
        cb = c0 // 8 + tl.arange(0, BN // 8)
        bm = (r[:, None] < rows) & (cb[None, :] < cols // 8)
        byte = tl.load(ptr + r[:, None] * (cols // 8) + cb[None, :], mask=bm, other=0)
        shift = 7 - tl.arange(0, 8)
        bits = (byte.to(tl.int32)[:, :, None] >> shift[None, None, :]) & 1
        return tl.reshape(bits, (BM, BN)) != 0
    else:
        return _packed_bit(ptr, off, m)


@triton.jit
def _quotient(a, b):
    """a / b correctly rounded to float32 (what ``div_rn`` gives) for any float32 ``a`` and a
    ``b`` in [2^-100, 2^100], at a fraction of ``div_rn``'s cost (no slow path, no branch).

    Why it is exact: a/b is never within a relative 2^-49 of a midpoint between two float32
    values (a = b·m with m such a midpoint, 25 significant bits, would need more bits than a
    has; otherwise a − b·m is a nonzero multiple of the ulp of b·m, and |b·m| < 2^49 of those
    ulps), so any q with |q − a/b| < 2^-49·|a/b| rounds to float32 as a/b does, overflow and
    subnormal results included. Here q = a·y in float64 with y the float64 reciprocal of b:
    a float32 seed whose low 8 mantissa bits are cleared (relative error < 2^-14.9 whatever
    the hardware's approximate division gives, so the two Newton steps below are what make y
    accurate, on the GPU and in the interpreter alike) and two Newton steps
    y ← y + y·(1 − b·y), each squaring the error plus ~2^-52 of roundings: |y·b − 1| < 2^-51.9,
    so |q − a/b| < 2^-51.4·|a/b|. Zeros, infinities and NaNs of ``a`` come out as ``div_rn``'s."""
    seed = ((1.0 / b).to(tl.int32, bitcast=True) & -256).to(tl.float32, bitcast=True)
    y = seed.to(tl.float64)
    b64 = b.to(tl.float64)
    for _ in tl.static_range(2):
        y = y + y * (1.0 - b64 * y)
    return (a.to(tl.float64) * y).to(tl.float32)


@triton.jit
def _merge_kernel(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_hi, tie_lo, scales,
                  tall_lambdas, masks_ptr, recips_ptr, n, mask_stride, lam, total, votes_needed,
                  K: tl.constexpr, TRIM: tl.constexpr, SCALE: tl.constexpr,
                  ELECT: tl.constexpr, NORMALIZE: tl.constexpr, CONSENSUS: tl.constexpr,
                  DIVIDE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    # weights, thresholds, below, tie_hi, tie_lo, scales, tall_lambdas: K float32 scalars each.
    # TRIM keeps |τ| > threshold, and |τ| == threshold at flat positions below the tie end
    # (tie_hi·4096 + tie_lo): |τ| > below there, ``below`` being the float under the threshold.
    # ELECT: 0 none, 1 sum, 2 count. CONSENSUS: 0 none, 1 TALL masks computed here, 2 given.
    # DIVIDE, the disjoint mean's division (all three correctly rounded): 0 ``div_rn``; 1 by the
    # float64 reciprocal of each agreeing set's divisor, from recips_ptr[Σ 2^t over the agreeing
    # inputs t] (:func:`_reciprocals`), rounded once; 2 :func:`_quotient` (the divisors are
    # sums of positive weights in [2^-100, 2^100], checked by the caller).
    # ROUND_BF16: round the bf16 output by :func:`_round_bf16` (the interpreter's cast
    # truncates).
    _merge_program(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_hi, tie_lo, scales,
                   tall_lambdas, masks_ptr, recips_ptr, tl.program_id(0).to(tl.int64) * BLOCK, n,
                   mask_stride, lam, total, votes_needed, K, TRIM, SCALE, ELECT, NORMALIZE,
                   CONSENSUS, DIVIDE, ROUND_BF16, BLOCK)


@triton.jit
def _merge_many_kernel(base_like, thetas_like, out_like, meta_ptr, cut_ptr, first_ptr, weights,
                       scales, tall_lambdas, recips_ptr, lam, total, votes_needed,
                       K: tl.constexpr, TRIM: tl.constexpr, SCALE: tl.constexpr,
                       ELECT: tl.constexpr, NORMALIZE: tl.constexpr, CONSENSUS: tl.constexpr,
                       DIVIDE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
                       LOG_T: tl.constexpr):
    """:func:`_merge_kernel` over many tensors in one launch (:func:`merge_many`): program pid
    merges a block of tensor t, found by binary search over the tensors' first programs
    (``first_ptr``). Row t of ``meta_ptr`` (int64, 3 + 2K): the base's, the output's and the
    K inputs' offsets in entries from ``base_like``, ``out_like`` and ``thetas_like[k]`` (each
    a multiple of 16 bytes), the entry count, then the K tie ends; row t of ``cut_ptr``
    (float32, 2K): the K thresholds, then the floats below them. Everything else is one value
    for all the tensors (no given TALL masks)."""
    pid = tl.program_id(0).to(tl.int64)
    t = _tensor_of(first_ptr, pid, LOG_T)
    row = meta_ptr + t * (3 + 2 * K)
    base_ptr = _at(base_like, tl.load(row))
    out_ptr = _at(out_like, tl.load(row + 1))
    n = tl.load(row + 2)
    thetas = ()
    thresholds = ()
    below = ()
    tie_hi = ()
    tie_lo = ()
    for k in tl.static_range(K):
        thetas = thetas + (_at(thetas_like[k], tl.load(row + 3 + k)),)
        tie = tl.load(row + 3 + K + k)
        tie_hi = tie_hi + (tie >> 12,)
        tie_lo = tie_lo + (tie & 4095,)
        thresholds = thresholds + (tl.load(cut_ptr + t * 2 * K + k),)
        below = below + (tl.load(cut_ptr + t * 2 * K + K + k),)
    _merge_program(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_hi, tie_lo, scales,
                   tall_lambdas, base_ptr, recips_ptr, (pid - tl.load(first_ptr + t)) * BLOCK, n,
                   0, lam, total, votes_needed, K, TRIM, SCALE, ELECT, NORMALIZE, CONSENSUS,
                   DIVIDE, ROUND_BF16, BLOCK)


@triton.jit
def _at(like_ptr, offset):
    """``like_ptr + offset`` where the offset is a whole number of 16-byte units (the hint
    keeps the loads and stores 16 bytes wide)."""
    return like_ptr + tl.multiple_of(offset, 128 // like_ptr.dtype.element_ty.primitive_bitwidth)


@triton.jit
def _merge_program(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_hi, tie_lo, scales,
                   tall_lambdas, masks_ptr, recips_ptr, start, n, mask_stride, lam, total,
                   votes_needed, K: tl.constexpr, TRIM: tl.constexpr, SCALE: tl.constexpr,
                   ELECT: tl.constexpr, NORMALIZE: tl.constexpr, CONSENSUS: tl.constexpr,
                   DIVIDE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """One program of the merge kernels: the entries [start, start + BLOCK) of one tensor.
    Blocks that are whole and hold no input's tie end (all but a few) take a path without
    per-entry bounds checks or tie-end compares."""
    plain = start + BLOCK <= n
    if TRIM:
        for t in tl.static_range(K):
            tied = _joined(tie_hi[t], tie_lo[t]) - start
            plain = plain & ((tied <= 0) | (tied >= BLOCK))
    if plain:
        _merge_block(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_hi, tie_lo,
                     scales, tall_lambdas, masks_ptr, recips_ptr, start, n, mask_stride, lam,
                     total, votes_needed, K, TRIM, SCALE, ELECT, NORMALIZE, CONSENSUS, DIVIDE,
                     ROUND_BF16, BLOCK, True)
    else:
        _merge_block(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_hi, tie_lo,
                     scales, tall_lambdas, masks_ptr, recips_ptr, start, n, mask_stride, lam,
                     total, votes_needed, K, TRIM, SCALE, ELECT, NORMALIZE, CONSENSUS, DIVIDE,
                     ROUND_BF16, BLOCK, False)


@triton.jit
def _merge_block(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_hi, tie_lo, scales,
                 tall_lambdas, masks_ptr, recips_ptr, start, n, mask_stride, lam, total,
                 votes_needed, K: tl.constexpr, TRIM: tl.constexpr, SCALE: tl.constexpr,
                 ELECT: tl.constexpr, NORMALIZE: tl.constexpr, CONSENSUS: tl.constexpr,
                 DIVIDE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
                 PLAIN: tl.constexpr):
    """:func:`_merge_kernel` on the entries [start, start + BLOCK); PLAIN: all of them exist
    and no input's tie end falls inside (each input's cut is then one value for the block)."""
    local = tl.arange(0, BLOCK)
    off = start + local
    if PLAIN:
        m = tl.full([BLOCK], 1, tl.int1)
    else:
        m = off < n
    b = tl.load(base_ptr + off, mask=m, other=0).to(tl.float32)
    taus = ()
    ds = ()
    for t in tl.static_range(K):
        tau = tl.load(thetas[t] + off, mask=m, other=0).to(tl.float32) - b
        taus = taus + (tau,)
        d = tau
        if TRIM:
            tied = tl.minimum(tl.maximum(_joined(tie_hi[t], tie_lo[t]) - start, 0), BLOCK)
            if PLAIN:
                cut = tl.where(tied > 0, below[t], thresholds[t])
            else:
                cut = tl.where(local < tied.to(tl.int32), below[t], thresholds[t])
            d = tl.where(tl.abs(d) > cut, d, 0.0)
        if SCALE:
            d = d * scales[t]
        ds = ds + (d * weights[t],)
    mixed = tl.zeros([BLOCK], tl.float32)
    if ELECT == 0:
        for t in tl.static_range(K):
            mixed += ds[t]
        if NORMALIZE:
            mixed = tl.math.div_rn(mixed, tl.zeros([BLOCK], tl.float32) + total)
    else:
        score = tl.zeros([BLOCK], tl.float32)
        for t in tl.static_range(K):
            if ELECT == 1:
                score += ds[t]
            else:
                score += tl.where(ds[t] > 0, 1.0, tl.where(ds[t] < 0, -1.0, 0.0))
        sign = tl.where(score >= 0, 1.0, -1.0)
        divisor = tl.zeros([BLOCK], tl.float32)
        agreeing = tl.zeros([BLOCK], tl.int32)
        for t in tl.static_range(K):
            agree = ds[t] * sign > 0  # ds > 0 where the elected sign is +, ds < 0 where it is -
            mixed += tl.where(agree, ds[t], 0.0)
            if DIVIDE == 1:
                agreeing += tl.where(agree, 1 << t, 0)
            else:
                divisor += tl.where(agree, weights[t], 0.0)
        if NORMALIZE:
            if DIVIDE == 1:
                mixed = (mixed.to(tl.float64) * tl.load(recips_ptr + agreeing)).to(tl.float32)
            elif DIVIDE == 2:
                mixed = _quotient(mixed, tl.where(divisor == 0, 1.0, divisor))
            else:
                mixed = tl.math.div_rn(mixed, tl.where(divisor == 0, 1.0, divisor))
    if CONSENSUS != 0:
        votes = tl.zeros([BLOCK], tl.int32)
        for t in tl.static_range(K):
            if CONSENSUS == 1:  # task t's vector as τm sums it: wt·τt (÷ Σ wt, normalized TA)
                x = taus[t] * weights[t]
                if ELECT == 0 and NORMALIZE:
                    x = tl.math.div_rn(x, tl.zeros([BLOCK], tl.float32) + total)
                keep = tl.abs(x) > tall_lambdas[t] * tl.abs(mixed - x)
            else:
                keep = _packed_bit(masks_ptr + t * mask_stride, off, m)
            votes += keep.to(tl.int32)
        mixed = tl.where(votes >= votes_needed, mixed, 0.0)
    _store(out_ptr, off, b + lam * mixed, m, ROUND_BF16)


#: the disjoint mean divides by a table of reciprocals for up to this many inputs (2^K float64)
RECIPROCAL_TABLE_K = 8


@functools.lru_cache(maxsize=64)
def _reciprocals(weights: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """float64 [2^K] on ``device``: entry i is RN64(1 / b_i), b_i the disjoint mean's divisor
    where the inputs t with bit t of i set agree: their float32 weights summed in order in
    float32 (as the kernel and the reference sum them), 1 where that is 0.

    Why the kernel's RN32(a · table[i]) is a correctly rounded a / b_i for every float32 a:
    a/b is never within a relative 2^-49 of a midpoint between two float32 values (see
    :func:`_quotient`), and a·y in float64, y within 2^-53 of 1/b, lands within 2^-52 of a/b,
    so on the same side of every midpoint; float64 holds every such product without overflow
    or underflow (|a| and 1/|b| are float32-sized)."""
    w32 = [np.float32(w) for w in weights]
    sums = np.zeros(1 << len(weights), dtype=np.float32)
    for i in range(1, sums.size):
        total = np.float32(0)
        for t, w in enumerate(w32):
            if i >> t & 1:
                total = np.float32(total + w)
        sums[i] = total
    divisors = np.where(sums == 0, np.float32(1), sums).astype(np.float64)
    return torch.from_numpy(1.0 / divisors).to(device)


def _float32_below(value: float) -> float:
    """The largest float32 below the float32 ``value`` (-inf stays -inf, NaN stays NaN)."""
    if math.isnan(value) or value == -math.inf:
        return value
    if value == 0:
        return -2.0 ** -149
    bits = struct.unpack("<i", struct.pack("<f", value))[0]
    return struct.unpack("<f", struct.pack("<i", bits - 1 if value > 0 else bits + 1))[0]


def _division(weights: list[float], k: int, elect: int, normalize: bool,
              device: torch.device) -> tuple[int, torch.Tensor | None]:
    """The disjoint mean's DIVIDE mode and reciprocal table: a table of reciprocals for up to
    RECIPROCAL_TABLE_K inputs, :func:`_quotient` beyond that when every weight is positive and
    their sums stay in its range, ``div_rn`` otherwise."""
    if elect and normalize and k <= RECIPROCAL_TABLE_K:
        return 1, _reciprocals(tuple(weights), device)
    if min(weights) >= 2.0 ** -100 and math.fsum(weights) <= 2.0 ** 99:
        return 2, None
    return 0, None


def merge(base: torch.Tensor, thetas: list[torch.Tensor], out: torch.Tensor,
          coef: list[list[float]], masks: torch.Tensor | None, lam: float, total: float,
          votes_needed: int, *, trim: bool, scale: bool, elect: int, normalize: bool,
          consensus: int) -> None:
    """Launch :func:`_merge_kernel` over flat contiguous tensors (checked by the caller);
    ``coef``: weights, thresholds, tie ends (as :func:`split_ints`' two halves), scales and
    TALL lambdas, K of each."""
    n = base.numel()
    weights, thresholds = [float(w) for w in coef[0]], [float(c) for c in coef[1]]
    below = [_float32_below(c) for c in thresholds]
    divide, recips = _division(weights, len(thetas), elect, normalize, base.device)
    grid = (triton.cdiv(n, MERGE_BLOCK),)
    _merge_kernel[grid](
        base, tuple(thetas), out, tuple(weights), tuple(thresholds), tuple(below),
        *(tuple(map(float, c)) for c in coef[2:]), masks if masks is not None else base,
        base if recips is None else recips,
        n, masks.shape[1] if masks is not None else 0, lam, total, votes_needed,
        K=len(thetas), TRIM=trim, SCALE=scale, ELECT=elect, NORMALIZE=normalize,
        CONSENSUS=consensus, DIVIDE=divide,
        ROUND_BF16=_INTERPRETED and out.dtype == torch.bfloat16, BLOCK=MERGE_BLOCK,
        num_warps=MERGE_WARPS, **_FAST)


def merge_many(bases: list[torch.Tensor], thetas: list[list[torch.Tensor]],
               outs: list[torch.Tensor], cuts: list[list[tuple[float, int]]],
               weights: list[float], scales: list[float], tall_lambdas: list[float], lam: float,
               total: float, votes_needed: int, *, trim: bool, scale: bool, elect: int,
               normalize: bool, consensus: int) -> Callable[[list[torch.Tensor]], None]:
    """Launch :func:`_merge_many_kernel` once over the tensors ``bases[i]``, ``thetas[i]``
    (K each) -> ``outs[i]`` (any shape): contiguous, not empty, starting on 16 bytes, one dtype
    per role (the base, each input, the output), checked by the caller; ``cuts[i]``: each
    input's (threshold, tie end). Everything else as :func:`merge`, one value for all tensors.

    Returns a function that launches the same merges again given the first tensor of each
    role (``[bases[0], *thetas[0], outs[0]]``): valid while every tensor is where it was."""
    k = len(weights)
    roles = [bases, *zip(*thetas), outs]
    likes = [xs[0] for xs in roles]
    rows, floats, first, programs = [], [], [], 0
    for i, n in enumerate(b.numel() for b in bases):
        off = [(xs[i].data_ptr() - like.data_ptr()) // like.element_size()
               for xs, like in zip(roles, likes)]
        rows += [off[0], off[-1], n, *off[1:-1], *(tie for _, tie in cuts[i])]
        floats += [c for c, _ in cuts[i]] + [_float32_below(c) for c, _ in cuts[i]]
        first.append(programs)
        programs += triton.cdiv(n, MERGE_BLOCK)
    log_t = max(1, (len(bases) - 1).bit_length())
    first += [programs] * ((1 << log_t) - len(first))
    device = bases[0].device
    divide, recips = _division(weights, k, elect, normalize, device)
    tables = (torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True),
              torch.tensor(floats, dtype=torch.float32).to(device, non_blocking=True),
              torch.tensor(first, dtype=torch.int64).to(device, non_blocking=True))
    coefficients = (tuple(map(float, weights)), tuple(map(float, scales)),
                    tuple(map(float, tall_lambdas)))
    round_bf16 = _INTERPRETED and outs[0].dtype == torch.bfloat16

    def launch(likes: list[torch.Tensor]) -> None:
        _merge_many_kernel[(programs,)](
            likes[0], tuple(likes[1:-1]), likes[-1], *tables, *coefficients,
            likes[0] if recips is None else recips, lam, total, votes_needed,
            K=k, TRIM=trim, SCALE=scale, ELECT=elect, NORMALIZE=normalize,
            CONSENSUS=consensus, DIVIDE=divide, ROUND_BF16=round_bf16, BLOCK=MERGE_BLOCK,
            LOG_T=log_t, num_warps=MERGE_WARPS, **_FAST)

    launch(likes)
    return launch


#: sample histograms: by the 8-bit prefix of |τ|'s float bits (its sign bit is always 0), then
#: by the next 7 bits within the prefix that holds a bracket's end
_COARSE, _FINE = tl.constexpr(1 << 8), tl.constexpr(1 << 7)
_INF = tl.constexpr(0x7F800000)  # float bits of inf: the top of a bracket with no upper end
_SLOT = tl.constexpr(16)  # int64 words between two slots' counters (their own 128-byte line)


@triton.jit
def _pick(h, rank):
    """The bin of histogram ``h`` (ascending keys) that holds the rank-th largest key, and the
    rank left within that bin."""
    bins = tl.arange(0, h.shape[0])
    at_least = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys in each bin or above
    sel = tl.sum((at_least >= rank).to(tl.int32), 0) - 1
    return sel, rank - tl.sum(tl.where(bins > sel, h, 0), 0)


@triton.jit
def _of_input(values, t, K: tl.constexpr):
    """values[t] for a run-time t (a tuple of K scalars or pointers)."""
    v = values[0]
    for u in tl.static_range(1, K):
        v = tl.where(t == u, values[u], v)
    return v


@triton.jit
def _digit_histogram(keys, ok, q, shift, low, D: tl.constexpr):
    """Histogram of the D-bit digit (bits low..shift) of the keys in ``ok`` (those that match
    the prefix q above ``shift``); the others are counted into bin 0 and taken out again."""
    h = tl.histogram(tl.where(ok, (keys >> low) - (q << (shift - low)), 0), 1 << D)
    return h - tl.where(tl.arange(0, 1 << D) == 0, tl.sum(tl.where(ok, 0, 1), 0), 0)


@triton.jit(do_not_specialize=["n", "m", "stride"])
def _sample_kernel(base_ptr, thetas, scratch_ptr, coarse_ptr, n, m, stride, K: tl.constexpr,
                   SB: tl.constexpr, CHUNK: tl.constexpr):
    # Program (j, t): |τt| float bits at sample values [j·CHUNK, (j + 1)·CHUNK) (blocks of SB
    # elements, ``stride`` apart; -1 past the sample) into scratch, and their histogram by the
    # 8-bit prefix added with one atomic per bin.
    t = tl.program_id(1)
    s = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    src = tl.cast(s // SB, tl.int64) * stride + s % SB
    ok = (s < m) & (src < n)
    theta = _of_input(thetas, t, K)
    a = tl.abs(tl.load(theta + src, mask=ok, other=0).to(tl.float32)
               - tl.load(base_ptr + src, mask=ok, other=0).to(tl.float32))
    key = tl.where(ok, a.to(tl.int32, bitcast=True), -1)
    tl.store(scratch_ptr + t * tl.num_programs(0) * CHUNK + s, key)
    h = _digit_histogram(key, ok, 0, 31, 23, 8)
    tl.atomic_add(coarse_ptr + t * _COARSE + tl.arange(0, _COARSE), h, mask=h > 0, sem="relaxed")


@triton.jit
def _coarse_end(coarse_ptr, his, los, t, m, K: tl.constexpr, e: tl.constexpr):
    """End e (0: upper, 1: lower) of input t's bracket: its sample rank (0 = the largest;
    from ``his`` / ``los``, K floats each), the 8-bit prefix holding it and the rank left
    within that prefix."""
    if e == 0:
        idx = _of_input(his, t, K).to(tl.int32)
    else:
        idx = _of_input(los, t, K).to(tl.int32)
    coarse = tl.load(coarse_ptr + t * _COARSE + tl.arange(0, _COARSE))
    c, left = _pick(coarse, tl.minimum(tl.maximum(idx + 1, 1), m))
    return idx, c, left


@triton.jit(do_not_specialize=["m"])
def _fine_kernel(scratch_ptr, coarse_ptr, his, los, fine_ptr, m, K: tl.constexpr,
                 CHUNK: tl.constexpr):
    # Program (j, t), per bracket end: the histogram of the next 7 bits of the sample values
    # whose 8-bit prefix holds that end.
    t = tl.program_id(1)
    s = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    key = tl.load(scratch_ptr + t * tl.num_programs(0) * CHUNK + s)
    for e in tl.static_range(2):
        _, c, _ = _coarse_end(coarse_ptr, his, los, t, m, K, e)
        h = _digit_histogram(key, (key >= 0) & ((key >> 23) == c), c, 23, 16, 7)
        tl.atomic_add(fine_ptr + (2 * t + e) * _FINE + tl.arange(0, _FINE), h, mask=h > 0,
                      sem="relaxed")


@triton.jit(do_not_specialize=["m"])
def _bracket_kernel(coarse_ptr, fine_ptr, his, los, state_ptr, m, K: tl.constexpr):
    # Program t: input t's bracket (lo, hi] as float bits: lo = the bottom of the 16-bit prefix
    # holding the sample's lo_idx-th largest value (-1: no lower end), hi = the top of the one
    # holding its hi_idx-th (inf: no upper end), and that prefix's bottom vhi (-2: none, or lo).
    # The few values of bf16 differences sit at prefixes' bottoms; values at lo and at vhi are
    # counted, not kept as candidates, so a tie at either end cannot overflow the lists.
    t = tl.program_id(0)
    ends = ()
    for e in tl.static_range(2):
        idx, c, left = _coarse_end(coarse_ptr, his, los, t, m, K, e)
        f, _ = _pick(tl.load(fine_ptr + (2 * t + e) * _FINE + tl.arange(0, _FINE)), left)
        ends = ends + (idx, (c << 7) + f)
    lo = tl.where(ends[2] < m, ends[3] << 16, -1)
    tl.store(state_ptr + t * 3, lo)
    tl.store(state_ptr + t * 3 + 1, tl.where(ends[0] >= 0, ((ends[1] + 1) << 16) - 1, _INF))
    tl.store(state_ptr + t * 3 + 2, tl.where((ends[0] >= 0) & (ends[1] << 16 != lo),
                                             ends[1] << 16, -2))


@triton.jit
def _low32(x):
    return x - ((x >> 32) << 32)


@triton.jit(do_not_specialize=["n", "room"])
def _bracket_pass(base_ptr, thetas, state_ptr, slots_ptr, cand_ptr, n, room, K: tl.constexpr,
                  SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    # Per input: count |τ| above the bracket, at its lower end and at vhi, and append the keys
    # bits − lo − 1 of the others inside it to the list of slot (program id mod SLOTS), whose
    # counters (inside | at_lo << 32, above | at_vhi << 32) take one relaxed atomic each per
    # program; SLOTS lists spread the atomics over as many addresses. |τ| >= 0: its float bits
    # order like it.
    pid = tl.program_id(0)
    off = tl.cast(pid, tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < n
    b = tl.load(base_ptr + off, mask=ok, other=0).to(tl.float32)
    slot = pid % SLOTS
    for t in tl.static_range(K):
        lo = tl.load(state_ptr + 3 * t)
        hi = tl.load(state_ptr + 3 * t + 1)
        vhi = tl.load(state_ptr + 3 * t + 2)
        bits = tl.abs(tl.load(thetas[t] + off, mask=ok, other=0).to(tl.float32) - b).to(
            tl.int32, bitcast=True)
        at_vhi = ok & (bits == vhi)
        inside = ok & (bits > lo) & (bits <= hi) & (at_vhi == 0)
        counters = slots_ptr + (t * SLOTS + slot) * _SLOT
        at = tl.sum(tl.where(ok & (bits == lo), 1, 0) + tl.where(at_vhi, 1 << 16, 0), 0)
        start = _low32(tl.atomic_add(counters, tl.sum(inside.to(tl.int32), 0).to(tl.int64)
                                     + ((at & 0xFFFF).to(tl.int64) << 32), sem="relaxed"))
        tl.atomic_add(counters + 1, tl.sum((ok & (bits > hi)).to(tl.int32), 0)
                      + ((at >> 16).to(tl.int64) << 32), sem="relaxed")
        rows = tl.reshape(inside.to(tl.int32), (BLOCK // 16, 16))  # a 2-D scan: rows of 16
        per_row = tl.sum(rows, 1)
        pos = start + tl.cumsum(per_row, 0)[:, None] - per_row[:, None] + tl.cumsum(rows, 1) - 1
        tl.store(cand_ptr + tl.cast(t * SLOTS + slot, tl.int64) * room + pos,
                 tl.reshape(bits - lo - 1, (BLOCK // 16, 16)), mask=(rows > 0) & (pos < room))


@triton.jit
def _totals(state_ptr, slots_ptr, t, room, SLOTS: tl.constexpr):
    """Input t's bracket (lo, hi, vhi) and counts over all slots (above, inside, at_lo,
    at_vhi), and whether a list overflowed."""
    counters = slots_ptr + (t * SLOTS + tl.arange(0, SLOTS)) * _SLOT
    lists = tl.load(counters)
    full = tl.max(_low32(lists), 0) > room
    lists = tl.sum(lists, 0)
    others = tl.sum(tl.load(counters + 1), 0)
    return (tl.load(state_ptr + 3 * t), tl.load(state_ptr + 3 * t + 1),
            tl.load(state_ptr + 3 * t + 2), _low32(others), _low32(lists), lists >> 32,
            others >> 32, full)


@triton.jit
def _descend(hist_row, round_stride, lo, hi, vhi, at_vhi, rank, ROUNDS: tl.constexpr,
             D: tl.constexpr):
    """Radix select over the first ``ROUNDS`` digit histograms (D bits each, from the top of
    the keys' bit length), with the at_vhi values at vhi (counted, not listed) added to the
    bin of their key: the key prefix that holds the rank-th largest key, the rank left within
    it, the bits below the prefix (0: the key is found) and the count of keys under that
    prefix (-1 if no round had digits to select: every key is the same)."""
    x = tl.maximum(hi - lo - 1, 0)  # the largest key; its bit length, exact through float64:
    width = tl.where(x > 0, ((x.to(tl.float64).to(tl.int64, bitcast=True) >> 52) - 1022).to(
        tl.int32), 0)
    kv = vhi - lo - 1
    q = width * 0
    shift = width
    count = (rank * 0 - 1).to(tl.int64)
    for r in tl.static_range(ROUNDS):
        low = tl.maximum(shift - D, 0)
        h = tl.load(hist_row + r * round_stride + tl.arange(0, 1 << D))
        h += tl.where((vhi > lo) & ((kv >> shift) == q)
                      & (tl.arange(0, 1 << D) == (kv >> low) - (q << (shift - low))), at_vhi, 0)
        sel, left = _pick(h, rank)
        active = shift > 0
        q = tl.where(active, (q << (shift - low)) + sel, q)
        rank = tl.where(active, left, rank)
        count = tl.where(active, tl.sum(tl.where(tl.arange(0, 1 << D) == sel, h, 0), 0).to(
            tl.int64), count)
        shift = tl.where(active, low, shift)
    return q, rank, shift, count


@triton.jit(do_not_specialize=["room"])
def _radix_round(state_ptr, k_hi, k_lo, slots_ptr, cand_ptr, hist_ptr, room, K: tl.constexpr,
                 SLOTS: tl.constexpr, ROUND: tl.constexpr, D: tl.constexpr,
                 CHUNK: tl.constexpr):
    # Program (slot, t): the next D-bit digit's histogram of input t's candidate keys in this
    # slot's list that match the prefix chosen so far (k per input = k_hi·4096 + k_lo).
    slot = tl.program_id(0)
    t = tl.program_id(1)
    lo, hi, vhi, above, inside, at_lo, at_vhi, full = _totals(state_ptr, slots_ptr, t, room,
                                                              SLOTS)
    rank = _rank(k_hi, k_lo, t, K) - above
    hist_row = hist_ptr + t * (1 << D)
    ok = (rank >= 1) & (rank <= inside + at_vhi) & (full == 0)
    q, rank, shift, _ = _descend(hist_row, K * (1 << D), lo, hi, vhi, at_vhi, rank, ROUND, D)
    if ok & (shift > 0):
        low = tl.maximum(shift - D, 0)
        keys_ptr = cand_ptr + tl.cast(t * SLOTS + slot, tl.int64) * room
        count = tl.minimum(_low32(tl.load(slots_ptr + (t * SLOTS + slot) * _SLOT)), room).to(
            tl.int32)
        h = tl.zeros([1 << D], tl.int32)
        for c in range(0, count, CHUNK):
            j = c + tl.arange(0, CHUNK)
            keys = tl.load(keys_ptr + j, mask=j < count, other=0)
            h += _digit_histogram(keys, (j < count) & ((keys >> shift) == q), q, shift, low, D)
        tl.atomic_add(hist_row + ROUND * K * (1 << D) + tl.arange(0, 1 << D), h, mask=h > 0,
                      sem="relaxed")


def split_ints(values: list[int]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Non-negative integers below 2^36 as two tuples of exact floats, v // 4096 and v % 4096,
    for kernel arguments that differ per tensor (Triton specializes int arguments on their
    values, so ints would compile the kernel anew for many of them)."""
    return tuple(float(v // 4096) for v in values), tuple(float(v % 4096) for v in values)


@triton.jit
def _joined(hi, lo):
    """The integer :func:`split_ints` passed as ``hi`` and ``lo``."""
    return tl.cast(hi, tl.int64) * 4096 + tl.cast(lo, tl.int64)


@triton.jit
def _rank(k_hi, k_lo, t, K: tl.constexpr):
    """k of input t (:func:`split_ints`), for a run-time t."""
    return _joined(_of_input(k_hi, t, K), _of_input(k_lo, t, K))


@triton.jit(do_not_specialize=["room"])
def _radix_finish(state_ptr, k_hi, k_lo, slots_ptr, hist_ptr, out_ptr, ties_ptr, room,
                  K: tl.constexpr,
                  SLOTS: tl.constexpr, ROUNDS: tl.constexpr, D: tl.constexpr):
    # Program t: input t's k-th largest |τ| (NaN where the bracket missed or a candidate list
    # overflowed): a candidate or vhi, or the bracket's lower end, by rank; and into ties_ptr
    # (int64 [K, 2]) how many entries equal to it the top k holds and how many there are.
    t = tl.program_id(0)
    lo, hi, vhi, above, inside, at_lo, at_vhi, full = _totals(state_ptr, slots_ptr, t, room,
                                                              SLOTS)
    rank = _rank(k_hi, k_lo, t, K) - above
    q, left, _, count = _descend(hist_ptr + t * (1 << D), K * (1 << D), lo, hi, vhi, at_vhi,
                                 rank, ROUNDS, D)
    mid = inside + at_vhi
    in_mid = (rank >= 1) & (rank <= mid) & (full == 0)
    in_lo = (rank > mid) & (rank <= mid + at_lo)
    bits = tl.where(in_mid, lo + 1 + q, lo)
    tl.store(out_ptr + t, tl.where(in_mid | in_lo, bits.to(tl.float32, bitcast=True),
                                   float("nan")))
    tl.store(ties_ptr + 2 * t, tl.where(in_mid, left, rank - mid))
    tl.store(ties_ptr + 2 * t + 1, tl.where(in_mid, tl.where(count < 0, mid, count), at_lo))


def select(base: torch.Tensor, thetas: list[torch.Tensor], ks: list[int], sample_block: int,
           sample_stride: int, sample_size: int, bracket: list[tuple[int, int]],
           room: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each input's exact k-th largest |θt − base| (flat contiguous tensors) as float32 [K],
    NaN where its bracket missed or its candidates overflowed, and int64 [K, 2]: how many of
    the entries equal to it are among the k largest, and how many there are; all on the
    device, with no host synchronization and no host-to-device copy (per-input integers travel
    as exact floats).

    ``sample_size`` values in blocks of ``sample_block``, ``sample_stride`` elements apart, are
    histogrammed by the 16-bit prefixes of their float bits; ``bracket[t]`` = (hi_idx, lo_idx)
    are the sample ranks (0 = largest) whose prefixes bound the bracket (-1 / sample_size: no
    such end). One pass over base and thetas counts the values above the bracket, at its lower
    end and at the bottom of its top prefix, and appends the keys of the others inside it to
    SELECT_SLOTS lists per input (``room`` candidates in all); a radix select over those
    (RADIX_BITS-bit digits; per-program ``tl.histogram``, then one atomic per bin) finds the
    k-th. The sample and radix steps are small launches (about 3 µs each on an H100); the pass
    is the cost: counting alone runs at ~75% of copy bandwidth, the candidates' compaction (a
    block scan) takes it to ~30%.
    """
    n, nk, dev = base.numel(), len(thetas), base.device
    rounds, bins = -(-31 // RADIX_BITS), 1 << RADIX_BITS
    blocks = triton.cdiv(n, SELECT_BLOCK)
    slots = min(SELECT_SLOTS, triton.next_power_of_2(blocks))
    room = triton.cdiv(room * triton.cdiv(blocks, slots), blocks) + LIST_SLACK  # a list's share
    k_hi, k_lo = split_ints(ks)
    his, los = (tuple(float(b[e]) for b in bracket) for e in (0, 1))
    ints = nk * (2 * _FINE + _COARSE + rounds * bins + 3)
    zeroed = torch.zeros(nk * slots * _SLOT + ints // 2 + 1, dtype=torch.int64,
                         device=dev)
    counters = zeroed[:nk * slots * _SLOT]
    fine, coarse, hist, state = zeroed[nk * slots * _SLOT:].view(torch.int32)[:ints].split(
        [nk * 2 * _FINE, nk * _COARSE, nk * rounds * bins, nk * 3])
    chunks = triton.cdiv(sample_size, SAMPLE_CHUNK)
    scratch = torch.empty(nk * chunks * SAMPLE_CHUNK, dtype=torch.int32, device=dev)
    _sample_kernel[(chunks, nk)](
        base, tuple(thetas), scratch, coarse, n, sample_size, sample_stride, K=nk,
        SB=sample_block, CHUNK=SAMPLE_CHUNK, num_warps=4)
    _fine_kernel[(chunks, nk)](scratch, coarse, his, los, fine, sample_size, K=nk,
                               CHUNK=SAMPLE_CHUNK, num_warps=4)
    _bracket_kernel[(nk,)](coarse, fine, his, los, state, sample_size, K=nk, num_warps=4)
    cand = torch.empty(nk * slots * room, dtype=torch.int32, device=dev)
    _bracket_pass[(blocks,)](
        base, tuple(thetas), state, counters, cand, n, room, K=nk, SLOTS=slots,
        BLOCK=SELECT_BLOCK, num_warps=SELECT_WARPS)
    for r in range(rounds):
        _radix_round[(slots, nk)](
            state, k_hi, k_lo, counters, cand, hist, room, K=nk, SLOTS=slots, ROUND=r,
            D=RADIX_BITS, CHUNK=RADIX_CHUNK, num_warps=RADIX_WARPS)
    out = torch.empty(nk, dtype=torch.float32, device=dev)
    ties = torch.empty(nk, 2, dtype=torch.int64, device=dev)
    _radix_finish[(nk,)](state, k_hi, k_lo, counters, hist, out, ties, room, K=nk,
                         SLOTS=slots, ROUNDS=rounds, D=RADIX_BITS, num_warps=4)
    return out, ties


COUNT_BLOCK = 1024  # count_equal: entries per program


@triton.jit(do_not_specialize=["n", "blocks"])
def _count_equal_kernel(base_ptr, thetas, values, counts_ptr, n, blocks, K: tl.constexpr,
                        BLOCK: tl.constexpr):
    # Program j, per input t: how many of entries [j·BLOCK, (j + 1)·BLOCK) have |τt| == values[t].
    j = tl.program_id(0)
    off = j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < n
    b = tl.load(base_ptr + off, mask=ok, other=0).to(tl.float32)
    for t in tl.static_range(K):
        a = tl.abs(tl.load(thetas[t] + off, mask=ok, other=0).to(tl.float32) - b)
        tl.store(counts_ptr + t * blocks + j, tl.sum((ok & (a == values[t])).to(tl.int32), 0))


def count_equal(base: torch.Tensor, thetas: list[torch.Tensor], values: list[float]) -> torch.Tensor:
    """int32 [K, blocks]: per input and block of COUNT_BLOCK entries (flat contiguous tensors),
    the entries with |θt − base| == values[t], in one pass."""
    n, nk = base.numel(), len(thetas)
    blocks = triton.cdiv(n, COUNT_BLOCK)
    counts = torch.empty(nk, blocks, dtype=torch.int32, device=base.device)
    _count_equal_kernel[(blocks,)](base, tuple(thetas), tuple(map(float, values)), counts, n,
                                   blocks, K=nk, BLOCK=COUNT_BLOCK, num_warps=4)
    return counts


@triton.jit
def _sample_histogram(keys, ok, hist_ptr, k_hi, k_lo, t, ROUND: tl.constexpr, K: tl.constexpr,
                      D: tl.constexpr):
    """Add to input t's round-``ROUND`` histogram the D-bit digits of those ``keys`` (in ``ok``)
    that match the prefix the earlier rounds chose for its k-th largest."""
    hist_row = hist_ptr + t * (1 << D)
    q, _, shift, _ = _descend(hist_row, K * (1 << D), -1, _INF, -2, 0, _rank(k_hi, k_lo, t, K),
                              ROUND, D)
    low = tl.maximum(shift - D, 0)
    h = _digit_histogram(keys, ok & ((keys >> shift) == q), q, shift, low, D)
    tl.atomic_add(hist_row + ROUND * K * (1 << D) + tl.arange(0, 1 << D), h, mask=h > 0,
                  sem="relaxed")


@triton.jit(do_not_specialize=["size"])
def _sample_gather(base_ptr, thetas, positions_ptr, keys_ptr, hist_ptr, k_hi, k_lo, size,
                   K: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    # Program j: sample values [j·BLOCK, (j + 1)·BLOCK) (flat positions); per input, |τt|'s
    # float bits there into keys[t] and their first digit's histogram.
    s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = s < size
    src = tl.load(positions_ptr + s, mask=ok, other=0)
    b = tl.load(base_ptr + src, mask=ok, other=0).to(tl.float32)
    for t in tl.static_range(K):
        keys = tl.abs(tl.load(thetas[t] + src, mask=ok, other=0).to(tl.float32) - b).to(
            tl.int32, bitcast=True)
        tl.store(keys_ptr + t * size + s, keys, mask=ok)
        _sample_histogram(keys, ok, hist_ptr, k_hi, k_lo, t, 0, K, D)


@triton.jit(do_not_specialize=["size"])
def _sample_round(keys_ptr, hist_ptr, k_hi, k_lo, size, K: tl.constexpr, ROUND: tl.constexpr,
                  D: tl.constexpr, BLOCK: tl.constexpr):
    # Program (j, t): round ROUND's histogram of input t's keys [j·BLOCK, (j + 1)·BLOCK).
    t = tl.program_id(1)
    s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = s < size
    keys = tl.load(keys_ptr + t.to(tl.int64) * size + s, mask=ok, other=0)
    _sample_histogram(keys, ok, hist_ptr, k_hi, k_lo, t, ROUND, K, D)


@triton.jit
def _sample_finish(hist_ptr, k_hi, k_lo, out_ptr, K: tl.constexpr, ROUNDS: tl.constexpr,
                   D: tl.constexpr):
    # Program t: input t's k-th largest sampled |τ|, the key all ROUNDS digits spell.
    t = tl.program_id(0)
    q, _, _, _ = _descend(hist_ptr + t * (1 << D), K * (1 << D), -1, _INF, -2, 0,
                          _rank(k_hi, k_lo, t, K), ROUNDS, D)
    tl.store(out_ptr + t, q.to(tl.float32, bitcast=True))


def sample_select(base: torch.Tensor, thetas: list[torch.Tensor], positions: torch.Tensor,
                  ks: list[int]) -> torch.Tensor:
    """Each input's exact k-th largest |θt − base| over the values at ``positions`` (flat
    positions into the flat contiguous tensors), as float32 [K] on the device. One launch
    gathers the sample's keys (|τ|'s float bits) and histograms their first RADIX_BITS-bit digit;
    the next ones histogram the following digits of the keys under the prefix chosen so far; a
    last one reads the k-th off the histograms. No host synchronization."""
    nk, dev, size = len(thetas), base.device, positions.numel()
    rounds, bins = -(-31 // RADIX_BITS), 1 << RADIX_BITS
    k_hi, k_lo = split_ints(ks)
    hist = torch.zeros(rounds * nk * bins, dtype=torch.int32, device=dev)
    keys = torch.empty(nk * size, dtype=torch.int32, device=dev)
    blocks = triton.cdiv(size, SAMPLE_BLOCK_VALUES)
    _sample_gather[(blocks,)](
        base, tuple(thetas), positions, keys, hist, k_hi, k_lo, size, K=nk, D=RADIX_BITS,
        BLOCK=SAMPLE_BLOCK_VALUES, num_warps=4)
    for r in range(1, rounds):
        _sample_round[(blocks, nk)](keys, hist, k_hi, k_lo, size, K=nk, ROUND=r, D=RADIX_BITS,
                                    BLOCK=SAMPLE_BLOCK_VALUES, num_warps=4)
    out = torch.empty(nk, dtype=torch.float32, device=dev)
    _sample_finish[(nk,)](hist, k_hi, k_lo, out, K=nk, ROUNDS=rounds, D=RADIX_BITS,
                          num_warps=4)
    return out


@triton.jit
def _zo_direction(seed, first, eps, BLOCK: tl.constexpr):
    """d = eps·z for the BLOCK stream positions from ``first`` (a multiple of 4), z ~ N(0, 1):
    position p is normal p % 4 of the four ``tl.randn4x`` draws from Philox counter p // 4 (one
    Philox call per four values), with the lowest mantissa bit of d set (MeZO's ``_sticky``:
    keeps x + d off exact rounding ties)."""
    n0, n1, n2, n3 = tl.randn4x(seed, (first // 4 + tl.arange(0, BLOCK // 4)).to(tl.int32))
    z = tl.reshape(tl.join(tl.join(n0, n1), tl.join(n2, n3)), [BLOCK])
    d = z * eps
    return (d.to(tl.int32, bitcast=True) | 1).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["seed", "n", "start", "times"])
def _zo_kernel(x_ptr, d_ptr, n, start, seed, eps, times, update, WRITE_D: tl.constexpr,
               UPDATE: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    # Entries [pid·BLOCK, ...) of x (stream positions start + i): with WRITE_D store d; else
    # move x (:func:`_zo_block`).
    first = tl.program_id(0).to(tl.int64) * BLOCK
    if WRITE_D:
        i = first + tl.arange(0, BLOCK)
        tl.store(d_ptr + i, _zo_direction(seed, start + first, eps, BLOCK), mask=i < n)
    else:
        _zo_block(x_ptr, x_ptr, first, start + first, n, seed, eps, times, update, 0.0, 0, UPDATE,
                  OUT_BF16, BLOCK, False)


def zo(x: torch.Tensor | None, d: torch.Tensor | None, n: int, start: int, seed: int,
       eps: float, times: int, update: float | None) -> None:
    """Launch :func:`_zo_kernel` over ``n`` entries: fill ``d`` (float32) with the direction,
    or move the flat contiguous ``x`` in place."""
    target = d if x is None else x
    _zo_kernel[(triton.cdiv(n, ZO_BLOCK),)](
        target, target, n, start, seed, float(eps), times, float(update or 0.0),
        WRITE_D=x is None, UPDATE=update is not None, OUT_BF16=target.dtype == torch.bfloat16,
        BLOCK=ZO_BLOCK, num_warps=4, **_FAST)


#: many-tensor MeZO kernels: entries per program and warps of a move and of a quantile's
#: counting pass, and the bits of the quantile's radix digits
ZO_MANY_BLOCK, ZO_MANY_WARPS = 2048, 4
QUANTILE_BLOCK, QUANTILE_WARPS, QUANTILE_BITS = 4096, 4, 5


def _layout(xs: list[torch.Tensor], block: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """:func:`_layout_of` the tensors ``xs`` (one dtype, one of them not empty: the first such
    is the kernels' ``like_ptr``, :func:`_first`)."""
    return _layout_of(tuple((x.data_ptr(), x.numel()) for x in xs), xs[0].element_size(), block,
                      xs[0].device)


def _first(xs: list[torch.Tensor]) -> torch.Tensor:
    """The first tensor with entries: the one the many-tensor kernels address the others from."""
    return next(x for x in xs if x.numel())


@functools.lru_cache(maxsize=16)
def _layout_of(tensors: tuple[tuple[int, int], ...], size: int, block: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Programs over several flat tensors, ``block`` entries each, for the (data_ptr, numel)
    pairs ``tensors`` of ``size``-byte entries: int64 [T, 3] (where the tensor starts, in
    entries from the first non-empty one's start, so that the kernels address it from a
    pointer argument whose alignment Triton knows; its entries; the first byte of its packed
    bits: each tensor takes ceil(numel / 8) bytes, in order), int64 [2^log_t] (tensor t's
    first program, then the program count up to the power of two the search in
    :func:`_tensor_of` spans), the program count and log_t. It depends on addresses and sizes
    alone, so it is cached on them."""
    starts, meta, programs, nbytes = [], [], 0, 0
    origin = next(ptr for ptr, n in tensors if n)
    for ptr, n in tensors:
        meta.append(((ptr - origin) // size if n else 0, n, nbytes))
        starts.append(programs)
        programs += triton.cdiv(n, block)
        nbytes += triton.cdiv(n, 8)
    log_t = max(1, (len(tensors) - 1).bit_length())
    starts += [programs] * ((1 << log_t) - len(starts))
    return (torch.tensor(meta, dtype=torch.int64, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device), programs, log_t)


def _align(xs: list[torch.Tensor]) -> int:
    """Entries per 16 bytes if every tensor starts on 16 bytes, else 1 (``ALIGN``)."""
    return 16 // xs[0].element_size() if all(x.data_ptr() % 16 == 0 for x in xs if x.numel()) \
        else 1


@triton.jit
def _tensor_of(first_ptr, pid, LOG_T: tl.constexpr):
    """The tensor whose programs hold program ``pid``: the last t with first_ptr[t] <= pid, by
    binary search (LOG_T steps)."""
    t = pid * 0
    for j in tl.static_range(LOG_T):
        step = 1 << (LOG_T - 1 - j)
        t = tl.where(tl.load(first_ptr + t + step) <= pid, t + step, t)
    return t


@triton.jit
def _tensor_block(like_ptr, meta_ptr, first_ptr, LOG_T: tl.constexpr, BLOCK: tl.constexpr,
                  ALIGN: tl.constexpr):
    """This program's tensor t, a pointer to its entries (from ``like_ptr``, the first
    tensor's), the block's first entry, the tensor's entry count and the first byte of its
    packed bits."""
    pid = tl.program_id(0).to(tl.int64)
    t = _tensor_of(first_ptr, pid, LOG_T)
    # ALIGN: entries per 16 bytes where every tensor starts on 16 bytes (the loads can then be
    # 16 bytes wide), else 1
    offset = tl.multiple_of(tl.load(meta_ptr + 3 * t), ALIGN)
    start = (pid - tl.load(first_ptr + t)) * BLOCK
    return (t, like_ptr + offset, start, tl.load(meta_ptr + 3 * t + 1),
            tl.load(meta_ptr + 3 * t + 2))


@triton.jit
def _magnitude_key(x, KEY_BITS: tl.constexpr):
    """|x|'s bit pattern as a non-negative int32 (ordered like |x|, NaN above inf): the 15
    bits of a 16-bit float, the 31 of a float32."""
    if KEY_BITS == 15:
        return x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _smallest_prefix(hist_row, rank, ROUNDS: tl.constexpr, D: tl.constexpr):
    """Radix select from below over the first ROUNDS histograms of the keys' D-bit digits
    (from the top; round r's 2^D bins at hist_row + 2^D r): the digits of the rank-th smallest
    key those rounds fix."""
    q = (rank * 0).to(tl.int32)
    bins = tl.arange(0, 1 << D)
    for r in tl.static_range(ROUNDS):
        h = tl.load(hist_row + r * (1 << D) + bins)
        sel = tl.sum((tl.cumsum(h, 0) < rank).to(tl.int32), 0)
        rank = rank - tl.sum(tl.where(bins < sel, h, 0), 0)
        q = q * (1 << D) + sel
    return q


@triton.jit
def _quantile_counts(x_ptr, start, n, k, hist_row, ROUND: tl.constexpr, ROUNDS: tl.constexpr,
                     KEY_BITS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                     FULL: tl.constexpr):
    """Add this block's keys under the prefix the earlier rounds chose to the histogram of
    their next D-bit digit (round ROUND of hist_row; the digits of round r are the key's bits
    D (ROUNDS - 1 - r) and up)."""
    i = start + tl.arange(0, BLOCK)
    if FULL:
        x = tl.load(x_ptr + i)
        ok = tl.full([BLOCK], 1, tl.int1)
    else:
        ok = i < n
        x = tl.load(x_ptr + i, mask=ok, other=0)
    keys = _magnitude_key(x, KEY_BITS)
    low = D * (ROUNDS - 1 - ROUND)
    q = _smallest_prefix(hist_row, k, ROUND, D)
    if ROUND > 0:
        ok = ok & ((keys >> (low + D)) == q)
    h = _digit_histogram(keys, ok, q, low + D, low, D)
    tl.atomic_add(hist_row + ROUND * (1 << D) + tl.arange(0, 1 << D), h, mask=h > 0,
                  sem="relaxed")


@triton.jit
def _quantile_kernel(like_ptr, meta_ptr, first_ptr, ks_ptr, hist_ptr, LOG_T: tl.constexpr,
                     ROUND: tl.constexpr, ROUNDS: tl.constexpr, KEY_BITS: tl.constexpr,
                     D: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    # One counting round of the k-th smallest |x| of every tensor: each program histograms its
    # block's next digit into its tensor's row of int32 [T, ROUNDS, 2^D].
    t, x_ptr, start, n, _ = _tensor_block(like_ptr, meta_ptr, first_ptr, LOG_T, BLOCK, ALIGN)
    hist_row = hist_ptr + t * (ROUNDS << D)
    k = tl.load(ks_ptr + t)
    if start + BLOCK <= n:
        _quantile_counts(x_ptr, start, n, k, hist_row, ROUND, ROUNDS, KEY_BITS, D, BLOCK, True)
    else:
        _quantile_counts(x_ptr, start, n, k, hist_row, ROUND, ROUNDS, KEY_BITS, D, BLOCK,
                         False)


@triton.jit
def _quantile_finish(ks_ptr, hist_ptr, out_ptr, ROUNDS: tl.constexpr, KEY_BITS: tl.constexpr,
                     D: tl.constexpr, FP16: tl.constexpr):
    # Program t: the key all the rounds' digits spell, as the float32 value of |x|.
    t = tl.program_id(0)
    key = _smallest_prefix(hist_ptr + t * (ROUNDS << D), tl.load(ks_ptr + t), ROUNDS, D)
    if KEY_BITS == 31:
        value = key.to(tl.int32).to(tl.float32, bitcast=True)
    elif FP16:
        value = key.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        value = (key.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    tl.store(out_ptr + t, value)


def smallest_magnitudes(xs: list[torch.Tensor], ks: torch.Tensor) -> torch.Tensor:
    """float32 [T]: the ks[t]-th smallest |x| of each flat contiguous tensor (one dtype: bf16,
    fp16 or fp32; 1 <= k <= numel < 2^31; ``ks`` int64 on their device), exactly, on the
    device and with no host synchronization: a radix select over |x|'s bit patterns,
    QUANTILE_BITS a round, each round one pass over all the tensors that counts the next digit
    of the keys under the prefix chosen so far (3 rounds for 16-bit floats, 7 for float32 at
    5 bits), then one launch to read the keys off the histograms. Few bits a round, because
    ``tl.histogram``'s work per value grows with its bins (8-bit digits took 3.5 ms a round
    over 1.1B bf16 values on an H200, compute-bound; a round reads them in ~0.5 ms)."""
    dev = xs[0].device
    key_bits = 31 if xs[0].dtype == torch.float32 else 15
    digit = QUANTILE_BITS
    rounds = -(-key_bits // digit)
    meta, first, programs, log_t = _layout(xs, QUANTILE_BLOCK)
    hist = torch.zeros(len(xs) * (rounds << digit), dtype=torch.int32, device=dev)
    for r in range(rounds):
        _quantile_kernel[(programs,)](_first(xs), meta, first, ks, hist, LOG_T=log_t, ROUND=r,
                                      ROUNDS=rounds, KEY_BITS=key_bits, D=digit,
                                      BLOCK=QUANTILE_BLOCK, ALIGN=_align(xs),
                                      num_warps=QUANTILE_WARPS)
    out = torch.empty(len(xs), dtype=torch.float32, device=dev)
    _quantile_finish[(len(xs),)](ks, hist, out, ROUNDS=rounds, KEY_BITS=key_bits, D=digit,
                                 FP16=xs[0].dtype == torch.float16, num_warps=4)
    return out


@triton.jit
def _zo_block(x_ptr, bits_ptr, start, position, n, seed, eps, times, update, bound,
              MASK: tl.constexpr, UPDATE: tl.constexpr, OUT_BF16: tl.constexpr,
              BLOCK: tl.constexpr, FULL: tl.constexpr):
    """Entries [start, start + BLOCK) of x (below n; all of them with FULL), at stream
    positions from ``position``: add d ``times`` times (subtract for times < 0), rounding to
    x's dtype after each add as torch's in-place add does, then (UPDATE) add update·d once
    more; d is masked by |x| <= bound at the step's start (MASK 1: computed here and stored as
    packed bits from byte start / 8 of ``bits_ptr``; 2: read from them)."""
    i = start + tl.arange(0, BLOCK)
    if FULL:
        m = tl.full([BLOCK], 1, tl.int1)
        x = tl.load(x_ptr + i).to(tl.float32)
    else:
        m = i < n
        x = tl.load(x_ptr + i, mask=m, other=0).to(tl.float32)
    d = _zo_direction(seed, position, eps, BLOCK)
    if MASK != 0:
        byte = start // 8 + tl.arange(0, BLOCK // 8)
        shift = 7 - tl.arange(0, 8)
        if MASK == 1:
            keep = tl.reshape((tl.abs(x) <= bound) & m, (BLOCK // 8, 8))
            packed = tl.sum(keep.to(tl.int32) << shift[None, :], 1).to(tl.uint8)
            if FULL:
                tl.store(bits_ptr + byte, packed)
            else:
                tl.store(bits_ptr + byte, packed, mask=byte * 8 < n)
        else:
            if FULL:
                packed = tl.load(bits_ptr + byte)
            else:
                packed = tl.load(bits_ptr + byte, mask=byte * 8 < n, other=0)
            keep = ((packed.to(tl.int32)[:, None] >> shift[None, :]) & 1) != 0
        d = d * tl.where(tl.reshape(keep, (BLOCK,)), 1.0, 0.0)  # as the torch path: d * mask
    step = tl.where(times > 0, d, -d)
    for _ in range(tl.abs(times)):
        x = x + step
        if OUT_BF16:
            x = _round_bf16(x)
        else:
            x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
    if UPDATE:
        x = x + d * update
    if OUT_BF16:
        x = _round_bf16(x)
    if FULL:
        tl.store(x_ptr + i, x.to(x_ptr.dtype.element_ty))
    else:
        tl.store(x_ptr + i, x.to(x_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["times"])
def _zo_many_kernel(like_ptr, meta_ptr, first_ptr, seeds_ptr, bounds_ptr, bits_ptr, eps, times,
                    update, LOG_T: tl.constexpr, MASK: tl.constexpr, UPDATE: tl.constexpr,
                    OUT_BF16: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    # :func:`_zo_kernel` over several tensors (stream positions from 0 in each, seeds_ptr[t]
    # its seed): each program moves one block of one tensor.
    t, x_ptr, start, n, first_byte = _tensor_block(like_ptr, meta_ptr, first_ptr, LOG_T, BLOCK,
                                                   ALIGN)
    seed = tl.load(seeds_ptr + t)
    bound = 0.0
    if MASK != 0:
        bound = tl.load(bounds_ptr + t)
    if start + BLOCK <= n:
        _zo_block(x_ptr, bits_ptr + first_byte, start, start, n, seed, eps, times, update, bound,
                  MASK, UPDATE, OUT_BF16, BLOCK, True)
    else:
        _zo_block(x_ptr, bits_ptr + first_byte, start, start, n, seed, eps, times, update, bound,
                  MASK, UPDATE, OUT_BF16, BLOCK, False)


def zo_many(xs: list[torch.Tensor], seeds: torch.Tensor, eps: float, times: int,
            update: float | None, bounds: torch.Tensor | None, bits: torch.Tensor | None,
            fresh: bool) -> None:
    """Launch :func:`_zo_many_kernel` once over the flat contiguous tensors ``xs`` (one dtype;
    checked by the caller), seeds int64 [T] on their device; with ``bounds`` (float32 [T]) the
    moves are masked by the packed bits in ``bits`` (:func:`_layout`'s offsets), which are
    computed first when ``fresh``."""
    meta, first, programs, log_t = _layout(xs, ZO_MANY_BLOCK)
    mask = 0 if bounds is None else 1 if fresh else 2
    like = _first(xs)
    _zo_many_kernel[(programs,)](
        like, meta, first, seeds, seeds if bounds is None else bounds,
        like if bits is None else bits, float(eps), times, float(update or 0.0), LOG_T=log_t,
        MASK=mask, UPDATE=update is not None, OUT_BF16=xs[0].dtype == torch.bfloat16,
        BLOCK=ZO_MANY_BLOCK, ALIGN=_align(xs), num_warps=ZO_MANY_WARPS,
        **_FAST)


@triton.jit
def _apply_kernel(w_ptr, out_ptr, rows, cols, sign_bits, sign_scales, tern_masks, tern_signs,
                  lefts, rights, coef_ptr, KS: tl.constexpr, KT: tl.constexpr,
                  KL: tl.constexpr, R: tl.constexpr, OUT_BF16: tl.constexpr,
                  ALIGNED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # coef_ptr: float32 [KS + 2 KT + KL] = sign scales s_k, ternary (s_k, value_k), low-rank s_k.
    r = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    c0 = tl.program_id(1).to(tl.int64) * BN
    c = c0 + tl.arange(0, BN)
    m = (r[:, None] < rows) & (c[None, :] < cols)
    off = r[:, None] * cols + c[None, :]
    acc = tl.load(w_ptr + off, mask=m, other=0).to(tl.float32)
    for k in tl.static_range(KS):
        s = tl.load(sign_scales[k] + r, mask=r < rows, other=0)[:, None]
        term = tl.where(_tile_bits(sign_bits[k], r, c0, rows, cols, off, m, ALIGNED, BM, BN), s, -s)
        acc = acc + tl.load(coef_ptr + k) * term
    for k in tl.static_range(KT):
        v = tl.load(coef_ptr + KS + 2 * k + 1)
        term = tl.where(_tile_bits(tern_signs[k], r, c0, rows, cols, off, m, ALIGNED, BM, BN),
                        v, -v)
        term = tl.where(_tile_bits(tern_masks[k], r, c0, rows, cols, off, m, ALIGNED, BM, BN),
                        term, 0.0)
        acc = acc + tl.load(coef_ptr + KS + 2 * k) * term
    for k in tl.static_range(KL):
        j = tl.arange(0, R)
        left = tl.load(lefts[k] + r[:, None] * R + j[None, :], mask=r[:, None] < rows, other=0)
        right = tl.load(rights[k] + j[:, None] * cols + c[None, :], mask=c[None, :] < cols,
                        other=0)
        term = tl.dot(left, right, input_precision="ieee")
        acc = acc + tl.load(coef_ptr + KS + 2 * KT + k) * term
    _store(out_ptr, off, acc, m, OUT_BF16)


def apply(base2d: torch.Tensor, out2d: torch.Tensor, signs: list[tuple[torch.Tensor, torch.Tensor]],
          ternaries: list[tuple[torch.Tensor, torch.Tensor]],
          lowranks: list[tuple[torch.Tensor, torch.Tensor]], coef: torch.Tensor) -> None:
    """Launch :func:`_apply_kernel` over a [rows, cols] tensor.

    ``signs``: (packed bits, per-row scales [rows]); ``ternaries``: (packed mask, packed
    signs); ``lowranks``: (left [rows, r], right [r, cols]) float32, r padded here to a power of
    two >= 16 (what ``tl.dot`` takes) with zero columns / rows, which add exact zeros.
    """
    rows, cols = base2d.shape
    rank = max([left.shape[1] for left, _ in lowranks], default=0)
    pad = max(16, 1 << max(0, math.ceil(math.log2(max(rank, 1)))))
    lefts, rights = [], []
    for left, right in lowranks:
        lp = torch.zeros(rows, pad, dtype=torch.float32, device=base2d.device)
        rp = torch.zeros(pad, cols, dtype=torch.float32, device=base2d.device)
        lp[:, :left.shape[1]] = left
        rp[:right.shape[0]] = right
        lefts.append(lp)
        rights.append(rp)
    grid = (triton.cdiv(rows, APPLY_BM), triton.cdiv(cols, APPLY_BN))
    _apply_kernel[grid](
        base2d, out2d, rows, cols, tuple(b for b, _ in signs), tuple(s for _, s in signs),
        tuple(mk for mk, _ in ternaries), tuple(sg for _, sg in ternaries), tuple(lefts),
        tuple(rights), coef, KS=len(signs), KT=len(ternaries), KL=len(lowranks), R=pad,
        OUT_BF16=out2d.dtype == torch.bfloat16, ALIGNED=cols % 8 == 0, BM=APPLY_BM, BN=APPLY_BN,
        num_warps=4, **_FAST)
