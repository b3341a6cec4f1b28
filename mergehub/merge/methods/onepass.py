"""TIES with exact per-tensor trims in one read of the inputs (the CPU path): the bits of
``selection.magnitude_cuts`` followed by the TIES member's plan chunk by chunk, which reads every
input three or four times.

A sample of whole rows brackets each input's k-th largest |τ| between two magnitudes lo and
hi (:func:`bracket`). Then each chunk is read once and merged as if every entry above its
input's bracket were kept and every other entry dropped, which is the exact trim everywhere
except at positions where some input has an entry inside its bracket (a few % of the
tensor). Those positions are noted with every input's values there, and the entries above
each bracket are counted. After the last chunk, each input's k-th largest is selected among
its values inside the bracket (with its tie end: the noted positions rank equal magnitudes),
and the noted positions are merged again with the exact cuts. Where a bracket missed (a
sampling outlier) or an entry is not finite, the tensor goes to the plain path instead
(``None``): the result is exact either way.

The merged tensor is held whole until its last chunk, so the engine takes this path only for
tensors of at most :data:`ONE_PASS_BYTES`; tensors of at most :data:`WHOLE` entries are read
once into memory and selected there. Larger ones are sampled by reading a few whole rows and
then streamed a chunk at a time (held in memory only where rows cannot be sampled: a few
long rows): the chunks' buffers are reused while they are warm in the cache, where holding
the inputs of several tensors merged at once costs memory the system must first map
(`benchmarks/RESULTS.md`, issue 16: a TIES merge of 211M bf16 parameters on 2 cores).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from mergehub.kernels import numba_merge
from mergehub.merge.methods import fast
from mergehub.ops.selection import (
    NOTHING, Appended, ChunkStream, Cut, Order, cut_at, located, top_k_cuts)

#: the largest merged tensor held whole for this path (bytes in the output dtype)
ONE_PASS_BYTES = 512 << 20
#: tensors of at most this many entries are read once into memory and selected there
WHOLE = 1 << 18
#: larger tensors whose rows cannot be sampled (:func:`sample_rows`) are read once into memory
#: and sampled there where their inputs (base and task vectors, float32) take at most this
#: many bytes; beyond it they take the plain path
HOLD_BYTES = 256 << 20
#: values sampled per input to bracket its k-th largest |τ|: about 2.8·n^(2/3) for a tensor
#: of n (the sample's cost, ∝ its size, against the re-merged positions', ∝ n / √size),
#: within these bounds ...
SAMPLE_MIN, SAMPLE_MAX = 1 << 13, 1 << 18
#: ... in this many reads of whole rows, spread evenly over the tensor
SAMPLE_READS = 32
#: half-width of a bracket, in standard errors of the sampled share
SPREAD = 5.0
#: the bits of +inf: above every finite |x| as int32
_INF = 0x7F800000


class _Declined(Exception):
    """The tensor takes the plain path (a bracket missed, a value is not finite)."""


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| of float32 values as int32 bits, which order as the magnitudes for finite x."""
    return torch.bitwise_and(x.reshape(-1).view(torch.int32), 0x7FFFFFFF)


def bits_value(bits: int) -> float:
    """The float32 whose bits are ``bits``."""
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


def sample_size(n: int) -> int:
    """How many values to sample per input from a tensor of n (see :data:`SAMPLE_MIN`)."""
    return min(SAMPLE_MAX, max(SAMPLE_MIN, round(2.8 * n ** (2 / 3))))


