"""DARE (Yu et al. 2024): drop and rescale, then task arithmetic (``dare_linear``) or the TIES
sign election and disjoint mean (``dare_ties``).

Each entry of τt is kept with probability ``density`` (= 1 − drop rate p), drawn from a
generator seeded by (``seed``, tensor name, input index): the same seed gives the same output
whatever the order, device placement or number of workers. Survivors are rescaled by
1/density (``rescale: true``, the paper's: E[output] = τ), to the original L1 norm
(``rescale: l1``, mergekit 0.1.5), or not at all (``rescale: false``).
"""

from __future__ import annotations

from typing import Any

import torch

from mergehub.merge.methods.base import MergeMethod, TensorContext, register
from mergehub.merge.methods.sparsify import apply_mask, bernoulli_mask, combine


class _Dare(MergeMethod):
    model_params = {"weight": 1.0, "density": 1.0}
    global_params = {"lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False}
    elect: str | None = None

    def validate(self, model_params: list[dict[str, Any]], labels: list[str]) -> None:
        if self.params["rescale"] not in (True, False, "l1"):
            raise ValueError(f"rescale must be true, false or l1, not {self.params['rescale']!r}")

    def drop(self, xs: list[torch.Tensor], model_params: list[dict[str, Any]],
             ctx: TensorContext) -> list[torch.Tensor]:
        out = []
        for t, (x, p) in enumerate(zip(xs, model_params)):
            density = float(p["density"])
            mask = bernoulli_mask(x, density, ctx.generator("dare", t))
            out.append(apply_mask(x, mask, density, self.params["rescale"]))
        return out

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        mixed = combine(self.drop(xs, model_params, ctx), model_params, self.elect,
                        self.params["normalize"])
        return base + float(self.params["lambda"]) * mixed


@register
class DareLinear(_Dare):
    name = "dare_linear"


@register
class DareTies(_Dare):
    name = "dare_ties"
    elect = "sum"
