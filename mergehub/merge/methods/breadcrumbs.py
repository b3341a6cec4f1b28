"""Model breadcrumbs (Davari & Belilovsky 2024): per tensor, drop the largest magnitudes
(outliers, fraction ``gamma``) and the smallest (noise), keep ``density`` of the entries in
between, then task arithmetic (``breadcrumbs``) or TIES' sign election (``breadcrumbs_ties``).
Parameter names and semantics follow mergekit's ``magnitude_outliers``.
"""

from __future__ import annotations

from typing import Any

import torch

from mergehub.merge.methods.base import MergeMethod, TensorContext, register
from mergehub.merge.methods.sparsify import (
    ChunkStream, apply_mask, band_mask, combine, l1_scales, outlier_bounds)


class _Breadcrumbs(MergeMethod):
    model_params = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    global_params = {"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False}
    elect: str | None = None

    def tensor_stats(self, chunks: ChunkStream, model_params: list[dict[str, Any]],
                     ctx: TensorContext) -> None:
        bounds = outlier_bounds(chunks, ctx.state["numel"],
                                [float(p["density"]) for p in model_params],
                                [float(p["gamma"]) for p in model_params])
        scales = [1.0] * len(bounds)
        if self.params["rescale"]:
            scales = l1_scales(chunks, lambda t, c, x: band_mask(x, bounds[t]), len(bounds))
        ctx.state["band"] = (bounds, scales)

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        bounds, scales = ctx.state["band"]
        kept = [apply_mask(x, band_mask(x, b), s) for x, b, s in zip(xs, bounds, scales)]
        mixed = combine(kept, model_params, self.elect, self.params["normalize"])
        return base + float(self.params["lambda"]) * mixed


@register
class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"


@register
class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    elect = "sum"
