"""Task arithmetic (Ilharco et al. 2023): θ = θ0 + λ Σ wt τt."""

from __future__ import annotations

from typing import Any

import torch

from mergehub.merge.methods.base import MergeMethod, TensorContext, register, weighted


def task_sum(xs: list[torch.Tensor], model_params: list[dict[str, Any]],
             normalize: bool) -> torch.Tensor:
    """Σ wt τt, divided by Σ wt when ``normalize``."""
    out = sum(weighted(xs, model_params))
    if normalize:
        out = out / sum(float(p["weight"]) for p in model_params)
    return out


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    model_params = {"weight": 1.0}
    global_params = {"lambda": 1.0, "normalize": False}

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        return base + float(self.params["lambda"]) * task_sum(xs, model_params,
                                                             self.params["normalize"])
