"""Model breadcrumbs (Davari & Belilovsky 2024): per tensor, drop the largest magnitudes
(outliers, fraction ``gamma``) and the smallest (noise), keep ``density`` of the entries in
between, then task arithmetic (``breadcrumbs``) or TIES' sign election (``breadcrumbs_ties``).
Parameter names and semantics follow mergekit's ``magnitude_outliers``.
"""

from __future__ import annotations

from typing import Any

import torch

from mergehub.merge.methods.base import MergeMethod, TensorContext, register
from mergehub.merge.methods.sparsify import apply_mask, combine, outlier_mask


class _Breadcrumbs(MergeMethod):
    model_params = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    global_params = {"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False}
    elect: str | None = None

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        kept = []
        for x, p in zip(xs, model_params):
            density = float(p["density"])
            mask = outlier_mask(x, density, float(p["gamma"]))
            kept.append(apply_mask(x, mask, density, "l1" if self.params["rescale"] else False))
        mixed = combine(kept, model_params, self.elect, self.params["normalize"])
        return base + float(self.params["lambda"]) * mixed


@register
class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"


@register
class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    elect = "sum"
