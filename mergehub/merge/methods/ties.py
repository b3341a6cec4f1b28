"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean, scale.

1. Trim each τt to its largest-magnitude entries (``density``), per tensor (``trim_scope:
   tensor``, mergekit's and PEFT's default) or over the whole flattened task vector
   (``trim_scope: global``, the paper's code; costs two extra reads of the inputs to find each
   task's exact threshold). ``density_tolerance: ε`` (a mergehub extension, default 0: exact)
   takes each per-tensor threshold from a random sample instead, so that the trim keeps within ε
   of the density with probability >= 1 − 1e-6 per tensor and input
   (``sparsify.magnitude_thresholds``); the GPU finds it in a few small launches instead of a
   pass over the inputs.
2. Elect a sign per entry from the weighted, trimmed vectors: ``sign_method: sum`` (total
   mass, the paper and mergekit) or ``count`` (PEFT's "frequency").
3. Disjoint mean: average only the agreeing entries (weighted, divided by the agreeing weights
   when ``normalize``, as mergekit does; with unit weights this is the paper's mean).
4. θ = θ0 + λ τm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mergehub.merge.methods.base import MergeMethod, TensorContext, register
from mergehub.merge.methods.sparsify import (
    ChunkStream, apply_mask, combine, l1_scales, magnitude_thresholds, threshold_mask)

_BINS = 1 << 15  # top 16 bits of a non-negative float32: sign (always 0) + 15 bits


class GlobalThresholds:
    """Exact k-th largest |τt| over all tensors of each task vector, in two streamed passes.

    Pass 1 histograms the top 16 bits of each |τ| (the bits order non-negative floats); the bin
    holding the k-th largest is then known. Pass 2 keeps only that bin's values and selects the
    exact threshold among them. Memory: one histogram per task plus one bin's values.
    """

    def __init__(self, densities: list[float]):
        self.densities = densities
        self.hist = [torch.zeros(_BINS, dtype=torch.int64) for _ in densities]
        self.total = 0
        self.bins: list[int] = []
        self.rank: list[int] = []
        self.candidates: list[list[torch.Tensor]] = [[] for _ in densities]

    @staticmethod
    def _keys(x: torch.Tensor) -> torch.Tensor:
        return (x.abs().float().reshape(-1).view(torch.int32) >> 16).long()

    def observe(self, rnd: int, xs: list[torch.Tensor]) -> None:
        if rnd == 0:
            self.total += xs[0].numel()
            for h, x in zip(self.hist, xs):
                h += torch.bincount(self._keys(x), minlength=_BINS).cpu()
        else:
            for t, x in enumerate(xs):
                flat = x.abs().float().reshape(-1)
                self.candidates[t].append(flat[self._keys(x) == self.bins[t]].cpu())

    def finish(self, rnd: int) -> list[float] | None:
        if rnd == 0:
            for h, density in zip(self.hist, self.densities):
                k = max(1, int(density * self.total))
                above = torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])  # count >= bin
                b = int(torch.nonzero(above >= k).max())
                self.bins.append(b)
                self.rank.append(k - (int(above[b + 1]) if b + 1 < _BINS else 0))
            return None
        out = []
        for values, r in zip(self.candidates, self.rank):
            allv = torch.cat(values)
            out.append(float(torch.kthvalue(allv, allv.numel() - r + 1).values))
        return out


@register
class Ties(MergeMethod):
    name = "ties"
    model_params = {"weight": 1.0, "density": 1.0}
    global_params = {"lambda": 1.0, "normalize": True, "rescale": False, "int8_mask": False,
                     "trim_scope": "tensor", "sign_method": "sum", "density_tolerance": 0.0}

    def validate(self, model_params: list[dict[str, Any]], labels: list[str]) -> None:
        if self.params["trim_scope"] not in ("tensor", "global"):
            raise ValueError(f"trim_scope must be 'tensor' or 'global', not {self.params['trim_scope']!r}")
        if self.params["sign_method"] not in ("sum", "count"):
            raise ValueError(f"sign_method must be 'sum' or 'count', not {self.params['sign_method']!r}")
        tolerance = self.params["density_tolerance"]
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
                or not 0 <= tolerance < 0.5:
            raise ValueError(f"density_tolerance must be a number in [0, 0.5), not {tolerance!r}")
        if tolerance and self.params["trim_scope"] == "global":
            raise ValueError("density_tolerance applies to trim_scope: tensor (global thresholds "
                             "are always exact)")
        if self.params["trim_scope"] == "global":
            for p, label in zip(model_params, labels):
                if not isinstance(p["density"], (int, float)):
                    raise ValueError(f"{label}: trim_scope global needs one density per model, "
                                     f"not {p['density']!r}")
            self._global = GlobalThresholds([float(p["density"]) for p in model_params])

    def prepass_rounds(self) -> int:
        return 2 if self.params["trim_scope"] == "global" else 0

    def observe(self, rnd: int, xs: list[torch.Tensor], model_params: list[dict[str, Any]],
                ctx: TensorContext) -> None:
        self._global.observe(rnd, xs)

    def finish_round(self, rnd: int, state: dict[str, Any]) -> None:
        thresholds = self._global.finish(rnd)
        if thresholds is not None:
            state["ties_thresholds"] = thresholds

    def tensor_stats(self, chunks: ChunkStream, model_params: list[dict[str, Any]],
                     ctx: TensorContext) -> None:
        thresholds = self._thresholds(model_params, ctx, lambda densities: magnitude_thresholds(
            chunks, ctx.state["numel"], densities, self._tolerance))
        scales = [1.0] * len(model_params)
        if self.params["rescale"]:
            scales = l1_scales(chunks, lambda t, c, x: threshold_mask(x, thresholds[t]),
                               len(model_params))
        ctx.state["trim"] = (thresholds, scales)

    @staticmethod
    def _thresholds(model_params: list[dict[str, Any]], ctx: TensorContext,
                    per_tensor: Callable[[list[float]], list[float | None]]
                    ) -> list[float | None]:
        """Each input's trim threshold: the global ones (``trim_scope: global``, found in the
        pre-passes) or ``per_tensor(densities)`` for this tensor."""
        densities = [float(p["density"]) for p in model_params]
        global_thresholds = ctx.state.get("ties_thresholds")
        if global_thresholds is None:
            return per_tensor(densities)
        return [t if d < 1 else None for t, d in zip(global_thresholds, densities)]

    @property
    def _tolerance(self) -> float | None:
        return float(self.params["density_tolerance"]) or None

    @property
    def fusable(self) -> bool:
        return not self.params["rescale"]  # the L1 rescale needs its own pass: merged in chunks

    def fused(self, base: torch.Tensor, thetas: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> dict[str, Any]:
        from mergehub import kernels

        def per_tensor(densities: list[float]) -> list[float | None]:
            return kernels.magnitude_thresholds(base, thetas, densities,
                                                tolerance=self._tolerance, name=ctx.name)

        thresholds = self._thresholds(model_params, ctx, per_tensor)
        return {**self.mix_args(model_params), "thresholds": thresholds,
                "elect": self.params["sign_method"]}

    def trim(self, xs: list[torch.Tensor], ctx: TensorContext) -> list[torch.Tensor]:
        """Step 1: each task vector restricted to its largest magnitudes."""
        thresholds, scales = ctx.state["trim"]
        return [apply_mask(x, threshold_mask(x, th), s) for x, th, s in zip(xs, thresholds, scales)]

    def merged_delta(self, xs: list[torch.Tensor], model_params: list[dict[str, Any]],
                     ctx: TensorContext) -> torch.Tensor:
        """Steps 1-3: τm, the disjoint mean of the trimmed, sign-elected task vectors."""
        return combine(self.trim(xs, ctx), model_params, self.params["sign_method"],
                       self.params["normalize"])

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        return base + float(self.params["lambda"]) * self.merged_delta(xs, model_params, ctx)
