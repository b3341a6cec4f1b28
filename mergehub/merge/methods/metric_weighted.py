"""Metrics-weighted averaging of checkpoints (MWA; Choi & Yu 2025).

Weights from one penalty factor p >= 0 (p = 0: the uniform average), normalized to sum to 1:
loss-weighted wi ∝ Li^(−p) (lower loss, more weight) or step-weighted wi ∝ si^p (later, more
weight); θ = Σ wi θi. For LoRA inputs θi = θ0 + Bi·Ai·scaling, so this averages the dense
deltas exactly (no approximation through A and B separately).

Each input's loss / step comes from its ``loss`` / ``step`` parameter in the recipe, else from
its metrics: the store's metrics, or ``metrics.json`` / ``all_results.json`` /
``trainer_state.json`` beside the checkpoint (``eval_loss`` is used when there is no ``loss``).
"""

from __future__ import annotations

from typing import Any

import torch

from mergehub.errors import shown
from mergehub.merge.methods.base import MergeMethod, TensorContext, register


def mwa_weights(values: list[float], metric: str, penalty: float) -> list[float]:
    """Normalized weights: ``v^-p`` for losses, ``v^p`` for steps."""
    exponent = -penalty if metric == "loss" else penalty
    raw = [float(v) ** exponent for v in values]
    total = sum(raw)
    return [r / total for r in raw]


@register
class MetricWeighted(MergeMethod):
    name = "metric_weighted"
    model_params = {"loss": None, "step": None}
    global_params = {"metric": "loss", "penalty": 1.0}
    needs_base = False
    on_deltas = False

    @classmethod
    def params_from_metrics(cls, metrics: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, names in (("loss", ("loss", "eval_loss", "train_loss")),
                           ("step", ("step", "global_step"))):
            value = next((metrics[n] for n in names if metrics.get(n) is not None), None)
            if value is not None:
                out[key] = value
        return out

    def validate(self, model_params: list[dict[str, Any]], labels: list[str]) -> None:
        metric, penalty = self.params["metric"], self.params["penalty"]
        for params, label in zip(model_params, labels):
            value = params.get(metric)  # from the recipe (checked by the rules) or its metrics
            if not self.rule(metric).accepts(value):
                raise ValueError(f"input {label!r} has no positive {metric} (got {shown(value)}):"
                                 f" set parameters: {{{metric}: ...}} or keep metrics beside it")
        self.weights = mwa_weights([p[metric] for p in model_params], metric, float(penalty))

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        return sum(w * x for w, x in zip(self.weights, xs))
