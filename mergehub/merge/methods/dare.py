"""DARE (Yu et al. 2024): drop and rescale, then task arithmetic (``dare_linear``) or the TIES
sign election and disjoint mean (``dare_ties``).

Each entry of τt is kept with probability ``density`` (= 1 − drop rate p), drawn from a
generator seeded by (``seed``, tensor name, input index, chunk): the same seed on the same
device gives the same output. Survivors are rescaled by 1/density (``rescale: true``, the
paper's: E[output] = τ), to the original L1 norm (``rescale: l1``, mergekit 0.1.5; a pass over
the tensor first), or not at all (``rescale: false``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mergehub.merge.methods import fast
from mergehub.merge.methods.base import MergeMethod, Rule, TensorContext, register
from mergehub.ops.sparsify import (
    ChunkStream, KeptTally, apply_mask, bernoulli_mask, l1_scales, planned)


class _Dare(MergeMethod):
    model_params = {"weight": 1.0, "density": 1.0}
    global_params = {"lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False}
    param_rules = {"rescale": Rule("choice", choices=(True, False, "l1"))}
    elect: str | None = None

    def __init__(self, params: dict[str, Any]):
        super().__init__(params)
        self.tally = KeptTally()

    @staticmethod
    def _mask(x: torch.Tensor, density: float, ctx: TensorContext, t: int,
              row: int) -> torch.Tensor | None:
        return bernoulli_mask(x, density, ctx.generator("dare", t, row))

    def tensor_stats(self, chunks: ChunkStream, model_params: list[dict[str, Any]],
                     ctx: TensorContext) -> None:
        densities = [float(p["density"]) for p in model_params]
        rescale = self.params["rescale"]
        if rescale == "l1":
            starts = ctx.state["row_starts"]
            scales = l1_scales(chunks, lambda t, c, offset, x: self._mask(
                x, densities[t], ctx, t, starts[c]), len(densities))
        else:
            scales = [1 / d if rescale and 0 < d < 1 else 1.0 for d in densities]
        ctx.state["dare"] = scales

    def drop(self, xs: list[torch.Tensor], model_params: list[dict[str, Any]],
             ctx: TensorContext) -> list[torch.Tensor]:
        scales = ctx.state["dare"]
        out = []
        for t, (x, p, s) in enumerate(zip(xs, model_params, scales)):
            density = float(p["density"])
            kept = self._fast_drop(x, density, ctx, t, s)
            if kept is None:
                mask = self._mask(x, density, ctx, t, ctx.rows[0])
                self.tally.add(t, x.numel() if mask is None else int(mask.sum()), 0, x.numel())
                kept = apply_mask(x, mask, s)
            out.append(kept)
        return out

    def _fast_drop(self, x: torch.Tensor, density: float, ctx: TensorContext, t: int,
                   scale: float) -> torch.Tensor | None:
        """Input t's drop on the CPU by :func:`fast.dare_keep` (the same draws and bits), its
        kept count tallied; ``None`` where that does not apply: the plain masks then draw
        from a fresh generator of the same seed."""
        if x.device.type != "cpu" or not 0 < density < 1 \
                or not math.isfinite(float(x.sum())):  # x * False of an infinite x is NaN
            return None
        done = fast.dare_keep(x, density, ctx.generator("dare", t, ctx.rows[0]), scale)
        if done is None:
            return None
        kept, count = done
        self.tally.add(t, count, 0, x.numel())
        return kept

    def planned_kept(self, densities: list[list[float]], numels: list[int]
                     ) -> tuple[list[float], str]:
        return planned(densities, numels, lambda d, n: min(max(d, 0.0), 1.0) * n), "about"

    def kept_report(self) -> KeptTally | None:
        return self.tally

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        mixed = fast.combine(self.drop(xs, model_params, ctx), model_params, self.elect,
                             self.params["normalize"])
        return fast.finish(base, mixed, float(self.params["lambda"]))


@register
class DareLinear(_Dare):
    name = "dare_linear"


@register
class DareTies(_Dare):
    name = "dare_ties"
    elect = "sum"
