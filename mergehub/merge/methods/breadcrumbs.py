"""Model breadcrumbs (Davari & Belilovsky 2024): per tensor, drop the largest magnitudes
(outliers, fraction ``gamma``) and the smallest (noise), keep ``density`` of the entries in
between, then task arithmetic (``breadcrumbs``) or TIES' sign election (``breadcrumbs_ties``).
Parameter names and semantics follow mergekit's ``magnitude_outliers``: exactly int(density·n)
entries are kept, the ranking's ties broken by position (``ties: index``, see
:mod:`~mergehub.ops.sparsify`); ``ties: threshold`` keeps the band between the two
values at those ranks instead (ties at its upper end kept, at its lower end dropped).
"""

from __future__ import annotations

from typing import Any

import torch

from mergehub.merge.methods import fast
from mergehub.merge.methods.base import MergeMethod, TensorContext, register
from mergehub.ops.sparsify import (
    ChunkStream, KeptTally, apply_mask, band_kept, band_mask, l1_scales,
    outlier_bands, planned)


class _Breadcrumbs(MergeMethod):
    model_params = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    global_params = {"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False,
                     "ties": "index"}
    elect: str | None = None

    def __init__(self, params: dict[str, Any]):
        super().__init__(params)
        self.tally = KeptTally()

    def tensor_stats(self, chunks: ChunkStream, model_params: list[dict[str, Any]],
                     ctx: TensorContext) -> None:
        n = ctx.state["numel"]
        bands = outlier_bands(chunks, n, [float(p["density"]) for p in model_params],
                              [float(p["gamma"]) for p in model_params], self.params["ties"])
        for t, band in enumerate(bands):
            self.tally.add(t, band_kept(band, n), 0, n)
        scales = [1.0] * len(bands)
        if self.params["rescale"]:
            scales = l1_scales(chunks, lambda t, c, offset, x: band_mask(x, bands[t], offset),
                               len(bands))
        ctx.state["band"] = (bands, scales)

    def kept_report(self) -> KeptTally | None:
        return self.tally

    def planned_kept(self, densities: list[list[float]], numels: list[int]
                     ) -> tuple[list[float], str]:
        counts = planned(densities, numels, lambda d, n: n if d >= 1 else max(0, int(d * n)))
        return counts, "exactly" if self.params["ties"] == "index" else "about"

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        bands, scales = ctx.state["band"]
        kept = [apply_mask(x, band_mask(x, b, ctx.offset), s) for x, b, s in zip(xs, bands, scales)]
        mixed = fast.combine(kept, model_params, self.elect, self.params["normalize"])
        return fast.finish(base, mixed, float(self.params["lambda"]))


@register
class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"


@register
class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    elect = "sum"
