"""Exact and sampled top-k selection by magnitude over tensors streamed in chunks: the trims
of TIES, breadcrumbs and ComPEFT (and the kernels' CPU oracle) are :class:`Cut` objects
found here.

Tensors arrive in row chunks (:data:`ChunkStream`), so a whole-tensor order statistic is
found by streaming over them. The ranking, everywhere (docs/merging.md compares it with
mergekit and the papers): entries by |τ|, largest first, entries of equal magnitude by flat
position, lowest first (one total order, the same on every device, chunk size and path); a
magnitude trim keeps the first k = int(density·n) of them (mergekit's k), at least one at a
positive density (where mergekit stops with an error): a :class:`Cut`. ``ties: threshold``
instead keeps every entry tied with the k-th largest (|τ| >= it). An approximate cut
(``tolerance``) is selected from a fixed random sample of positions instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

#: chunks() or chunks(which): yields (base rows, [rows of each input, or of those in which])
ChunkStream = Callable[..., Iterable[tuple[torch.Tensor | None, list[torch.Tensor]]]]

#: a compiled bracket pass over one input's chunk (the merge layer passes
#: :func:`mergehub.kernels.numba_merge.bracket_pass`): (flat chunk, [(lo, hi) per bracket of
#: |x|], the chunk's first flat position) -> (entries above each hi, per bracket the count of
#: entries equal to a one-value bracket or (values, positions) within [lo, hi]), or ``None``
#: where it does not take the chunk (the torch operations then run)
BracketPass = Callable[[torch.Tensor, list[tuple[float, float]], int],
                       "tuple[list[int], list[int | tuple[torch.Tensor, torch.Tensor]]] | None"]

_SAMPLE = 1 << 17  # values sampled per tensor and input to bracket an order statistic
_EXACT = 1 << 20  # tensors this small are selected exactly in one pass


class Appended:
    """A flat tensor built chunk by chunk (the candidates a streamed selection notes), held in
    one buffer that grows by doubling instead of as a small tensor per chunk. On the CPU those
    small tensors, allocated between a chunk's large temporaries and kept, split the freed
    blocks that the next chunk's temporaries would have reused, so the heap grew by about
    two chunks' worth per chunk (TIES's one pass over a 49M-entry tensor: 700 MB instead of
    220; `benchmarks/RESULTS.md`, issue 16)."""

    def __init__(self, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.size = 0
        self.buffer = torch.empty(0, dtype=dtype, device=device)

    def reserve(self, m: int) -> torch.Tensor:
        """The next ``m`` entries, to be written by the caller (e.g. as an ``out=``)."""
        end = self.size + m
        if end > self.buffer.numel():
            grown = torch.empty(max(end, 2 * self.buffer.numel(), 1 << 12),
                                dtype=self.buffer.dtype, device=self.buffer.device)
            grown[:self.size] = self.buffer[:self.size]
            self.buffer = grown
        out, self.size = self.buffer[self.size:end], end
        return out

    def append(self, values: torch.Tensor) -> None:
        """Copy ``values`` (flat) after what is held."""
        self.reserve(values.numel()).copy_(values)

    def values(self) -> torch.Tensor:
        """Everything appended, in order (a view of the buffer)."""
        return self.buffer[:self.size]


@dataclass(frozen=True)
class Cut:
    """What a magnitude trim keeps of a tensor: the entries with |x| > ``threshold``, and those
    with |x| == ``threshold`` at flat positions below ``tie_end`` (all of them once tie_end is
    the tensor's size, none at 0). The top k of the ranking in the module docstring is such a
    cut: its k-th entry's magnitude and position + 1.

    ``kept``: how many entries the cut keeps in the scope it was selected over, where known
    (``None`` for a cut from a sample, or a global cut restricted to one tensor).
    """

    threshold: float
    tie_end: int
    kept: int | None = None

    def restricted(self, tie_end: int) -> Cut:
        """The same cut with ``tie_end`` expressed in another tensor's positions."""
        return Cut(self.threshold, tie_end)


#: the cut that keeps nothing (density <= 0)
NOTHING = Cut(math.inf, 0, 0)


class Order(NamedTuple):
    """The k-th largest |x| of a tensor, and how many entries lie above it and at it."""

    value: float
    above: int
    tied: int

    @classmethod
    def of(cls, magnitudes: torch.Tensor, value: float) -> Order:
        """``value`` with the counts of ``magnitudes`` above it and equal to it."""
        return cls(value, int((magnitudes > value).sum()), int((magnitudes == value).sum()))


def kth_largest_abs(chunks: ChunkStream, n: int, ks: list[list[int]],
                    bracket: BracketPass | None = None
                    ) -> tuple[list[list[Order]], dict[int, torch.Tensor],
                               dict[tuple[int, int], int]]:
    """For each input t and each k in ``ks[t]`` (1 <= k <= n), the k-th largest |x| over the
    whole tensor and the counts above it and at it; also the inputs whose |x| had to be gathered
    whole (flat, in order), by input; and, where the compiled ``bracket`` pass noted it, the
    flat position of the k-th entry of the ranking (ties by position), by (input, index into
    ``ks[t]``).

    Exact, without a sort of the tensor: a first pass samples every ``n / 2**17``-th value to
    bracket each order statistic, a second counts the values above the bracket and keeps those
    inside it (about 1% of the tensor; with ``bracket``, in one compiled loop per chunk, with
    their positions), among which the k-th is selected; every value equal to it lies inside
    the bracket, so the counts, and the positions of the entries tied at it, are exact too.
    Tensors of at most ``_EXACT`` values, and an input whose bracket misses (a sampling
    outlier; the counts tell), are gathered whole instead; a bracket of a single value (a run
    of one magnitude) is only counted.
    """
    which = [t for t, k in enumerate(ks) if k]
    out: list[list[Order]] = [[] for _ in ks]
    whole: dict[int, torch.Tensor] = {}
    kth_at: dict[tuple[int, int], int] = {}
    if not which:
        return out, whole, kth_at
    if n <= _EXACT:
        redo = which
    else:
        redo = _bracketed(chunks, n, ks, which, out, kth_at, bracket)
    if redo:
        for t, v in zip(redo, _gather(chunks, redo)):
            whole[t] = v
            out[t] = [Order.of(v, _kth(v, k)) for k in ks[t]]
    return out, whole, kth_at


def _bracketed(chunks: ChunkStream, n: int, ks: list[list[int]], which: list[int],
               out: list[list[Order]], kth_at: dict[tuple[int, int], int],
               bracket: BracketPass | None) -> list[int]:
    """:func:`kth_largest_abs`'s sampled brackets: fills ``out`` (and ``kth_at``, for the
    inputs whose every chunk the compiled ``bracket`` pass took) for the inputs in ``which``
    whose brackets hold their k-th largest values; returns the others."""
    stride = max(1, n // _SAMPLE)
    samples = [[] for _ in which]
    for _, xs in chunks(which):
        for s, x in zip(samples, xs):
            s.append(x.reshape(-1)[::stride].abs())
    brackets = []
    for t, s in zip(which, samples):
        s = torch.sort(torch.cat(s), descending=True).values
        m = s.numel()
        per_k = []
        for k in ks[t]:
            p = k * m / n
            margin = 6 * math.sqrt(p * max(0.0, 1 - p / m)) + 16
            hi = s[int(p - margin)].item() if p - margin >= 0 else math.inf
            lo = s[int(p + margin)].item() if p + margin < m else -math.inf
            per_k.append((lo, hi))
        brackets.append(per_k)
    above = [[0] * len(ks[t]) for t in which]
    # a bracket of one value (a run of equal magnitudes: the zeros of a sparse delta, the
    # one scale of a row of a 1-bit one) only counts its entries; others keep theirs
    inside: list[list[Appended | int | None]] = [
        [0 if lo == hi else None for lo, hi in per_k] for per_k in brackets]
    # the candidates' flat positions, while the compiled pass took every chunk of the input
    where: list[list[Appended] | None] = [[Appended(torch.int64) for _ in per_k]
                                          for per_k in brackets]
    floors = [min(lo for lo, _ in per_k) for per_k in brackets]
    offset = 0
    for _, xs in chunks(which):
        for i, x in enumerate(xs):
            done = bracket(x, brackets[i], offset) if bracket is not None else None
            if done is not None:
                for j, (count, got) in enumerate(zip(*done)):
                    above[i][j] += count
                    if isinstance(got, int):
                        inside[i][j] += got
                        continue
                    if inside[i][j] is None:
                        inside[i][j] = Appended(got[0].dtype)
                    inside[i][j].append(got[0])
                    if where[i] is not None:
                        where[i][j].append(got[1])
                continue
            where[i] = None
            v = x.reshape(-1).abs()
            if floors[i] > -math.inf:  # what every count below needs: at or above a bracket
                v = v[v >= floors[i]]
            for j, (lo, hi) in enumerate(brackets[i]):
                above[i][j] += int((v > hi).sum())
                if lo == hi:
                    inside[i][j] += int((v == hi).sum())
                else:
                    if inside[i][j] is None:
                        inside[i][j] = Appended(v.dtype, v.device)
                    inside[i][j].append(v[(v >= lo) & (v <= hi)])
        offset += xs[0].numel() if xs else 0
    missed = []
    for i, t in enumerate(which):
        row, at = [], {}
        for j, k in enumerate(ks[t]):
            cand = inside[i][j]
            if cand is None:  # no chunk: an empty tensor
                cand = Appended(torch.float32)
            count = cand if isinstance(cand, int) else cand.size
            if not above[i][j] < k <= above[i][j] + count:
                missed.append(t)
                break
            if isinstance(cand, int):
                row.append(Order(brackets[i][j][1], above[i][j], count))
                continue
            cand = cand.values()
            order = Order.of(cand, _kth(cand, k - above[i][j]))
            row.append(order._replace(above=order.above + above[i][j]))
            if where[i] is not None:  # the k-th: the (k - above)-th tied at it, by position
                tied = where[i][j].values()[cand == order.value]
                at[(t, j)] = int(tied[k - row[-1].above - 1])
        else:  # no bracket missed: the input's positions stand
            kth_at.update(at)
        out[t] = row
    return sorted(set(missed))


def _kth(values: torch.Tensor, k: int) -> float:
    return float(torch.kthvalue(values.reshape(-1).float(), values.numel() - k + 1).values)


def _gather(chunks: ChunkStream, which: list[int]) -> list[torch.Tensor]:
    """|x| of the inputs in ``which``, each whole, flat and in order."""
    parts = [[] for _ in which]
    for _, xs in chunks(which):
        for p, x in zip(parts, xs):
            p.append(x.reshape(-1).abs())
    return [torch.cat(p) for p in parts]


def located(order: Order, k: int, ties: str, locate: bool = False) -> bool:
    """Whether the top-k cut's tie end is a tied entry's position: where it keeps only some
    of the entries tied at its value, or (``locate``) whenever ``ties`` is ``index``."""
    return ties == "index" and (locate or k - order.above < order.tied)


def cut_at(order: Order, k: int, n: int, ties: str, magnitudes: torch.Tensor | None = None,
           locate: bool = False) -> Cut:
    """The cut keeping the k first of n entries whose k-th largest value and counts are
    ``order``: the r = k − above first entries tied at it by position (``ties: index``; the
    tie end is the r-th one's position + 1 where it splits them or with ``locate``, else n) or
    all of them (``ties: threshold``). ``magnitudes`` (the whole flat |x|, in order) is needed
    only for a located tie end."""
    if not located(order, k, ties, locate):
        return Cut(order.value, n, order.above + order.tied)
    at = torch.nonzero(magnitudes.reshape(-1) == order.value).reshape(-1)
    return Cut(order.value, int(at[k - order.above - 1]) + 1, k)


def top_k_cuts(chunks: ChunkStream, n: int, ks: list[list[int]], ties: str,
               locate: bool = False, bracket: BracketPass | None = None) -> list[list[Cut]]:
    """For each input t and each k in ``ks[t]`` (1 <= k <= n), the :class:`Cut` keeping its k
    largest |x| (``ties: index``: exactly k, ties by position; ``threshold``: all tied; tie
    ends as :func:`cut_at`).

    :func:`kth_largest_abs` (with the compiled ``bracket`` pass where given) finds the k-th
    value and the counts; where the cut falls inside a run of tied values of an input not
    gathered whole, the position of the r-th tied entry is the one that pass noted, or else one
    more pass over the chunks (stopping where the last such run is resolved) finds it.
    """
    orders, whole, kth_at = kth_largest_abs(chunks, n, ks, bracket)
    out: list[list[Cut | None]] = [[None] * len(row) for row in orders]
    pending: dict[tuple[int, int], int] = {}  # (input, index into ks) -> ties still to pass
    for t, row in enumerate(orders):
        for j, (k, order) in enumerate(zip(ks[t], row)):
            if t in whole or not located(order, k, ties, locate):
                out[t][j] = cut_at(order, k, n, ties, whole.get(t), locate)
            elif (t, j) in kth_at:
                out[t][j] = Cut(order.value, kth_at[(t, j)] + 1, k)
            else:
                pending[(t, j)] = k - order.above
    which = sorted({t for t, _ in pending})
    offset = 0
    for _, xs in (chunks(which) if pending else ()):
        for t, x in zip(which, xs):
            v = x.reshape(-1).abs()
            for j, r in [(j, r) for (u, j), r in pending.items() if u == t]:
                at = v == orders[t][j].value
                count = int(at.sum())
                if count < r:
                    pending[(t, j)] = r - count
                    continue
                tie = offset + int(torch.nonzero(at).reshape(-1)[r - 1])
                out[t][j] = Cut(orders[t][j].value, tie + 1, ks[t][j])
                del pending[(t, j)]
        if not pending:
            break
        offset += xs[0].numel()
    return out


def kth_rank(density: float, n: int) -> int | None:
    """How many of n entries a magnitude trim at ``density`` keeps, k = max(1, int(density·n));
    ``None`` where no selection is needed (density >= 1 keeps all, <= 0 none, or n = 0)."""
    return max(1, int(density * n)) if 0 < density < 1 and n else None


def trim_count(density: float, n: int) -> int:
    """How many of n entries a magnitude trim at ``density`` keeps (all at density >= 1)."""
    return n if density >= 1 else kth_rank(density, n) or 0


def planned(densities: list[list[float]], numels: list[int],
            count: Callable[[float, int], float]) -> list[float]:
    """Per input, Σ over tensors of ``count(its density there, the tensor's size)``."""
    inputs = len(densities[0]) if densities else 0
    return [sum(count(ds[t], n) for ds, n in zip(densities, numels)) for t in range(inputs)]


#: approximate thresholds (``tolerance``): the chance that one input's threshold misses its
#: bound, per tensor; a tolerance whose sample would hold more than ``SAMPLE_MAX_SHARE`` of the
#: tensor selects exactly
SAMPLE_FAILURE, SAMPLE_MAX_SHARE = 1e-6, 0.25


@functools.lru_cache(maxsize=64)
def sample_positions(n: int, tolerance: float) -> torch.Tensor | None:
    """The random sample that approximate cuts are selected from: sorted flat positions
    (int64) of c values drawn uniformly with replacement; ``None`` where c would exceed
    ``SAMPLE_MAX_SHARE`` of n (select exactly then).

    The draws are rejection-sampled from 62-bit integers with a fixed seed, so the sample is
    exactly uniform and the same on every device and in every run. c is the least count with
    2·exp(−2c(ε − 1/c)²) <= ``SAMPLE_FAILURE``: Hoeffding's bound on the sampled share above a
    value, which holds however the values are arranged (see :func:`magnitude_cuts`);
    about 14.5 / (2ε²), e.g. 72,744 at ε = 0.01, whatever n is.
    """
    if not 0 < tolerance < 0.5:
        raise ValueError(f"tolerance must be in (0, 0.5), not {tolerance!r}")
    a = math.log(2 / SAMPLE_FAILURE)
    # ε·c − 1 >= sqrt(a·c / 2) is a quadratic in sqrt(c): its root, then up past rounding
    c = math.ceil(((math.sqrt(a / 2) + math.sqrt(a / 2 + 4 * tolerance)) / (2 * tolerance)) ** 2)
    while 2 * c * (tolerance - 1 / c) ** 2 < a:
        c += 1
    if c > SAMPLE_MAX_SHARE * n:
        return None
    limit = (1 << 62) // n * n  # draws below it are uniform modulo n
    gen = torch.Generator().manual_seed(0x5EED)
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < c:
        draws = torch.randint(0, 1 << 62, (c,), generator=gen, dtype=torch.int64)
        picked = torch.cat([picked, draws[draws < limit] % n])
    return picked[:c].sort().values


def sampled(chunks: ChunkStream, positions: torch.Tensor) -> ChunkStream:
    """``chunks`` restricted to the values at ``positions`` (sorted flat positions; one drawn
    twice is yielded twice), in the same order."""

    def stream(which: list[int] | None = None):
        start = 0
        for base, xs in chunks(which):
            m = xs[0].numel() if xs else base.numel()
            lo, hi = (int(torch.searchsorted(positions, v)) for v in (start, start + m))
            pick = positions[lo:hi] - start
            yield (None if base is None else base.reshape(-1)[pick.to(base.device)],
                   [x.reshape(-1)[pick.to(x.device)] for x in xs])
            start += m
    return stream


def check_ties(rule: Any) -> None:
    """The ``ties`` parameter: ``index`` (exactly k, ties by position) or ``threshold``."""
    if rule not in ("index", "threshold"):
        raise ValueError(f"ties must be 'index' (keep exactly int(density·n), ties by position) "
                         f"or 'threshold' (keep every entry tied with the k-th), not {rule!r}")


def magnitude_cuts(chunks: ChunkStream, n: int, densities: list[float],
                   tolerance: float | None = None, ties: str = "index",
                   locate: bool = False, bracket: BracketPass | None = None
                   ) -> list[Cut | None]:
    """Per input, the trim's :class:`Cut` at its density: the top k = :func:`kth_rank` entries
    (``ties`` and the compiled ``bracket`` pass as :func:`top_k_cuts`); ``None`` keeps all
    (density >= 1), :data:`NOTHING` none (density <= 0). ``locate``: tie ends as
    :func:`cut_at` (a sample's cut needs it).

    ``tolerance`` ε: instead of the top k of the tensor, the cut at the k_s-th entry of a random
    sample of S values (:func:`sample_positions`) in the same ranking, k_s = max(1, int(d·S));
    tensors too small to gain select exactly. With probability at least 1 − ``SAMPLE_FAILURE``
    per input that entry lies between the exact cuts at densities d + ε and d − ε, i.e. the
    trim keeps a share of the tensor within ε of d. With ``ties: threshold`` the bound holds for
    the entries above the threshold; all those tied with it are kept besides.

    Why: the ranking is a total order (magnitude, then position). Say the sampled cut kept more
    than u, the exact cut at d − ε. Then at least k_s >= d·S − 1 sampled values rank before
    u's last entry, while a share d − ε of the tensor does: the sample's share beats its mean
    by more than ε − 1/S. Had it kept less than the exact cut at d + ε, which a share
    d + ε − 1/n reaches, fewer than d·S sampled values would reach it. Hoeffding bounds each
    event by exp(−2S(ε − 1/S)²).
    """
    if tolerance and (positions := sample_positions(n, tolerance)) is not None:
        cuts = magnitude_cuts(sampled(chunks, positions), positions.numel(), densities,
                              ties=ties, locate=True)
        return [sampled_cut(c, positions, n, ties) for c in cuts]
    ks = [[k] if (k := kth_rank(d, n)) else [] for d in densities]
    found = top_k_cuts(chunks, n, ks, ties, locate, bracket)
    return [None if d >= 1 or not n else NOTHING if d <= 0 else f[0]
            for d, f in zip(densities, found)]


def sampled_cut(cut: Cut | None, positions: torch.Tensor, n: int, ties: str) -> Cut | None:
    """A cut selected over the values at ``positions`` (sorted flat positions; its tie end
    located, see :func:`cut_at`) as a cut of the whole tensor of n values: the tie end moves
    to the flat position after the last kept tied sample (``ties: index``), or to n (all tied
    kept, ``ties: threshold``)."""
    if cut is None or cut.tie_end <= 0:
        return cut
    if ties == "threshold":
        return Cut(cut.threshold, n)
    return Cut(cut.threshold, int(positions[cut.tie_end - 1]) + 1)
