"""Generalized task arithmetic: one method, parameterised, behind every merge of the
task-arithmetic family (task arithmetic, TIES, DARE, breadcrumbs, Consensus; mergekit builds
its family the same way).

Every member merges a tensor in the same four steps, and differs only in which part of each
step it takes (:class:`Member`):

1. **sparsify**: keep part of each task vector τt = θt − θ0 (a magnitude trim, a random drop, a
   band between outliers and noise: :mod:`~mergehub.merge.methods.sparsifiers`; or nothing),
   survivors optionally rescaled;
2. **elect**: a sign per entry from the weighted vectors (``sum``: total mass, the TIES paper;
   ``count``: PEFT's "frequency"), or none;
3. **combine**: Σt wt τt over the inputs that agree with the elected sign (all without an
   election), divided by the agreeing weights (by Σ wt without an election) when
   ``normalize``: τm;
4. **consensus** (Wang et al. 2024), optionally: τm restricted to the entries at least ``k``
   tasks' TALL masks keep (:func:`mergehub.ops.consensus.consensus`);

then θ = θ0 + λ·τm. The members are instances registered by name in
:data:`~mergehub.merge.methods.base.METHODS` (:mod:`~mergehub.merge.methods.members`).

Per tensor, a member first makes a :class:`TensorPlan`: the whole-tensor statistics its
sparsifier needs (per-input cuts, bands or densities, and rescale factors), then a function of
one chunk. The chunked CPU path runs the plan chunk by chunk; the fused GPU path asks the same
plan for the arguments of :func:`mergehub.kernels.merge_tensor` (:meth:`TensorPlan.kernel_args`),
its cuts found on the device; and on the CPU an exact per-tensor TIES trim is selected during
the merge's own read instead (:func:`~mergehub.merge.methods.onepass.one_pass_ties`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from mergehub.kernels import numba_merge
from mergehub.merge.methods import fast, onepass
from mergehub.merge.methods.base import PARAM_RULES, MergeMethod, Prepass, Rule, TensorContext
from mergehub.merge.methods.sparsifiers import Params, Sparsifier, Sparsity
from mergehub.ops.consensus import consensus
from mergehub.ops.selection import ChunkStream, kth_rank
from mergehub.ops.sparsify import KeptTally

#: a member's election: by total mass, by count, by its ``sign_method`` parameter, or none
ELECTIONS = (None, "sum", "count", "sign_method")


@dataclass(frozen=True, eq=False)
class Member:
    """One member of the family: its recipe name and parameters (name -> default, as for any
    method), and its parts. Calling it with the recipe's global parameters gives the method
    that merges (:class:`GeneralizedTaskArithmetic`).

    ``sparsifier``: a :class:`~mergehub.merge.methods.sparsifiers.Sparsifier` class, or
    ``None`` (keep everything); ``election``: one of :data:`ELECTIONS`; ``consensus``: restrict
    the merge to the TALL masks' consensus (parameters ``k`` and per model ``tall_lambda``).
    """

    name: str
    model_params: dict[str, Any]
    global_params: dict[str, Any]
    sparsifier: type[Sparsifier] | None = None
    election: str | None = None
    consensus: bool = False
    #: rules for parameters this member reads differently from ``PARAM_RULES``
    param_rules: dict[str, Rule] = field(default_factory=dict)
    needs_base = True
    on_deltas = True
    base_is_input = False

    def __post_init__(self) -> None:
        """A member declares every parameter its parts read (recipes are checked against
        the declared ones)."""
        if self.election not in ELECTIONS:
            raise ValueError(f"{self.name}: election must be one of {ELECTIONS}, "
                             f"not {self.election!r}")
        wanted = {"weight": self.model_params, "lambda": self.global_params,
                  "normalize": self.global_params}
        if self.sparsifier is not None:
            wanted.update({**dict.fromkeys(self.sparsifier.reads, self.global_params),
                           **dict.fromkeys(self.sparsifier.reads_per_model, self.model_params)})
        if self.election == "sign_method":
            wanted["sign_method"] = self.global_params
        if self.consensus:
            wanted.update({"k": self.global_params, "tall_lambda": self.model_params})
        missing = sorted(f"{name} ({'per model' if where is self.model_params else 'global'})"
                         for name, where in wanted.items() if name not in where)
        if missing:
            raise ValueError(f"{self.name}: its parts read parameters it does not declare: "
                             f"{', '.join(missing)}")

    def __call__(self, params: dict[str, Any]) -> GeneralizedTaskArithmetic:
        return GeneralizedTaskArithmetic(self, params)

    def rule(self, name: str) -> Rule:
        """The rule for one of this member's parameters."""
        return self.param_rules.get(name) or PARAM_RULES[name]

    def params_from_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """No member takes parameters from an input's metrics."""
        return {}

    @property
    def linear(self) -> bool:
        """Whether the merge is a linear combination of the task vectors (task arithmetic)."""
        return self.sparsifier is None and self.election is None and not self.consensus


