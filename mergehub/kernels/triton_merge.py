"""The fused merge kernels (task arithmetic, TIES, consensus over one tensor or many in one
launch) and their launchers; see :mod:`mergehub.kernels.triton_base` for what every kernel
shares and :func:`mergehub.kernels.merge_tensor` for the math."""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable

import numpy as np
import torch
import triton
import triton.language as tl

from mergehub.errors import InputError
from mergehub.kernels.triton_base import (
    _COMPILED, _FAST, _INTERPRETED, _packed_bit, _store, _tensor_of)

#: entries per program (measured best for K <= 4 on an H200: benchmarks/RESULTS.md)
MERGE_BLOCK = 1024
MERGE_WARPS = 4



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
def _opaque(i):
    """``i`` (int32), hidden from the compiler's arithmetic: an address ``ptr + i`` then takes
    one wide multiply-add, where LLVM would otherwise spread the sum that makes ``i`` over
    64-bit address arithmetic (~7 more instructions per entry for a table lookup)."""
    if _COMPILED:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [i], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return i



@triton.jit
def _vote(d):
    """TIES's ``elect: count``: +1, -1 or 0 by the sign of d."""
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))



@triton.jit
def _merge_kernel(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_blocks, tie_rests,
                  scales, tall_lambdas, masks_ptr, recips_ptr, n, mask_stride, lam, total,
                  votes_needed,
                  K: tl.constexpr, TRIM: tl.constexpr, SCALE: tl.constexpr,
                  ELECT: tl.constexpr, NORMALIZE: tl.constexpr, CONSENSUS: tl.constexpr,
                  DIVIDE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    # weights, thresholds, below, tie_blocks, tie_rests, scales, tall_lambdas: K float32
    # scalars each. TRIM keeps |τ| > threshold, and |τ| == threshold at flat positions below the
    # tie end (tie_blocks·BLOCK + tie_rests, :func:`_tie_places`): |τ| > below there, ``below``
    # being the float under the threshold.
    # ELECT: 0 none, 1 sum, 2 count. CONSENSUS: 0 none, 1 TALL masks computed here, 2 given.
    # DIVIDE, the disjoint mean's division (all three correctly rounded): 0 ``div_rn``; 1 by the
    # float64 reciprocal of each agreeing set's divisor, from recips_ptr[Σ 2^t over the agreeing
    # inputs t] (:func:`_reciprocals`), rounded once; 2 :func:`_quotient` (the divisors are
    # sums of positive weights in [2^-100, 2^100], checked by the caller).
    # ROUND_BF16: round the bf16 output by :func:`_round_bf16` (the interpreter's cast
    # truncates).
    pid = tl.program_id(0)
    _merge_program(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_blocks, tie_rests,
                   scales, tall_lambdas, masks_ptr, recips_ptr, pid.to(tl.float32),
                   pid.to(tl.int64) * BLOCK, n, mask_stride, lam, total, votes_needed, K, TRIM,
                   SCALE, ELECT, NORMALIZE, CONSENSUS, DIVIDE, ROUND_BF16, BLOCK)



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
    a multiple of 16 bytes), the entry count, then the K tie ends (:func:`_tie_places`' blocks
    and rests: K of each); row t of ``cut_ptr`` (float32, 2K): the K thresholds, then the
    floats below them. Everything else is one value for all the tensors (no given TALL
    masks)."""
    pid = tl.program_id(0).to(tl.int64)
    t = _tensor_of(first_ptr, pid, LOG_T)
    row = meta_ptr + t * (3 + 3 * K)
    base_ptr = _at(base_like, tl.load(row))
    out_ptr = _at(out_like, tl.load(row + 1))
    n = tl.load(row + 2)
    thetas = ()
    thresholds = ()
    below = ()
    tie_blocks = ()
    tie_rests = ()
    for k in tl.static_range(K):
        thetas = thetas + (_at(thetas_like[k], tl.load(row + 3 + k)),)
        tie_blocks = tie_blocks + (tl.load(row + 3 + K + k),)
        tie_rests = tie_rests + (tl.load(row + 3 + 2 * K + k),)
        thresholds = thresholds + (tl.load(cut_ptr + t * 2 * K + k),)
        below = below + (tl.load(cut_ptr + t * 2 * K + K + k),)
    block = pid - tl.load(first_ptr + t)
    _merge_program(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_blocks, tie_rests,
                   scales, tall_lambdas, base_ptr, recips_ptr, block, block * BLOCK, n, 0, lam,
                   total, votes_needed, K, TRIM, SCALE, ELECT, NORMALIZE, CONSENSUS, DIVIDE,
                   ROUND_BF16, BLOCK)



@triton.jit
def _at(like_ptr, offset):
    """``like_ptr + offset`` where the offset is a whole number of 16-byte units (the hint
    keeps the loads and stores 16 bytes wide)."""
    return like_ptr + tl.multiple_of(offset, 128 // like_ptr.dtype.element_ty.primitive_bitwidth)



@triton.jit
def _merge_program(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_blocks, tie_rests,
                   scales, tall_lambdas, masks_ptr, recips_ptr, block, start, n, mask_stride, lam,
                   total, votes_needed, K: tl.constexpr, TRIM: tl.constexpr,
                   SCALE: tl.constexpr, ELECT: tl.constexpr, NORMALIZE: tl.constexpr,
                   CONSENSUS: tl.constexpr, DIVIDE: tl.constexpr, ROUND_BF16: tl.constexpr,
                   BLOCK: tl.constexpr):
    """One program of the merge kernels: the entries [start, start + BLOCK) of one tensor, its
    ``block``-th (an index of the type of ``tie_blocks``, so that comparing them converts
    nothing). Blocks that are whole and hold no input's tie end (all but a few) take a path
    without per-entry bounds checks or tie-end compares, their cut one value per input."""
    plain = start + BLOCK <= n
    if TRIM:
        for t in tl.static_range(K):
            plain = plain & ((block != tie_blocks[t]) | (tie_rests[t] == 0))
    if plain:
        _merge_block(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_blocks,
                     tie_rests, scales, tall_lambdas, masks_ptr, recips_ptr, block, start, n,
                     mask_stride, lam, total, votes_needed, K, TRIM, SCALE, ELECT, NORMALIZE,
                     CONSENSUS, DIVIDE, ROUND_BF16, BLOCK, True)
    else:
        _merge_block(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_blocks,
                     tie_rests, scales, tall_lambdas, masks_ptr, recips_ptr, block, start, n,
                     mask_stride, lam, total, votes_needed, K, TRIM, SCALE, ELECT, NORMALIZE,
                     CONSENSUS, DIVIDE, ROUND_BF16, BLOCK, False)



@triton.jit
def _merge_block(base_ptr, thetas, out_ptr, weights, thresholds, below, tie_blocks, tie_rests,
                 scales, tall_lambdas, masks_ptr, recips_ptr, block, start, n, mask_stride, lam,
                 total, votes_needed, K: tl.constexpr, TRIM: tl.constexpr, SCALE: tl.constexpr,
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
            if PLAIN:  # the whole block lies before the tie end or after it
                cut = tl.where(block < tie_blocks[t], below[t], thresholds[t])
            else:  # entries below ``tied`` lie before it
                tied = tl.where(block < tie_blocks[t], BLOCK,
                                tl.where(block == tie_blocks[t], tie_rests[t], 0))
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
        score = ds[0] if ELECT == 1 else _vote(ds[0])  # no + 0: only score's sign is used
        for t in tl.static_range(1, K):
            score += ds[t] if ELECT == 1 else _vote(ds[t])
        positive = score >= 0  # the elected sign
        divisor = tl.zeros([BLOCK], tl.float32)
        agreeing = tl.zeros([BLOCK], tl.int32)
        for t in tl.static_range(K):
            # ds where its sign is the elected one (ds * sign > 0), else ±0: one min/max
            kept = tl.where(positive, tl.maximum(ds[t], 0.0), tl.minimum(ds[t], 0.0))
            mixed += kept
            if DIVIDE == 1:
                agreeing |= (kept != 0).to(tl.int32) << t
            else:
                divisor += tl.where(kept != 0, weights[t], 0.0)
        if NORMALIZE:
            if DIVIDE == 1:
                mixed = (mixed.to(tl.float64) * tl.load(recips_ptr + _opaque(agreeing))
                         ).to(tl.float32)
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



def _tie_places(ends: list[int]) -> tuple[list[int], list[int]]:
    """Each tie end as the merge kernels take it: the index of the MERGE_BLOCK-entry block it
    falls in and its place there, so that a program finds its cut with one compare per input
    (and whole blocks without a tie end with one more) instead of 64-bit arithmetic."""
    return [e // MERGE_BLOCK for e in ends], [e % MERGE_BLOCK for e in ends]



def merge(base: torch.Tensor, thetas: list[torch.Tensor], out: torch.Tensor,
          coef: list[list[float]], masks: torch.Tensor | None, lam: float, total: float,
          votes_needed: int, *, trim: bool, scale: bool, elect: int, normalize: bool,
          consensus: int) -> None:
    """Launch :func:`_merge_kernel` over flat contiguous tensors (checked by the caller);
    ``coef``: weights, thresholds, tie ends, scales and TALL lambdas, K of each."""
    n = base.numel()
    if triton.cdiv(n, MERGE_BLOCK) > 1 << 24:  # block indices travel as exact float32
        raise InputError(f"merge_tensor: a tensor of {n:,} entries is more than the fused "
                         f"kernel takes (2^24 blocks of {MERGE_BLOCK}); merge it on the CPU")
    blocks, rests = _tie_places([int(e) for e in coef[2]])
    weights, thresholds = [float(w) for w in coef[0]], [float(c) for c in coef[1]]
    below = [_float32_below(c) for c in thresholds]
    divide, recips = _division(weights, len(thetas), elect, normalize, base.device)
    grid = (triton.cdiv(n, MERGE_BLOCK),)
    _merge_kernel[grid](
        base, tuple(thetas), out, tuple(weights), tuple(thresholds), tuple(below),
        *(tuple(map(float, c)) for c in (blocks, rests, *coef[3:])),
        masks if masks is not None else base,
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
        blocks, rests = _tie_places([tie for _, tie in cuts[i]])
        rows += [off[0], off[-1], n, *off[1:-1], *blocks, *rests]
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


@triton.jit
def _dare_words_kernel(out_ptr, n, start, key, BLOCK: tl.constexpr):
    """Words start .. start + n − 1 of DARE's stream ``key`` (uint64): word p is word p mod 4
    of Philox4x32-10 of the counter (⌊p/4⌋, 0, 0, 0) under the key's low and high words, as
    :func:`mergehub.ops.sparsify.draw_words` (positions below 2^34)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    p = offs + start
    block = (p >> 2).to(tl.uint32)
    zero = block * 0
    r0, r1, r2, r3 = tl.philox(key, block, zero, zero, zero)
    lane = p & 3
    word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    tl.store(out_ptr + offs, word.to(tl.int32, bitcast=True), mask=offs < n)


def dare_words(n: int, key: int, start: int, device: torch.device) -> torch.Tensor:
    """:func:`mergehub.ops.sparsify.draw_words` in one launch (int32 [n] on ``device``)."""
    out = torch.empty(n, dtype=torch.int32, device=device)
    if n:
        block = 1024
        _dare_words_kernel[(triton.cdiv(n, block),)](out, n, start, key, BLOCK=block)
    return out
