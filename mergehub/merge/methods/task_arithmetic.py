"""Task arithmetic (Ilharco et al. 2023): θ = θ0 + λ Σ wt τt (divided by Σ wt if ``normalize``)."""

from __future__ import annotations

from typing import Any

import torch

from mergehub.merge.methods.base import MergeMethod, TensorContext, register
from mergehub.ops.sparsify import combine


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    model_params = {"weight": 1.0}
    global_params = {"lambda": 1.0, "normalize": False, "int8_mask": False}

    def fused(self, base: torch.Tensor, thetas: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> dict[str, Any]:
        return self.mix_args(model_params)

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        mixed = combine(xs, model_params, None, self.params["normalize"])
        return base + float(self.params["lambda"]) * mixed
