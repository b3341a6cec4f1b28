"""TIES' global trim (``trim_scope: global``, the TIES authors' code): each task's exact top-k
cut over all tensors of its task vector, found in streamed pre-passes before the merge."""

from __future__ import annotations

import torch

from mergehub.ops.selection import NOTHING, Cut, Order, cut_at, kth_rank, located

_BINS = 1 << 16  # a non-negative float32's bits, high half then low half (its sign is 0)


class GlobalCuts:
    """Each task's exact top-k cut over all tensors of its task vector (``trim_scope:
    global``), in streamed passes: the ranking is the per-tensor one with the tensors taken in
    merge order, one after the other.

    Pass 1 histograms the high 16 bits of each |τ| (the bits order non-negative floats), which
    tells the bin of the k-th largest; pass 2 histograms the low 16 bits of the values in that
    bin, which spells the k-th largest exactly and counts the values above it and at it. Where
    the cut keeps only some of the tied values (``ties: index``), pass 3 counts them tensor by
    tensor up to the r-th and notes its position. Memory: two histograms per task.

    The :class:`~mergehub.merge.methods.base.Prepass` of a TIES merge with a global trim.
    """

    reads = ("density",)

    def __init__(self, densities: list[float], ties: str):
        self.densities = densities
        self.ties = ties
        self.reset()

    def reset(self) -> None:
        """Forget everything seen: the next run passes from the start."""
        self.total = 0
        self.high = [torch.zeros(_BINS, dtype=torch.int64) for _ in self.densities]
        self.low = [torch.zeros(_BINS, dtype=torch.int64) for _ in self.densities]
        self.ks = [0] * len(self.densities)  # k per task (0: no selection), once the total is known
        self.bins = [0] * len(self.densities)
        self.cuts: list[Cut | None] = [None] * len(self.densities)
        self.selected = False  # pass 2 done
        self.split: set[int] = set()  # tasks whose cut splits a run of ties
        self.pending: dict[int, int] = {}  # pass 3: task -> tied values still to pass
        self.ends: list[dict[str, int]] = [{} for _ in self.densities]  # pass 3: tensor -> tie end
        self.tensor, self.offset = None, 0
        self.passes = 0

    @staticmethod
    def _bits(x: torch.Tensor) -> torch.Tensor:
        return x.abs().float().reshape(-1).view(torch.int32).long()

    def rounds(self) -> int:
        """Passes needed in all: 3 until pass 2 has shown that no cut splits a run of ties."""
        return 3 if self.pending or not self.selected else 2

    def observe(self, name: str, xs: list[torch.Tensor]) -> None:
        """See one chunk of tensor ``name`` (chunks in order, tensors in merge order)."""
        rnd = self.passes
        if rnd == 0:
            self.total += xs[0].numel()
            for h, x in zip(self.high, xs):
                h += torch.bincount(self._bits(x) >> 16, minlength=_BINS).cpu()
        elif rnd == 1:
            for t, x in enumerate(xs):
                if self.ks[t]:
                    bits = self._bits(x)
                    low = bits[(bits >> 16) == self.bins[t]] & 0xFFFF
                    self.low[t] += torch.bincount(low, minlength=_BINS).cpu()
        else:
            if name != self.tensor:
                self.tensor, self.offset = name, 0
            for t, r in list(self.pending.items()):
                at = xs[t].reshape(-1).abs() == self.cuts[t].threshold
                count = int(at.sum())
                if count < r:  # every tie of the chunk is kept
                    self.pending[t] = r - count
                    self.ends[t][name] = self.offset + xs[t].numel()
                else:
                    self.ends[t][name] = self.offset + int(torch.nonzero(at).reshape(-1)[r - 1]) + 1
                    del self.pending[t]
            self.offset += xs[0].numel()

    def finish(self) -> None:
        """End the current pass: after the first, each task's bin; after the second, its cut."""
        rnd = self.passes
        self.passes += 1
        if rnd == 0:
            for t, (h, density) in enumerate(zip(self.high, self.densities)):
                self.ks[t] = kth_rank(density, self.total) or 0
                if self.ks[t]:
                    self.bins[t] = int(torch.nonzero(_at_least(h) >= self.ks[t]).max())
        elif rnd == 1:
            for t, k in enumerate(self.ks):
                if k:
                    self.cuts[t] = self._cut(t, k)
            self.selected = True

    def _cut(self, t: int, k: int) -> Cut:
        b = self.bins[t]
        higher = int(_at_least(self.high[t])[b + 1]) if b + 1 < _BINS else 0
        low = self.low[t]
        at_least = _at_least(low)
        sel = int(torch.nonzero(at_least >= k - higher).max())
        value = torch.tensor((b << 16) | sel, dtype=torch.int32).view(torch.float32)
        order = Order(float(value), higher + int(at_least[sel] - low[sel]), int(low[sel]))
        if located(order, k, self.ties):  # pass 3 finds the tie end
            self.split.add(t)
            self.pending[t] = k - order.above
            return Cut(order.value, 0, k)
        return cut_at(order, k, self.total, self.ties)

    def for_tensor(self, name: str, n: int) -> list[Cut | None]:
        """Each task's cut restricted to one tensor of n values (``None``: no trim): split
        ties are kept up to the position pass 3 noted, all of them in the tensors before its,
        none after."""
        out = []
        for t, (cut, density) in enumerate(zip(self.cuts, self.densities)):
            if density >= 1:
                out.append(None)
            elif cut is None:
                out.append(NOTHING)
            elif t in self.split:
                out.append(cut.restricted(self.ends[t].get(name, 0)))
            else:
                out.append(cut.restricted(n))
        return out

    def kept(self) -> list[int]:
        """Entries each task's cut keeps over the whole task vector."""
        return [self.total if d >= 1 else 0 if c is None else c.kept
                for c, d in zip(self.cuts, self.densities)]


def _at_least(h: torch.Tensor) -> torch.Tensor:
    """Per bin of a histogram, the count in it or above it."""
    return torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])
