"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean, scale.

1. Trim each τt to its k = int(density·n) largest-magnitude entries, equal magnitudes taken
   by flat position, lowest first (``ties: index``, as many as mergekit keeps; ``threshold``
   keeps every entry tied with the k-th largest instead), per tensor (``trim_scope: tensor``,
   mergekit's and PEFT's default) or over the whole flattened task vector (``trim_scope:
   global``, the paper's code; costs two extra reads of the inputs to find each task's exact
   cut, three where it splits a run of ties). ``density_tolerance: ε`` (a mergehub extension,
   default 0: exact) takes each per-tensor cut from a random sample instead, so that the trim
   keeps within ε of the density with probability >= 1 − 1e-6 per tensor and input
   (``sparsify.magnitude_cuts``); the GPU finds it in a few small launches instead of a pass
   over the inputs.
2. Elect a sign per entry from the weighted, trimmed vectors: ``sign_method: sum`` (total
   mass, the paper and mergekit) or ``count`` (PEFT's "frequency").
3. Disjoint mean: average only the agreeing entries (weighted, divided by the agreeing weights
   when ``normalize``, as mergekit does; with unit weights this is the paper's mean).
4. θ = θ0 + λ τm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from mergehub.merge.methods import fast, onepass
from mergehub.merge.methods.base import MergeMethod, TensorContext, register
from mergehub.ops.sparsify import (
    NOTHING, ChunkStream, Cut, KeptTally, Order, apply_mask, cut_at,
    cut_mask, kth_rank, l1_scales, located, magnitude_cuts, planned, trim_count)

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
    """

    def __init__(self, densities: list[float], ties: str):
        self.densities = densities
        self.ties = ties
        self.total = 0
        self.high = [torch.zeros(_BINS, dtype=torch.int64) for _ in densities]
        self.low = [torch.zeros(_BINS, dtype=torch.int64) for _ in densities]
        self.ks = [0] * len(densities)  # k per task (0: no selection), once the total is known
        self.bins = [0] * len(densities)
        self.cuts: list[Cut | None] = [None] * len(densities)
        self.selected = False  # pass 2 done
        self.split: set[int] = set()  # tasks whose cut splits a run of ties
        self.pending: dict[int, int] = {}  # pass 3: task -> tied values still to pass
        self.ends: list[dict[str, int]] = [{} for _ in densities]  # pass 3: tensor -> tie end
        self.tensor, self.offset = None, 0

    @staticmethod
    def _bits(x: torch.Tensor) -> torch.Tensor:
        return x.abs().float().reshape(-1).view(torch.int32).long()

    def rounds(self) -> int:
        """Passes needed in all: 3 until pass 2 has shown that no cut splits a run of ties."""
        return 3 if self.pending or not self.selected else 2

    def observe(self, rnd: int, name: str, xs: list[torch.Tensor]) -> None:
        """See one chunk of tensor ``name`` (chunks in order, tensors in merge order)."""
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

    def finish(self, rnd: int) -> None:
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

    def tensor_cuts(self, name: str, n: int) -> list[Cut | None]:
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


@register
class Ties(MergeMethod):
    name = "ties"
    model_params = {"weight": 1.0, "density": 1.0}
    global_params = {"lambda": 1.0, "normalize": True, "rescale": False, "int8_mask": False,
                     "trim_scope": "tensor", "sign_method": "sum", "density_tolerance": 0.0,
                     "ties": "index"}

    def __init__(self, params: dict[str, Any]):
        super().__init__(params)
        self.tally = KeptTally()
        self._global: GlobalCuts | None = None

    def validate(self, model_params: list[dict[str, Any]], labels: list[str]) -> None:
        if self.params["density_tolerance"] and self.params["trim_scope"] == "global":
            raise ValueError("density_tolerance applies to trim_scope: tensor (global thresholds "
                             "are always exact)")
        if self.params["trim_scope"] == "global":
            for p, label in zip(model_params, labels):
                if not isinstance(p["density"], (int, float)):
                    raise ValueError(f"{label}: trim_scope global needs one density per model, "
                                     f"not {p['density']!r}")
            self._global = GlobalCuts([float(p["density"]) for p in model_params],
                                      self.params["ties"])

    def prepass_rounds(self) -> int:
        return 0 if self._global is None else self._global.rounds()

    def observe(self, rnd: int, xs: list[torch.Tensor], model_params: list[dict[str, Any]],
                ctx: TensorContext) -> None:
        self._global.observe(rnd, ctx.name, xs)

    def finish_round(self, rnd: int, state: dict[str, Any]) -> None:
        self._global.finish(rnd)

    def tensor_stats(self, chunks: ChunkStream, model_params: list[dict[str, Any]],
                     ctx: TensorContext) -> None:
        cuts = self._cuts(model_params, ctx, lambda densities: magnitude_cuts(
            chunks, ctx.state["numel"], densities, self._tolerance, self.params["ties"]))
        scales = [1.0] * len(model_params)
        if self.params["rescale"]:
            scales = l1_scales(chunks, lambda t, c, offset, x: cut_mask(x, cuts[t], offset),
                               len(model_params))
        ctx.state["trim"] = (cuts, scales)

    def _cuts(self, model_params: list[dict[str, Any]], ctx: TensorContext,
              per_tensor: Callable[[list[float]], list[Cut | None]]) -> list[Cut | None]:
        """Each input's trim of this tensor: its part of the global cut (``trim_scope:
        global``, found in the pre-passes) or ``per_tensor(densities)``; the per-tensor
        counts go into :attr:`tally`."""
        n = ctx.state["numel"]
        if self._global is not None:
            return self._global.tensor_cuts(ctx.name, n)
        densities = [float(p["density"]) for p in model_params]
        cuts = per_tensor(densities)
        for t, (cut, d) in enumerate(zip(cuts, densities)):
            self.tally.add(t, n if cut is None else cut.kept, kth_rank(d, n) or 0, n)
        return cuts

    def merge_chunks(self, chunks: ChunkStream, ranges: list[tuple[int, int]],
                     model_params: list[dict[str, Any]], ctx: TensorContext
                     ) -> Iterable[torch.Tensor]:
        """On the CPU, exact per-tensor trims are selected during the merge's own read
        (:func:`onepass.one_pass_ties`) where the tensor allows it; otherwise the cuts first
        (:meth:`tensor_stats`, more reads), then the merge chunk by chunk: the same bits."""
        if self._one_pass(ctx):
            n = ctx.state["numel"]
            ks = [None if d >= 1 or not n else kth_rank(d, n) or 0
                  for d in (float(p["density"]) for p in model_params)]
            done = onepass.one_pass_ties(
                chunks, ranges, ctx.row_size, ks, self.params["ties"],
                [float(p["weight"]) for p in model_params], self.params["sign_method"],
                bool(self.params["normalize"]), float(self.params["lambda"]), ctx.out_dtype)
            if done is not None:
                merged, cuts = done
                self._cuts(model_params, ctx, lambda _: cuts)  # the tally
                yield merged
                return
        yield from super().merge_chunks(chunks, ranges, model_params, ctx)

    def _one_pass(self, ctx: TensorContext) -> bool:
        """Whether :meth:`merge_chunks` tries the one-read path: exact per-tensor trims of
        plain TIES (a subclass's merge adds to it; ``rescale`` needs the cuts before the
        first chunk) on the CPU, a merged tensor of at most ``onepass.ONE_PASS_BYTES``, and
        inputs whose rows can be sampled (none decoded in order)."""
        return (ctx.device.type == "cpu" and self._global is None and not self._tolerance
                and not self.params["rescale"] and type(self).merge is Ties.merge
                and ctx.state.get("any_rows", False)
                and ctx.state["numel"] * ctx.out_dtype.itemsize <= onepass.ONE_PASS_BYTES)

    def kept_report(self) -> KeptTally | None:
        if self._global is not None:
            return KeptTally(self._global.kept(), [self._global.total] * len(self._global.kept()))
        return self.tally

    def planned_kept(self, densities: list[list[float]], numels: list[int]
                     ) -> tuple[list[float], str]:
        if self._global is not None:  # one cut over all tensors
            counts = planned(densities[:1], [sum(numels)], trim_count)
        else:
            counts = planned(densities, numels, trim_count)
        return counts, ("about" if self._tolerance else "exactly" if self.params["ties"] == "index"
                        else "at least")

    @property
    def _tolerance(self) -> float | None:
        return float(self.params["density_tolerance"]) or None

    @property
    def fusable(self) -> bool:
        return not self.params["rescale"]  # the L1 rescale needs its own pass: merged in chunks

    def fused(self, base: torch.Tensor, thetas: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> dict[str, Any]:
        from mergehub import kernels

        find = ctx.cut_memo or kernels.magnitude_cuts

        def per_tensor(densities: list[float]) -> list[Cut | None]:
            return find(base, thetas, densities, tolerance=self._tolerance,
                        ties=self.params["ties"], name=ctx.name)

        return {**self.mix_args(model_params), "cuts": self._cuts(model_params, ctx, per_tensor),
                "elect": self.params["sign_method"]}

    def trim(self, xs: list[torch.Tensor], ctx: TensorContext) -> list[torch.Tensor]:
        """Step 1: each task vector restricted to its largest magnitudes (on the CPU by
        :func:`fast.shrink` where it applies: the same bits)."""
        cuts, scales = ctx.state["trim"]
        out = []
        for x, cut, s in zip(xs, cuts, scales):
            kept = fast.shrink(x, cut, ctx.offset) if x.device.type == "cpu" else None
            out.append(apply_mask(x, cut_mask(x, cut, ctx.offset), s) if kept is None
                       else kept if cut is None or s == 1.0 else kept * s)
        return out

    def merged_delta(self, xs: list[torch.Tensor], model_params: list[dict[str, Any]],
                     ctx: TensorContext) -> torch.Tensor:
        """Steps 1-3: τm, the disjoint mean of the trimmed, sign-elected task vectors."""
        return fast.combine(self.trim(xs, ctx), model_params, self.params["sign_method"],
                            self.params["normalize"])

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        return fast.finish(base, self.merged_delta(xs, model_params, ctx),
                           float(self.params["lambda"]))
