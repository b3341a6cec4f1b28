"""``merge_method: rmm``, reversible model merging (RMM; Alipour & Mohammadi Amiri 2025): the
method's parameters and their checks.

RMM writes a basis and per-task coefficients, not one merged model: its math is the ``rmm``
multi-model codec (:mod:`mergehub.storage.codecs.rmm`), and running the merge, its output files
and reverting are in :mod:`mergehub.merge.rmm`.
"""

from __future__ import annotations

from typing import Any

import torch

from mergehub.merge.methods.base import MergeMethod, Rule, TensorContext, register

#: how LoRA inputs are decomposed (see :mod:`mergehub.storage.codecs.rmm`)
BASES = ("factors", "dense")


@register
class ReversibleMerge(MergeMethod):
    """``merge_method: rmm`` with ``parameters: {m: 2}`` (basis size, 1 <= m <= T) and
    ``basis: factors | dense`` (how LoRA inputs are decomposed; see
    :mod:`mergehub.storage.codecs.rmm`)."""

    name = "rmm"
    model_params: dict[str, Any] = {}
    global_params = {"m": 1, "basis": "factors"}
    param_rules = {"basis": Rule("choice", choices=BASES)}

    def validate(self, model_params: list[dict[str, Any]], labels: list[str]) -> None:
        m = self.params["m"]
        if m > len(labels):
            raise ValueError(f"m must be an integer from 1 to the number of inputs "
                             f"({len(labels)}), not {m!r}")

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        raise NotImplementedError("rmm writes a basis, not one merged model: the engine runs "
                                  "it through mergehub.merge.rmm.execute_rmm")