class GeneralizedTaskArithmetic(MergeMethod):
    """A :class:`Member` with the recipe's global parameters: one merge."""

    def __init__(self, member: Member, params: dict[str, Any]):
        self.member = member
        self.name = member.name
        self.model_params = member.model_params
        self.global_params = member.global_params
        self.param_rules = member.param_rules
        super().__init__(params)
        self.sparsifier = None if member.sparsifier is None else member.sparsifier(self.params)

    def rule(self, name: str) -> Rule:  # type: ignore[override]
        return self.member.rule(name)

    @property
    def elect(self) -> str | None:
        """The sign election of this merge (``None``: none)."""
        election = self.member.election
        return self.params["sign_method"] if election == "sign_method" else election

    @property
    def tally(self) -> KeptTally | None:  # type: ignore[override]
        return None if self.sparsifier is None else self.sparsifier.tally

    def validate(self, model_params: Params, labels: list[str]) -> None:
        if self.sparsifier is not None:
            self.sparsifier.validate(model_params, labels)
        if self.member.consensus and self.params["k"] > len(labels):
            # k > T would keep no entry: the merge would silently be the base
            raise ValueError(f"k must be at most the number of inputs ({len(labels)}), not "
                             f"{self.params['k']}: no entry can be used by more tasks than "
                             f"there are")

    @property
    def prepass(self) -> Prepass | None:
        return None if self.sparsifier is None else self.sparsifier.prepass

    def plan(self, model_params: Params, sparsity: Sparsity | None) -> TensorPlan:
        """The plan of one tensor given its sparsifier's statistics."""
        p = self.params
        return TensorPlan(self.sparsifier, sparsity, model_params, self.elect,
                          bool(p["normalize"]), float(p["lambda"]),
                          int(p["k"]) if self.member.consensus else None)

    def merge_chunks(self, chunks: ChunkStream, ranges: list[tuple[int, int]],
                     model_params: Params, ctx: TensorContext) -> Iterable[torch.Tensor]:
        """The sparsifier's statistics, then the plan chunk by chunk; on the CPU, an exact
        per-tensor TIES trim is selected during the merge's own read where the tensor allows
        it (:meth:`_one_pass`): the same bits."""
        merged = self._one_pass(chunks, ranges, model_params, ctx)
        if merged is not None:
            yield merged
            return
        sparsity = (None if self.sparsifier is None
                    else self.sparsifier.statistics(chunks, ranges, model_params, ctx))
        plan = self.plan(model_params, sparsity)
        for (r0, r1), (base, xs) in zip(ranges, chunks()):
            ctx.rows = (r0, r1)
            yield plan.chunk(base, xs, ctx)

    def _one_pass(self, chunks: ChunkStream, ranges: list[tuple[int, int]],
                  model_params: Params, ctx: TensorContext) -> torch.Tensor | None:
        """The merged tensor from :func:`onepass.one_pass_ties`, or ``None``. Tried for
        exact per-tensor trims with an election and no consensus (TIES) on the CPU, a merged
        tensor of at most ``onepass.ONE_PASS_BYTES``, and inputs whose rows can be sampled
        (none decoded in order)."""
        if not (ctx.device.type == "cpu" and self.sparsifier is not None
                and self.sparsifier.exact_per_tensor() and self.elect is not None
                and not self.member.consensus and ctx.any_rows
                and ctx.numel * ctx.out_dtype.itemsize <= onepass.ONE_PASS_BYTES):
            return None
        n = ctx.numel
        ks = [None if d >= 1 or not n else kth_rank(d, n) or 0
              for d in (float(p["density"]) for p in model_params)]
        done = onepass.one_pass_ties(
            chunks, ranges, ctx.row_size, ks, self.params["ties"],
            [float(p["weight"]) for p in model_params], self.elect,
            bool(self.params["normalize"]), float(self.params["lambda"]), ctx.out_dtype)
        if done is None:
            return None
        merged, cuts = done
        self.sparsifier.cuts(model_params, ctx, lambda _: cuts)  # the tally
        return merged

    @property
    def fusable(self) -> bool:
        return self.sparsifier is None or self.sparsifier.fusable

    def fused(self, base: torch.Tensor, thetas: list[torch.Tensor], model_params: Params,
              ctx: TensorContext) -> dict[str, Any]:
        sparsity = None
        if self.sparsifier is not None:
            cuts = self.sparsifier.device_cuts(base, thetas, model_params, ctx)
            sparsity = Sparsity(cuts, [1.0] * len(cuts))
        return self.plan(model_params, sparsity).kernel_args()

    def kept_report(self) -> KeptTally | None:
        return None if self.sparsifier is None else self.sparsifier.kept_report()

    def planned_kept(self, densities: list[list[float]], numels: list[int]
                     ) -> tuple[list[float], str] | None:
        return None if self.sparsifier is None else self.sparsifier.planned_kept(densities,
                                                                                  numels)