def sample_rows(rows: int, cols: int, size: int) -> list[tuple[int, int]] | None:
    """Up to :data:`SAMPLE_READS` row ranges of equal length spread evenly over a [rows, cols]
    tensor, about ``size`` values in all; ``None`` where they would cover a quarter of it or
    more (then nothing is gained by sampling)."""
    length = max(1, -(-size // (SAMPLE_READS * max(cols, 1))))
    count = min(SAMPLE_READS, rows // length)
    if count < 2 or 4 * count * length > rows:
        return None
    return [(r, r + length) for r in (i * (rows - length) // (count - 1) for i in range(count))]


def bracket(blocks: np.ndarray, k: int, n: int) -> tuple[int, int]:
    """Magnitude bits (lo, hi) between which the k-th largest |x| of a tensor of n entries lies
    with high probability, from sampled |x| bits ``blocks`` ([reads, values per read]).

    The share of a read at or above the sample's own estimate of the k-th largest varies
    from read to read; its standard error is taken as the larger of the binomial one and the
    one measured across the reads (values within a row are often alike: a row of a frozen
    token's embedding is all zero), and the bracket spans :data:`SPREAD` of them each way.
    """
    flat = blocks.reshape(-1)
    m = flat.size
    q = k / n
    rank = min(m, max(1, round(q * m)))  # the estimate is the rank-th largest sampled value
    binomial = q * (1 - q) / m
    spread = binomial
    while True:
        margin = SPREAD * spread ** 0.5 + 16 / m
        top, bottom = math.floor((q - margin) * m), math.ceil((q + margin) * m)
        picks = sorted({m - rank} | ({m - top} if top >= 1 else set())
                       | ({m - bottom} if bottom < m else set()))
        part = np.partition(flat, picks)
        if spread > binomial:
            break
        shares = (blocks >= part[m - rank]).mean(axis=1)
        spread = float(shares.var()) / shares.size
        if spread <= binomial:
            break
    hi = int(part[m - top]) if top >= 1 else _INF
    lo = int(part[m - bottom]) if bottom < m else 0
    return lo, min(hi, _INF)


def one_pass_ties(chunks: ChunkStream, ranges: list[tuple[int, int]], cols: int,
                  ks: list[int | None], ties: str, weights: list[float], elect: str,
                  normalize: bool, lam: float, out_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, list[Cut | None]] | None:
    """TIES of one tensor with exact per-tensor trims (see the module docstring): the merged
    tensor (flat, ``out_dtype``) and each input's cut, or ``None`` where the plain path must
    merge it.

    ``ks[t]``: input t keeps its k largest |τ| (``None``: all, 0: none), ties as ``ties``.
    ``chunks(which=None, rows=None)`` reads (base rows, task-vector rows) over ``ranges`` (the
    chunks merged, in order) or over the row ranges ``rows``.
    """
    n = ranges[-1][1] * cols if ranges else 0
    if not any(ks):  # nothing to select: the plain path reads once too
        return None
    sel = [t for t, k in enumerate(ks) if k]
    size = sample_size(n)
    try:
        if n <= WHOLE:
            return _whole(chunks, n, ks, ties, weights, elect, normalize, lam, out_dtype)
        rows = sample_rows(ranges[-1][1], cols, size)
        if rows is None:
            if (len(ks) + 1) * n * 4 > HOLD_BYTES:
                return None
            held = [(base.reshape(-1), [x.reshape(-1) for x in xs]) for base, xs in chunks()]
            stride = max(1, n // size)
            blocks = [_blocks(torch.cat([magnitude_bits(xs[t][::stride]) for _, xs in held]))
                      for t in sel]
            return _bracketed(held, blocks, n, ks, ties, weights, elect, normalize, lam,
                              out_dtype)
        sampled: list[list[torch.Tensor]] = [[] for _ in sel]
        for _, xs in chunks(sel, rows=rows):
            for b, x in zip(sampled, xs):
                b.append(magnitude_bits(x))
        blocks = [torch.stack(b).numpy() for b in sampled]
        flat = ((base.reshape(-1), [x.reshape(-1) for x in xs]) for base, xs in chunks())
        return _bracketed(flat, blocks, n, ks, ties, weights, elect, normalize, lam, out_dtype)
    except _Declined:
        return None


def _blocks(sample: torch.Tensor) -> np.ndarray:
    """A sample in order as :data:`SAMPLE_READS` blocks of equal length (the rest left out),
    for :func:`bracket`'s variance across blocks."""
    length = max(1, sample.numel() // SAMPLE_READS)
    return sample[:length * min(SAMPLE_READS, sample.numel())].numpy().reshape(-1, length)


def _kept(x: torch.Tensor, k: int | None) -> torch.Tensor:
    """An input without a selection: all of it (``k`` None) or none (``x * 0``, as the
    plain mask's ``x * False``)."""
    return x if k is None else x * 0.0


def _merged(base: torch.Tensor, kept: list[torch.Tensor], weights: list[float], elect: str,
            normalize: bool, lam: float, xs: list[torch.Tensor]) -> torch.Tensor:
    """The TIES merge of one chunk; the kept tensors that are not the task vectors ``xs``
    themselves are overwritten."""
    spare = [k is not x for k, x in zip(kept, xs)]
    mixed = fast.elect_combine(kept, weights, elect, normalize, spare)
    if mixed is None:
        raise _Declined
    return fast.finish(base, mixed, lam)


def _whole(chunks: ChunkStream, n: int, ks: list[int | None], ties: str,
           weights: list[float], elect: str, normalize: bool, lam: float,
           out_dtype: torch.dtype) -> tuple[torch.Tensor, list[Cut | None]]:
    """A small tensor: its chunks held in memory, the cuts those of ``top_k_cuts``."""
    held = [(base.reshape(-1), [x.reshape(-1) for x in xs]) for base, xs in chunks()]

    def memory(which: list[int] | None = None) -> Iterator:
        for base, xs in held:
            yield base, xs if which is None else [xs[i] for i in which]

    found = top_k_cuts(memory, n, [[k] if k else [] for k in ks], ties)
    cuts = [f[0] if k else None if k is None else NOTHING for k, f in zip(ks, found)]
    out = torch.empty(n, dtype=out_dtype)
    offset = 0
    for base, xs in held:
        kept = [fast.shrink(x, cut, offset) for x, cut in zip(xs, cuts)]
        if any(k is None for k in kept):
            raise _Declined
        m = base.numel()
        out[offset:offset + m] = _merged(base, kept, weights, elect, normalize, lam, xs)
        offset += m
    return out, cuts


class _Notes:
    """The positions :func:`_bracketed` notes and the base's and inputs' values there, each
    an :class:`~mergehub.ops.selection.Appended`."""

    def __init__(self) -> None:
        self.at = Appended(torch.int64)
        self.values: list[Appended] = []  # the base's, then each input's (from the first add)

    def add(self, at: torch.Tensor, offset: int, base: torch.Tensor,
            xs: list[torch.Tensor]) -> None:
        """Note positions ``at`` of a chunk that starts at flat position ``offset``."""
        if not self.values:
            self.values = [Appended(x.dtype) for x in (base, *xs)]
        torch.add(at, offset, out=self.at.reserve(at.numel()))
        for buffer, x in zip(self.values, (base, *xs)):
            torch.index_select(x, 0, at, out=buffer.reserve(at.numel()))

    def extend(self, at: torch.Tensor, offset: int, values: torch.Tensor) -> None:
        """Note positions ``at`` of a chunk that starts at ``offset``, with the base's and
        each input's values there already taken (rows of ``values``)."""
        if not self.values:
            self.values = [Appended(values.dtype) for _ in values]
        torch.add(at, offset, out=self.at.reserve(at.numel()))
        for buffer, row in zip(self.values, values):
            buffer.append(row)

    def taken(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(positions, the base's values, each input's values), in the order noted."""
        base, *values = (v.values() for v in self.values)
        return self.at.values(), base, values


def _bracketed(stream: Iterable[tuple[torch.Tensor, list[torch.Tensor]]],
               blocks: list[np.ndarray], n: int, ks: list[int | None], ties: str,
               weights: list[float], elect: str, normalize: bool, lam: float,
               out_dtype: torch.dtype) -> tuple[torch.Tensor, list[Cut | None]]:
    """:func:`one_pass_ties` of a tensor above :data:`WHOLE` entries: ``stream`` gives the
    flat (base, task vectors) chunks in order, ``blocks`` each selecting input's sampled |τ|
    bits."""
    sel = [t for t, k in enumerate(ks) if k]
    bounds = {}
    for t, b in zip(sel, blocks):
        lo, hi = bracket(b, ks[t], n)
        if lo == 0:  # the cut may fall among zeros: the plain path counts those better
            raise _Declined
        bounds[t] = (lo, hi)
    above = np.zeros(len(ks), dtype=np.int64)
    # per input: |x| > hi is kept whatever the cut; |x| > below(lo) is |x| >= lo
    shrinks = {t: (bits_value(hi), fast.below(bits_value(lo))) for t, (lo, hi) in bounds.items()}
    noted = _Notes()
    out = torch.empty(n, dtype=out_dtype)
    buffer = torch.empty(0)  # a chunk's float32 merge, where the output is not float32
    spare = None  # the compiled loop's buffer for the noted values
    offset = 0
    for base, xs in stream:
        m = base.numel()
        if out_dtype == torch.float32:
            merged = out[offset:offset + m]
        else:
            buffer = buffer if buffer.numel() >= m else torch.empty(m)
            merged = buffer[:m]
        spare = _chunk(base, xs, ks, shrinks, above, weights, elect, normalize, lam, merged,
                       noted, offset, spare)
        if out_dtype != torch.float32:
            out[offset:offset + m] = merged
        offset += m
    at, base, values = noted.taken()
    cuts: list[Cut | None] = [None if k is None else NOTHING for k in ks]
    for t in sel:
        cuts[t] = _cut_among(values[t], at, bounds[t], int(above[t]), ks[t], n, ties)
    kept = []
    for t, (x, cut) in enumerate(zip(values, cuts)):
        if t not in bounds:
            kept.append(_kept(x, ks[t]))
            continue
        split = int(torch.searchsorted(at, cut.tie_end))
        kept.append(fast.split_shrink(x, cut.threshold, split))
        if kept[-1] is None:
            raise _Declined
    out.index_copy_(0, at, _merged(base, kept, weights, elect, normalize, lam,
                                   values).to(out_dtype))
    return out, cuts


def _chunk(base: torch.Tensor, xs: list[torch.Tensor], ks: list[int | None],
           shrinks: dict[int, tuple[float, float]], above: np.ndarray, weights: list[float],
           elect: str, normalize: bool, lam: float, out: torch.Tensor, noted: _Notes,
           offset: int, spare: np.ndarray | None) -> np.ndarray | None:
    """Merge one chunk (first flat position ``offset``) into ``out`` (float32) as if each
    selecting input t kept its entries above its bracket (``shrinks[t]``: |x| > hi kept,
    |x| > below(lo) inside or above), count those into ``above[t]``, and note the positions
    where some input lies inside its bracket; :class:`_Declined` where a value is not finite.
    In one compiled loop (:mod:`mergehub.kernels.numba_merge`, which keeps the noted values in
    ``spare``, returned for the next chunk) where it applies
    (:func:`~mergehub.kernels.numba_merge.applies`), else in torch operations; the same bits
    either way."""
    if numba_merge.applies(base, xs):
        inf = math.inf
        his = [shrinks[t][0] if t in shrinks else -1.0 if k is None else inf
               for t, k in enumerate(ks)]
        los = [shrinks[t][1] if t in shrinks else -1.0 if k is None else inf
               for t, k in enumerate(ks)]
        if spare is None or spare.shape[1] < base.numel():
            spare = np.empty((1 + len(xs), base.numel()), dtype=np.float32)
        done = numba_merge.ties_chunk(base, xs, his, los, weights, elect, normalize, lam, above,
                                     out.view(-1), spare)
        if done is None:
            raise _Declined
        at, values = done
        noted.extend(at, offset, values)
        return spare
    kept, inside, scratch = [], None, None
    for t, x in enumerate(xs):
        if t not in shrinks:
            kept.append(_kept(x, ks[t]))
            continue
        hi, at_least_lo = shrinks[t]
        h = torch.nn.functional.hardshrink(x, hi)  # |x| > hi: kept whatever the cut
        kept.append(h)
        above[t] += int(torch.count_nonzero(h.view(torch.int32)))  # +0 where dropped
        # |x| >= lo minus |x| > hi: nonzero exactly inside the bracket (lo > 0)
        if inside is None:
            inside = torch.nn.functional.hardshrink(x, at_least_lo).sub_(h)
            inside = inside.view(torch.int32)
            continue
        scratch = torch.empty_like(x) if scratch is None else scratch
        torch.hardshrink(x, at_least_lo, out=scratch).sub_(h)
        inside.bitwise_or_(scratch.view(torch.int32))
    out.view(-1).copy_(_merged(base, kept, weights, elect, normalize, lam, xs).view(-1))
    noted.add(torch.from_numpy(np.flatnonzero((inside != 0).numpy())), offset, base, xs)
    return spare


def _cut_among(values: torch.Tensor, at: torch.Tensor, bounds: tuple[int, int], above: int,
               k: int, n: int, ties: str) -> Cut:
    """The exact top-k cut of a tensor, from its values noted by the pass at flat positions
    ``at`` (ascending), ``above`` entries lying above the bracket ``bounds`` (magnitude
    bits); raises :class:`_Declined` where the k-th largest lies outside the bracket."""
    if numba_merge.available() and values.dtype == torch.float32:
        cand, where = numba_merge.bracket_candidates(values.numpy(), at.numpy(), *bounds)
    else:
        keys = np.bitwise_and(values.numpy().view(np.int32), 0x7FFFFFFF)
        inside = (keys - bounds[0]).view(np.uint32) <= bounds[1] - bounds[0]  # lo <= key <= hi
        cand, where = keys[inside], at.numpy()[inside]
    r = k - above
    if not 0 < r <= cand.size:
        raise _Declined
    # a quickselect of its own: numpy's partition slows down ~10x on the runs of equal
    # keys that bf16 weights give (a few hundred distinct |τ| among 10^5 candidates)
    bits = int(torch.kthvalue(torch.from_numpy(cand), cand.size - r + 1).values)
    value = bits_value(bits)
    tied = where[cand == bits]
    order = Order(value, above + int(np.count_nonzero(cand > bits)), tied.size)
    if not located(order, k, ties):
        return cut_at(order, k, n, ties)
    return Cut(value, int(tied[k - order.above - 1]) + 1, k)
