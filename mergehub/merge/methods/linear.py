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
        weights = torch.tensor([float(p["weight"]) for p in model_params], dtype=torch.float32,
                               device=xs[0].device)
        out = torch.zeros_like(xs[0])
        for x, w in zip(xs, weights):
            out.addcmul_(x, w)  # fused multiply-add, rounded as mergekit's accumulation is
        if self.params["normalize"]:
            total = weights.sum()
            if total == 0:
                raise ValueError(f"{ctx.name}: weights sum to 0, cannot normalize")
            out /= total
        return out
