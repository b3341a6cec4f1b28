"""The decompress-and-apply kernel: W + Σk sk·decode(δk) for sign, ternary and low-rank deltas,
decoded tile by tile in registers (:func:`mergehub.kernels.apply_deltas`)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mergehub.kernels.triton_base import _FAST, _INTERPRETED, _packed_bit, _store

APPLY_BM, APPLY_BN = 32, 128  # decompress-and-apply tile; low-rank factors are padded to 16



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
def _apply_kernel(w_ptr, out_ptr, rows, cols, sign_bits, sign_scales, tern_masks, tern_signs,
                  lefts, rights, coef_ptr, KS: tl.constexpr, KT: tl.constexpr,
                  KL: tl.constexpr, R: tl.constexpr, ROUND_BF16: tl.constexpr,
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
    _store(out_ptr, off, acc, m, ROUND_BF16)



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
        ROUND_BF16=_INTERPRETED and out2d.dtype == torch.bfloat16,
        ALIGNED=cols % 8 == 0, BM=APPLY_BM, BN=APPLY_BN,
        num_warps=4, **_FAST)
