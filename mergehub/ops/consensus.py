"""The TALL mask rule and Consensus merging's vote (Wang et al. 2024, "Localizing Task
Information for Improved Model Merging and Compression"), on whole tensors or row chunks.

For task vectors xt as the merged vector τMTL sums them (wt·τt, ÷ Σ wt when normalized), a
task's mask keeps the entries where it matters relative to the merge,
mt = 1{|xt| > λt·|τMTL − xt|} (strict, as the authors' code); Consensus keeps the entries of
τMTL at least k tasks' masks keep. :mod:`mergehub.merge.methods.members` builds the merge
methods on these, :mod:`mergehub.storage.codecs.tall` the TALL storage codec.
"""

from __future__ import annotations

from typing import Any

import torch

from mergehub.ops.sparsify import weight_total


def weighted(xs: list[torch.Tensor], model_params: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Each input multiplied by its ``weight``."""
    return [x * float(p["weight"]) for x, p in zip(xs, model_params)]


def tall_masks(xs: list[torch.Tensor], mtl: torch.Tensor, lambdas: list[float]) -> list[torch.Tensor]:
    """m_t = |xt| > λt·|τMTL − xt|, one boolean mask per task."""
    return [x.abs() > lam * (mtl - x).abs() for x, lam in zip(xs, lambdas)]


def consensus(xs: list[torch.Tensor], mtl: torch.Tensor, model_params: list[dict[str, Any]],
              k: int, normalized: bool = False) -> torch.Tensor:
    """τMTL restricted to the entries at least ``k`` tasks' TALL masks keep; the masks compare
    τMTL with each wt·τt (÷ Σ wt where ``normalized``: a task arithmetic τMTL divided by it)."""
    contributions = weighted(xs, model_params)
    if normalized:
        total = weight_total(model_params)
        contributions = [x / total for x in contributions]
    masks = tall_masks(contributions, mtl, [float(p["tall_lambda"]) for p in model_params])
    votes = torch.stack(masks).sum(dim=0)
    return mtl * (votes >= k)
