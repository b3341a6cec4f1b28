"""The Triton kernels and their launchers (imported only when Triton is, see :mod:`mergehub.kernels`).

Every kernel makes one pass over memory and does its float32 arithmetic in the same order, with
the same roundings, as the torch reference: launches pass ``enable_fp_fusion=False`` (no
multiply-add contraction), divisions are correctly rounded (``div_rn``) and bf16 outputs are
rounded to nearest-even by :func:`_round_bf16` (Triton's interpreter truncates instead), so on
float32 math the kernels are bit-identical to the references (low-rank products excepted: a
``tl.dot`` sums in another order than a CPU matmul).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MERGE_BLOCK = 512  # elements per program (measured best on an H100: benchmarks/RESULTS.md)
MERGE_WARPS = 4
SELECT_BLOCK = 2048
APPLY_BM, APPLY_BN = 32, 128  # decompress-and-apply tile; low-rank factors are padded to 16
_FAST = {"enable_fp_fusion": False}


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
def _merge_kernel(base_ptr, thetas, out_ptr, weights, thresholds, scales, tall_lambdas,
                  masks_ptr, n, mask_stride, lam, total, votes_needed, K: tl.constexpr, TRIM: tl.constexpr, SCALE: tl.constexpr,
                  ELECT: tl.constexpr, NORMALIZE: tl.constexpr, CONSENSUS: tl.constexpr,
                  OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    # weights, thresholds, scales, tall_lambdas: K float32 scalars each.
    # ELECT: 0 none, 1 sum, 2 count. CONSENSUS: 0 none, 1 TALL masks computed here, 2 given.
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    b = tl.load(base_ptr + off, mask=m, other=0).to(tl.float32)
    taus = ()
    ds = ()
    for t in tl.static_range(K):
        tau = tl.load(thetas[t] + off, mask=m, other=0).to(tl.float32) - b
        taus = taus + (tau,)
        d = tau
        if TRIM:
            d = tl.where(tl.abs(d) >= thresholds[t], d, 0.0)
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
        positive = score >= 0
        divisor = tl.zeros([BLOCK], tl.float32)
        for t in tl.static_range(K):
            agree = tl.where(positive, ds[t] > 0, ds[t] < 0)
            mixed += tl.where(agree, ds[t], 0.0)
            divisor += tl.where(agree, weights[t], 0.0)
        if NORMALIZE:
            mixed = tl.math.div_rn(mixed, tl.where(divisor == 0, 1.0, divisor))
    if CONSENSUS != 0:
        votes = tl.zeros([BLOCK], tl.int32)
        for t in tl.static_range(K):
            if CONSENSUS == 1:
                keep = tl.abs(taus[t]) >= tall_lambdas[t] * tl.abs(mixed - taus[t])
            else:
                keep = _packed_bit(masks_ptr + t * mask_stride, off, m)
            votes += keep.to(tl.int32)
        mixed = tl.where(votes >= votes_needed, mixed, 0.0)
    _store(out_ptr, off, b + lam * mixed, m, OUT_BF16)


def merge(base: torch.Tensor, thetas: list[torch.Tensor], out: torch.Tensor,
          coef: list[list[float]], masks: torch.Tensor | None, lam: float, total: float,
          votes_needed: int, *, trim: bool, scale: bool, elect: int, normalize: bool,
          consensus: int) -> None:
    """Launch :func:`_merge_kernel` over flat contiguous tensors (checked by the caller);
    ``coef``: weights, thresholds, scales and TALL lambdas, K of each."""
    n = base.numel()
    grid = (triton.cdiv(n, MERGE_BLOCK),)
    _merge_kernel[grid](
        base, tuple(thetas), out, *(tuple(map(float, c)) for c in coef),
        masks if masks is not None else base, n,
        masks.shape[1] if masks is not None else 0, lam, total, votes_needed,
        K=len(thetas), TRIM=trim, SCALE=scale, ELECT=elect, NORMALIZE=normalize,
        CONSENSUS=consensus, OUT_BF16=out.dtype == torch.bfloat16, BLOCK=MERGE_BLOCK,
        num_warps=MERGE_WARPS, **_FAST)


@triton.jit
def _bracket_kernel(base_ptr, thetas, bracket_ptr, above_ptr, hist_ptr, n, bins,
                    K: tl.constexpr, BLOCK: tl.constexpr):
    # bracket_ptr: int32 [3, K] = float bits (lo, hi) of the bracket, bin shift.
    # |τ| >= 0, so its float32 bits order like its values.
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    b = tl.load(base_ptr + off, mask=m, other=0).to(tl.float32)
    for t in tl.static_range(K):
        a = tl.abs(tl.load(thetas[t] + off, mask=m, other=0).to(tl.float32) - b)
        bits = a.to(tl.int32, bitcast=True)
        lo = tl.load(bracket_ptr + t)
        hi = tl.load(bracket_ptr + K + t)
        shift = tl.load(bracket_ptr + 2 * K + t)
        tl.atomic_add(above_ptr + t, tl.sum(((bits > hi) & m).to(tl.int32), 0))
        inside = (bits >= lo) & (bits <= hi) & m
        tl.atomic_add(hist_ptr + t * bins + ((bits - lo) >> shift), 1, mask=inside)


def bracket_histogram(base: torch.Tensor, thetas: list[torch.Tensor], bracket: torch.Tensor,
                      bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input t: how many |θt − base| have float bits above ``bracket[1, t]``, and the
    histogram of those between ``bracket[0, t]`` and ``bracket[1, t]`` in bins of
    ``2**bracket[2, t]`` consecutive bit patterns (int32 [K], [K, bins])."""
    n, k = base.numel(), len(thetas)
    above = torch.zeros(k, dtype=torch.int32, device=base.device)
    hist = torch.zeros(k, bins, dtype=torch.int32, device=base.device)
    _bracket_kernel[(triton.cdiv(n, SELECT_BLOCK),)](
        base, tuple(thetas), bracket, above, hist, n, bins, K=k, BLOCK=SELECT_BLOCK,
        num_warps=8, **_FAST)
    return above, hist


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
