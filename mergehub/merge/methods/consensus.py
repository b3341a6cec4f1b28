"""TALL masks and Consensus merging (Wang et al. 2024), on top of task arithmetic or TIES.

τMTL is the merged multi-task vector: Σt wt τt (``consensus_task_arithmetic``) or the TIES
disjoint mean τm (``consensus_ties``). Each task's TALL mask keeps the entries where that task
matters relative to the merge, mt = 1{|τt| >= λt·|τMTL − τt|} (per-model ``tall_lambda``,
default 0.4). Consensus keeps the entries at least ``k`` tasks use (default 2, dropping
"selfish" and "catastrophic" weights): θ = θ0 + λ·(1{Σt mt >= k} ⊙ τMTL).
"""

from __future__ import annotations

from typing import Any

import torch

from mergehub.merge.methods.base import MergeMethod, TensorContext, register
from mergehub.merge.methods.sparsify import combine
from mergehub.merge.methods.ties import Ties


def tall_masks(xs: list[torch.Tensor], mtl: torch.Tensor, lambdas: list[float]) -> list[torch.Tensor]:
    """m_t = |τt| >= λt·|τMTL − τt|, one boolean mask per task."""
    return [x.abs() >= lam * (mtl - x).abs() for x, lam in zip(xs, lambdas)]


def consensus(xs: list[torch.Tensor], mtl: torch.Tensor, model_params: list[dict[str, Any]],
              k: int) -> torch.Tensor:
    """τMTL restricted to the entries at least ``k`` tasks' TALL masks keep."""
    masks = tall_masks(xs, mtl, [float(p["tall_lambda"]) for p in model_params])
    votes = torch.stack(masks).sum(dim=0)
    return mtl * (votes >= k)


def _consensus_args(params: dict[str, Any], model_params: list[dict[str, Any]]) -> dict[str, Any]:
    """The consensus part of :func:`mergehub.kernels.merge_tensor`'s arguments."""
    return {"tall_lambdas": [float(p["tall_lambda"]) for p in model_params],
            "k": int(params["k"])}


@register
class ConsensusTaskArithmetic(MergeMethod):
    name = "consensus_task_arithmetic"
    model_params = {"weight": 1.0, "tall_lambda": 0.4}
    global_params = {"lambda": 1.0, "k": 2, "normalize": False}

    def fused(self, base: torch.Tensor, thetas: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> dict[str, Any]:
        return {**self.mix_args(model_params), **_consensus_args(self.params, model_params)}

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        mtl = combine(xs, model_params, None, self.params["normalize"])
        return base + float(self.params["lambda"]) * consensus(xs, mtl, model_params,
                                                               int(self.params["k"]))


@register
class ConsensusTies(Ties):
    name = "consensus_ties"
    model_params = {**Ties.model_params, "tall_lambda": 0.4}
    global_params = {**Ties.global_params, "k": 2}

    def fused(self, base: torch.Tensor, thetas: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> dict[str, Any]:
        return {**super().fused(base, thetas, model_params, ctx),
                **_consensus_args(self.params, model_params)}

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        mtl = self.merged_delta(xs, model_params, ctx)
        return base + float(self.params["lambda"]) * consensus(xs, mtl, model_params,
                                                               int(self.params["k"]))
