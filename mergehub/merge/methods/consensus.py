"""TALL masks and Consensus merging (Wang et al. 2024), on top of task arithmetic or TIES.

τMTL is the merged multi-task vector: Σt wt τt (``consensus_task_arithmetic``, divided by Σ wt
with ``normalize``) or the TIES merge of the trimmed, sign-elected vectors
(``consensus_ties``). By default ``consensus_ties`` builds it as the TALL-masks authors' code
does, ``ties_merging(..., reset_thresh=20, merge_func="dis-sum")``: each task vector trimmed to
its top 20% over the whole flattened vector (``density: 0.2``, ``trim_scope: global``), signs
elected by mass, and the agreeing entries *summed* (``normalize: false``); ``normalize: true``
with ``density: 1`` gives the disjoint mean of the untrimmed vectors instead (TIES' own rule).

Each task's TALL mask keeps the entries where that task matters relative to the merge,
mt = 1{|xt| > λt·|τMTL − xt|} (per-model ``tall_lambda``, default 0.4; strict, as the authors'
code), xt being the task's vector as τMTL sums it: wt·τt (÷ Σ wt for a normalized task
arithmetic), untrimmed. With unit weights xt = τt, the authors' mask; with other weights both
sides of the comparison carry them. Consensus keeps the entries at least ``k`` tasks use
(default 2, dropping "selfish" and "catastrophic" weights): θ = θ0 + λ·(1{Σt mt >= k} ⊙ τMTL).
"""

from __future__ import annotations

from typing import Any

import torch

from mergehub.merge.methods.base import MergeMethod, TensorContext, register
from mergehub.ops.consensus import consensus
from mergehub.ops.sparsify import combine, weight_total
from mergehub.merge.methods.ties import Ties


def _consensus_args(params: dict[str, Any], model_params: list[dict[str, Any]]) -> dict[str, Any]:
    """The consensus part of :func:`mergehub.kernels.merge_tensor`'s arguments."""
    return {"tall_lambdas": [float(p["tall_lambda"]) for p in model_params],
            "k": int(params["k"])}


def _check_k(params: dict[str, Any], labels: list[str]) -> None:
    """k > T would keep no entry: the merge would silently be the base."""
    if params["k"] > len(labels):
        raise ValueError(f"k must be at most the number of inputs ({len(labels)}), not "
                         f"{params['k']}: no entry can be used by more tasks than there are")


@register
class ConsensusTaskArithmetic(MergeMethod):
    name = "consensus_task_arithmetic"
    model_params = {"weight": 1.0, "tall_lambda": 0.4}
    global_params = {"lambda": 1.0, "k": 2, "normalize": False}

    def validate(self, model_params: list[dict[str, Any]], labels: list[str]) -> None:
        _check_k(self.params, labels)

    def fused(self, base: torch.Tensor, thetas: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> dict[str, Any]:
        return {**self.mix_args(model_params), **_consensus_args(self.params, model_params)}

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        normalize = bool(self.params["normalize"])
        mtl = combine(xs, model_params, None, normalize)
        return base + float(self.params["lambda"]) * consensus(
            xs, mtl, model_params, int(self.params["k"]), normalize)


@register
class ConsensusTies(Ties):
    name = "consensus_ties"
    model_params = {**Ties.model_params, "density": 0.2, "tall_lambda": 0.4}
    global_params = {**Ties.global_params, "normalize": False, "trim_scope": "global", "k": 2}

    def validate(self, model_params: list[dict[str, Any]], labels: list[str]) -> None:
        super().validate(model_params, labels)
        _check_k(self.params, labels)

    def fused(self, base: torch.Tensor, thetas: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> dict[str, Any]:
        return {**super().fused(base, thetas, model_params, ctx),
                **_consensus_args(self.params, model_params)}

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        mtl = self.merged_delta(xs, model_params, ctx)
        return base + float(self.params["lambda"]) * consensus(xs, mtl, model_params,
                                                               int(self.params["k"]))
