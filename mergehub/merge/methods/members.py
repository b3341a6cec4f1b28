"""The task-arithmetic family's members, one registry line each: a name, its parameters with
their defaults (what a recipe may give), and its parts (:class:`~.family.Member`:
sparsifier, election, consensus). Every one merges θ = θ0 + λ·τm (:mod:`~.family`).

* ``task_arithmetic`` (Ilharco et al. 2023): τm = Σ wt τt (÷ Σ wt with ``normalize``).
* ``ties`` (TIES-Merging, Yadav et al. 2023): trim each τt to its largest magnitudes
  (:class:`~.sparsifiers.MagnitudeTrim`), elect a sign per entry from the weighted, trimmed
  vectors (``sign_method: sum``, total mass, the paper and mergekit; ``count``, PEFT's
  "frequency"), then the disjoint mean: only the agreeing entries, divided by the agreeing
  weights when ``normalize`` (mergekit; with unit weights the paper's mean).
* ``dare_linear`` / ``dare_ties`` (DARE, Yu et al. 2024): drop and rescale
  (:class:`~.sparsifiers.RandomDrop`), then task arithmetic or TIES' sign election by mass
  and disjoint mean.
* ``breadcrumbs`` / ``breadcrumbs_ties`` (model breadcrumbs, Davari & Belilovsky 2024): keep
  the band between outliers and noise (:class:`~.sparsifiers.OutlierBand`), then task
  arithmetic or TIES' election.
* ``consensus_task_arithmetic`` / ``consensus_ties`` (TALL masks and Consensus merging, Wang
  et al. 2024): τMTL, the merged multi-task vector of task arithmetic or TIES, restricted to
  the entries at least ``k`` tasks use (default 2, dropping "selfish" and "catastrophic"
  weights). Each task's TALL mask keeps the entries where it matters relative to the merge,
  mt = 1{|xt| > λt·|τMTL − xt|} (per-model ``tall_lambda``, default 0.4; strict, as the
  authors' code), xt being the task's vector as τMTL sums it: wt·τt (÷ Σ wt for a normalized
  task arithmetic), untrimmed; with unit weights the authors' mask. By default
  ``consensus_ties`` builds τMTL as the TALL-masks authors' code does, ``ties_merging(...,
  reset_thresh=20, merge_func="dis-sum")``: each task vector trimmed to its top 20% over the
  whole flattened vector (``density: 0.2``, ``trim_scope: global``), signs elected by mass,
  and the agreeing entries *summed* (``normalize: false``); ``normalize: true`` with
  ``density: 1`` gives the disjoint mean of the untrimmed vectors instead (TIES' own rule).
"""

from __future__ import annotations

from mergehub.merge.methods.base import Rule, register
from mergehub.merge.methods.family import Member
from mergehub.merge.methods.sparsifiers import MagnitudeTrim, OutlierBand, RandomDrop

_TIES = {"lambda": 1.0, "normalize": True, "rescale": False, "int8_mask": False,
         "trim_scope": "tensor", "sign_method": "sum", "density_tolerance": 0.0, "ties": "index"}
_DARE = {"lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False}
_DARE_RULES = {"rescale": Rule("choice", choices=(True, False, "l1"))}
_BREADCRUMBS = {"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False,
                "ties": "index"}
_BAND = {"weight": 1.0, "density": 1.0, "gamma": 0.01}

register(Member("task_arithmetic", {"weight": 1.0},
                {"lambda": 1.0, "normalize": False, "int8_mask": False}))
register(Member("ties", {"weight": 1.0, "density": 1.0}, _TIES, MagnitudeTrim, "sign_method"))
register(Member("dare_linear", {"weight": 1.0, "density": 1.0}, _DARE, RandomDrop,
                param_rules=_DARE_RULES))
register(Member("dare_ties", {"weight": 1.0, "density": 1.0}, _DARE, RandomDrop, "sum",
                param_rules=_DARE_RULES))
register(Member("breadcrumbs", _BAND, _BREADCRUMBS, OutlierBand))
register(Member("breadcrumbs_ties", _BAND, _BREADCRUMBS, OutlierBand, "sum"))
register(Member("consensus_task_arithmetic", {"weight": 1.0, "tall_lambda": 0.4},
                {"lambda": 1.0, "k": 2, "normalize": False}, consensus=True))
register(Member("consensus_ties", {"weight": 1.0, "density": 0.2, "tall_lambda": 0.4},
                {**_TIES, "normalize": False, "trim_scope": "global", "k": 2}, MagnitudeTrim,
                "sign_method", consensus=True))