@dataclass
class TensorPlan:
    """One tensor's merge under a member: its sparsifier's statistics (``sparsity``, ``None``
    without a sparsifier) and the rest of the member's parts, resolved for this tensor."""

    sparsifier: Sparsifier | None
    sparsity: Sparsity | None
    model_params: Params
    elect: str | None
    normalize: bool
    lam: float
    k: int | None  # the consensus' k, None without one

    def chunk(self, base: torch.Tensor, xs: list[torch.Tensor],
              ctx: TensorContext) -> torch.Tensor:
        """Merge one chunk (rows ``ctx.rows``) of task vectors ``xs``: θ0 + λ·τm (float32)."""
        merged = self._compiled_drop(base, xs, ctx)
        if merged is not None:
            return merged
        kept = xs if self.sparsifier is None else self.sparsifier.keep(
            xs, self.sparsity, self.model_params, ctx)
        mixed = fast.combine(kept, self.model_params, self.elect, self.normalize)
        if self.k is not None:
            mixed = consensus(xs, mixed, self.model_params, self.k,
                              self.normalize and self.elect is None)
        return fast.finish(base, mixed, self.lam)

    def _compiled_drop(self, base: torch.Tensor, xs: list[torch.Tensor],
                       ctx: TensorContext) -> torch.Tensor | None:
        """DARE-TIES's chunk in one compiled loop (:func:`mergehub.kernels.numba_merge.
        dare_chunk`: the same bits as the steps below), where it applies: a random drop whose
        draws :meth:`Sparsifier.words` gives, a sign election, no consensus, float32 task
        vectors on the CPU (:func:`~mergehub.kernels.numba_merge.applies`); ``None``
        elsewhere, or where a value is not finite (the steps below then draw the same words
        again)."""
        if self.sparsifier is None or self.elect is None or self.k is not None \
                or not numba_merge.applies(base, xs):
            return None
        draws = self.sparsifier.words(xs, self.sparsity, ctx)
        if draws is None:
            return None
        out = torch.empty(base.shape)
        counts = numba_merge.dare_chunk(base, xs, *draws, self.sparsity.scales,
                                        [float(p["weight"]) for p in self.model_params],
                                        self.elect, self.normalize, self.lam, out)
        if counts is None:
            return None
        self.sparsifier.add_kept(counts, base.numel())
        return out

    def kernel_args(self) -> dict[str, Any]:
        """The same merge as keyword arguments of :func:`mergehub.kernels.merge_tensor`, for
        a sparsity of magnitude cuts (or none)."""
        args: dict[str, Any] = {"weights": [float(p["weight"]) for p in self.model_params],
                                "lam": self.lam, "normalize": self.normalize}
        if self.sparsity is not None:
            args["cuts"] = self.sparsity.keeps
        if self.elect is not None:
            args["elect"] = self.elect
        if self.k is not None:
            args["tall_lambdas"] = [float(p["tall_lambda"]) for p in self.model_params]
            args["k"] = self.k
        return args
