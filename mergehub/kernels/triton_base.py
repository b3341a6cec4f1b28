"""What the Triton kernels share (imported only when Triton is, see :mod:`mergehub.kernels`):
launch options, bf16 rounding, packed bits, integers passed as floats, and the addressing of
many tensors from one pointer (their layout tables: :class:`mergehub.kernels.zo.ZoTensors`).

Every kernel makes one pass over memory and does its float32 arithmetic in the same order, with
the same roundings, as the torch reference: launches pass ``enable_fp_fusion=False`` (no
multiply-add contraction), divisions are correctly rounded (``div_rn``, or for the disjoint mean
a table of float64 reciprocals or :func:`_quotient`, which give the same float32) and bf16
outputs are rounded to nearest-even by :func:`_round_bf16` (Triton's interpreter truncates
instead), so on float32 math the kernels are bit-identical to the references (low-rank products
excepted: a ``tl.dot`` sums in another order than a CPU matmul).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: launch options of every kernel: no multiply-add contraction (the references' roundings)
_FAST = {"enable_fp_fusion": False}
#: under Triton's interpreter a float32 -> bf16 cast truncates: :func:`_round_bf16` rounds first
#: (compiled, the cast itself rounds to nearest-even, in one instruction)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: the same as a kernel's compile-time constant: what only compiled code has (inline PTX,
#: libdevice's approximate functions) goes under ``if _COMPILED:``
_COMPILED = tl.constexpr(not _INTERPRETED)



@triton.jit
def _round_bf16(x):
    """Round float32 to the nearest bf16 value (ties to even), returned as float32."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)



@triton.jit
def _store(ptr, off, val, m, ROUND_BF16: tl.constexpr):
    """Store ``val`` in ``ptr``'s dtype; ROUND_BF16: rounded by :func:`_round_bf16` first (for
    the interpreter, whose bf16 cast truncates)."""
    if ROUND_BF16:
        val = _round_bf16(val)
    tl.store(ptr + off, val.to(ptr.dtype.element_ty), mask=m)



@triton.jit
def _packed_bit(ptr, off, m):
    """Bit ``off`` of a np.packbits-ordered (most significant bit first) uint8 array."""
    byte = tl.load(ptr + (off >> 3), mask=m, other=0).to(tl.int32)
    return ((byte >> (7 - (off & 7).to(tl.int32))) & 1) != 0



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
def _digit_histogram(keys, ok, q, shift, low, D: tl.constexpr):
    """Histogram of the D-bit digit (bits low..shift) of the keys in ``ok`` (those that match
    the prefix q above ``shift``); the others are counted into bin 0 and taken out again."""
    h = tl.histogram(tl.where(ok, (keys >> low) - (q << (shift - low)), 0), 1 << D)
    return h - tl.where(tl.arange(0, 1 << D) == 0, tl.sum(tl.where(ok, 0, 1), 0), 0)
