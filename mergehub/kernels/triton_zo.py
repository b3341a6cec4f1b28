"""MeZO's kernels: the perturbation drawn from Philox in registers (one tensor, or many in one
launch with Sparse MeZO's masks) and Sparse MeZO's exact per-tensor quantiles of |θ|."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from mergehub.kernels.triton_base import (
    _COMPILED, _FAST, _INTERPRETED, _digit_histogram, _round_bf16, _tensor_block)

if TYPE_CHECKING:  # zo imports this module when it launches a kernel
    from mergehub.kernels.zo import ZoTensors

ZO_BLOCK = 1024  # MeZO perturbation: entries per program
#: many-tensor MeZO kernels: entries per block, blocks per program (one search for the
#: program's tensor serves them all: measured ~12% of a move on an H200 with one block a
#: program) and warps of a move, then those of a quantile's counting pass, and the bits of the
#: quantile's radix digits
ZO_MANY_BLOCK, ZO_MANY_SUB, ZO_MANY_WARPS = 1024, 4, 4
QUANTILE_BLOCK, QUANTILE_WARPS, QUANTILE_BITS = 4096, 4, 5



@triton.jit
def _box_muller(u1, u2):
    """Two N(0, 1) values from two uniforms in [0, 1), those of ``tl.randn4x``'s Box-Muller
    transform: r·cos(2π u2), r·sin(2π u2) with r = sqrt(-2 ln u1) (u1 >= 1e-7), computed as
    -r·cos θ, -r·sin θ for θ = 2π u2 − π, in [-π, π) where the approximate sine and cosine are
    accurate to ~2^-21."""
    u1 = tl.maximum(1.0e-7, u1)
    th = 6.283185307179586 * u2 - 3.141592653589793
    if _COMPILED:  # the GPU's approximate log2, cosine and sine: one instruction each (the
        # interpreter has no libdevice: there numpy's float32 math, a stream of its own)
        r = -tl.sqrt(-1.3862943611198906 * libdevice.fast_log2f(u1))  # -2 ln 2 · log2 u1
        return r * libdevice.fast_cosf(th), r * libdevice.fast_sinf(th)
    else:
        r = -tl.sqrt(-1.3862943611198906 * tl.log2(u1))
        return r * tl.cos(th), r * tl.sin(th)



@triton.jit
def _zo_direction(seed, first, eps, BLOCK: tl.constexpr, ACCURATE: tl.constexpr):
    """d = eps·z for the BLOCK stream positions from ``first`` (a multiple of 4), z ~ N(0, 1):
    positions 4c .. 4c + 3 hold the normals n0, n2, n1, n3 of the two Box-Muller pairs (n0, n1),
    (n2, n3) of Philox-4x32-10 counter c (one Philox call per four values), transformed by
    :func:`_box_muller` (the GPU's approximate log2, sine and cosine: within ~2e-5 of the
    full-precision values) or with ACCURATE by ``tl.randn4x`` (libdevice's full-precision log,
    sine and cosine: the stream of CUDA runs started before the approximate one), with the
    lowest mantissa bit of d set (MeZO's ``_sticky``: keeps x + d off exact rounding ties)."""
    counters = (first // 4 + tl.arange(0, BLOCK // 4)).to(tl.int32)
    if ACCURATE:
        n0, n1, n2, n3 = tl.randn4x(seed, counters)
    else:
        u0, u1, u2, u3 = tl.rand4x(seed, counters)
        n0, n1 = _box_muller(u0, u1)
        n2, n3 = _box_muller(u2, u3)
    z = tl.reshape(tl.join(tl.join(n0, n1), tl.join(n2, n3)), [BLOCK])
    d = z * eps
    return (d.to(tl.int32, bitcast=True) | 1).to(tl.float32, bitcast=True)



@triton.jit(do_not_specialize=["seed", "n", "start", "times"])
def _zo_kernel(x_ptr, d_ptr, n, start, seed, eps, times, update, WRITE_D: tl.constexpr,
               UPDATE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
               ACCURATE: tl.constexpr):
    # Entries [pid·BLOCK, ...) of x (stream positions start + i): with WRITE_D store d; else
    # move x (:func:`_zo_block`).
    first = tl.program_id(0).to(tl.int64) * BLOCK
    if WRITE_D:
        i = first + tl.arange(0, BLOCK)
        tl.store(d_ptr + i, _zo_direction(seed, start + first, eps, BLOCK, ACCURATE),
                 mask=i < n)
    else:
        _zo_block(x_ptr, x_ptr, first, start + first, n, seed, eps, times, update, 0.0, 0, UPDATE,
                  ROUND_BF16, BLOCK, False, ACCURATE)



def zo(x: torch.Tensor | None, d: torch.Tensor | None, n: int, start: int, seed: int,
       eps: float, times: int, update: float | None, accurate: bool) -> None:
    """Launch :func:`_zo_kernel` over ``n`` entries: fill ``d`` (float32) with the direction,
    or move the flat contiguous ``x`` in place (``accurate``: :func:`_zo_direction`'s
    ACCURATE)."""
    target = d if x is None else x
    _zo_kernel[(triton.cdiv(n, ZO_BLOCK),)](
        target, target, n, start, seed, float(eps), times, float(update or 0.0),
        WRITE_D=x is None, UPDATE=update is not None,
        ROUND_BF16=_INTERPRETED and target.dtype == torch.bfloat16,
        BLOCK=ZO_BLOCK, ACCURATE=accurate, num_warps=4, **_FAST)



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



def smallest_magnitudes(xs: ZoTensors, ks: torch.Tensor) -> torch.Tensor:
    """float32 [T]: the ks[t]-th smallest |x| of each contiguous tensor (one dtype: bf16,
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
    meta, first, programs, log_t = xs.layout(QUANTILE_BLOCK)
    hist = torch.zeros(len(xs) * (rounds << digit), dtype=torch.int32, device=dev)
    for r in range(rounds):
        _quantile_kernel[(programs,)](xs.first, meta, first, ks, hist, LOG_T=log_t, ROUND=r,
                                      ROUNDS=rounds, KEY_BITS=key_bits, D=digit,
                                      BLOCK=QUANTILE_BLOCK, ALIGN=xs.align,
                                      num_warps=QUANTILE_WARPS)
    out = torch.empty(len(xs), dtype=torch.float32, device=dev)
    _quantile_finish[(len(xs),)](ks, hist, out, ROUNDS=rounds, KEY_BITS=key_bits, D=digit,
                                 FP16=xs[0].dtype == torch.float16, num_warps=4)
    return out



@triton.jit
def _zo_block(x_ptr, bits_ptr, start, position, n, seed, eps, times, update, bound,
              MASK: tl.constexpr, UPDATE: tl.constexpr, ROUND_BF16: tl.constexpr,
              BLOCK: tl.constexpr, FULL: tl.constexpr, ACCURATE: tl.constexpr):
    """Entries [start, start + BLOCK) of x (below n; all of them with FULL), at stream
    positions from ``position``: add d ``times`` times (subtract for times < 0), rounding to
    x's dtype after each add as torch's in-place add does, then (UPDATE) add update·d once
    more; d is masked by |x| <= bound at the step's start (MASK 1: computed here and stored as
    packed bits from byte start / 8 of ``bits_ptr``; 2: read from them). ROUND_BF16: round to
    bf16 by :func:`_round_bf16` (the interpreter's cast truncates; compiled, the cast itself
    rounds to nearest-even, in one instruction)."""
    i = start + tl.arange(0, BLOCK)
    if FULL:
        m = tl.full([BLOCK], 1, tl.int1)
        x = tl.load(x_ptr + i).to(tl.float32)
    else:
        m = i < n
        x = tl.load(x_ptr + i, mask=m, other=0).to(tl.float32)
    d = _zo_direction(seed, position, eps, BLOCK, ACCURATE)
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
        if ROUND_BF16:
            x = _round_bf16(x)
        else:
            x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
    if UPDATE:
        x = x + d * update
    if ROUND_BF16:
        x = _round_bf16(x)
    if FULL:
        tl.store(x_ptr + i, x.to(x_ptr.dtype.element_ty))
    else:
        tl.store(x_ptr + i, x.to(x_ptr.dtype.element_ty), mask=m)



@triton.jit(do_not_specialize=["times"])
def _zo_many_kernel(like_ptr, meta_ptr, first_ptr, seeds_ptr, bounds_ptr, bits_ptr, eps, times,
                    update, LOG_T: tl.constexpr, MASK: tl.constexpr, UPDATE: tl.constexpr,
                    ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
                    ALIGN: tl.constexpr, ACCURATE: tl.constexpr):
    # :func:`_zo_kernel` over several tensors (stream positions from 0 in each, seeds_ptr[t]
    # its seed): each program moves SUB consecutive blocks of one tensor.
    t, x_ptr, first, n, first_byte = _tensor_block(like_ptr, meta_ptr, first_ptr, LOG_T,
                                                   BLOCK * SUB, ALIGN)
    seed = tl.load(seeds_ptr + t)
    bound = 0.0
    if MASK != 0:
        bound = tl.load(bounds_ptr + t)
    for s in tl.static_range(SUB):
        start = first + s * BLOCK
        if start + BLOCK <= n:
            _zo_block(x_ptr, bits_ptr + first_byte, start, start, n, seed, eps, times, update,
                      bound, MASK, UPDATE, ROUND_BF16, BLOCK, True, ACCURATE)
        elif start < n:
            _zo_block(x_ptr, bits_ptr + first_byte, start, start, n, seed, eps, times, update,
                      bound, MASK, UPDATE, ROUND_BF16, BLOCK, False, ACCURATE)



def zo_many(xs: ZoTensors, seeds: torch.Tensor, eps: float, times: int,
            update: float | None, bounds: torch.Tensor | None, bits: torch.Tensor | None,
            fresh: bool, accurate: bool) -> None:
    """Launch :func:`_zo_many_kernel` once over the tensors ``xs``, seeds int64 [T] on their
    device; with ``bounds`` (float32 [T]) the moves are masked by the packed bits in ``bits``
    (at the offsets of ``xs.layout``), which are computed first when ``fresh`` (``accurate``:
    :func:`_zo_direction`'s ACCURATE)."""
    meta, first, programs, log_t = xs.layout(ZO_MANY_BLOCK * ZO_MANY_SUB)
    mask = 0 if bounds is None else 1 if fresh else 2
    like = xs.first
    _zo_many_kernel[(programs,)](
        like, meta, first, seeds, seeds if bounds is None else bounds,
        like if bits is None else bits, float(eps), times, float(update or 0.0), LOG_T=log_t,
        MASK=mask, UPDATE=update is not None,
        ROUND_BF16=_INTERPRETED and xs[0].dtype == torch.bfloat16,
        BLOCK=ZO_MANY_BLOCK, SUB=ZO_MANY_SUB, ALIGN=xs.align, ACCURATE=accurate,
        num_warps=ZO_MANY_WARPS,
        **_FAST)
