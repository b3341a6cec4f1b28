"""The exact and sampled magnitude selections of TIES' trims (k-th largest |τ| per input, where
its ties end) and their launchers (:func:`mergehub.kernels.magnitude_cuts` says how they fit
together)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mergehub.kernels.triton_base import _digit_histogram, _joined, split_ints

#: magnitude selection (measured on an H100: benchmarks/RESULTS.md): values per sample program;
#: the pass's block and warps; candidate lists per input and each one's room beyond its share;
#: the radix select's digit bits, keys per step and warps
SAMPLE_CHUNK = 1024
SELECT_BLOCK, SELECT_WARPS, SELECT_SLOTS, LIST_SLACK = 1024, 4, 64, 256
RADIX_BITS, RADIX_CHUNK, RADIX_WARPS = 8, 4096, 8
#: approximate selection over a sample: values per gathering / histogram program (its digits
#: are RADIX_BITS wide: tl.histogram's cost grows with its bins)
SAMPLE_BLOCK_VALUES = 1024
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
