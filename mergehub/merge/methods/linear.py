"""Linear / weighted average of weights (model soups): θ = Σ wt θt / Σ wt (``normalize``)."""

from __future__ import annotations

from typing import Any

import torch

from mergehub.merge.methods.base import MergeMethod, TensorContext, register


@register
class Linear(MergeMethod):
    name = "linear"
    model_params = {"weight": 1.0}
    global_params = {"normalize": True}
    needs_base = False
    on_deltas = False
    base_is_input = True

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        weights = [float(p["weight"]) for p in model_params]
        out = sum(w * x for w, x in zip(weights, xs))
        if self.params["normalize"]:
            total = sum(weights)
            if total == 0:
                raise ValueError(f"{ctx.name}: weights sum to 0, cannot normalize")
            out = out / total
        return out
