"""IncreLoRA, the ``incrlora`` method (Zhang et al. 2023, "IncreLoRA: Incremental parameter allocation method for
parameter-efficient fine-tuning"; reference: the authors' ``loralib/increlora.py``): every
target module starts at rank ``init_r`` and ranks are added to the most important modules until
the total rank reaches ``budget``. As in the reference, by default:

* **importance** (``score: dense``) is the sensitivity of the module's dense incremental matrix,
  sum |ΔW ⊙ ∂L/∂ΔW| / sqrt(size of ΔW), with ∂L/∂ΔW = Σ over tokens of the gradient at the
  adapter's output times its (dropped-out) input, gathered by hooks in the backward pass;
  ``score: factors`` instead averages |w ⊙ ∂L/∂w| over the entries of A and B. Either way a
  zero ΔW scores 0: at the start B = 0 (peft's init; the reference starts its scales E at 0),
  so the first scores come only from the reserve components below;
* the score ranked is the product of two moving averages (AdaLoRA's): of the sensitivity
  (factor ``beta``) and of its uncertainty |sensitivity − its average| (factor ``beta_unc``);
  ``uncertainty: false`` ranks by the sensitivity average alone;
* after ``warmup`` steps and then every ``grow_every`` steps the ``grow_modules`` modules of
  highest score grow by ``grow_rank`` ranks each (default: half the average rank the budget
  allows, budget / (2 · modules), at least 1: the reference's table 2 → 1, 4 → 2, 6 → 3,
  8 → 4), never past the budget (the last growth may be smaller);
* **advance learning** (``reserve: true``): every module carries ``grow_rank`` reserve
  components, rank-one pairs (a, b) drawn from N(0, ``init_std``²), which act on the output
  with a fixed factor 1e-5 (the reference's E = 1e-5) and train with the adapter. Growing a
  module turns its reserve into ranks: a becomes a row of A, b a column of B, and 1e-5 the
  component's trainable scale E (B's columns are multiplied by their E in the forward pass;
  the saved B holds the product), so the function is unchanged at the moment of growth; new
  reserves are drawn. With ``reserve: false`` the new ranks start with E = 0 and untrained
  a, b, as the reference without advance learning. Once the budget is reached the reserves
  are dropped and the scores no longer computed (the reference zeroes the reserves' E).

What differs from the reference: the ranks are plain LoRA factors (B·A) with a trainable scale
only on grown ranks, not its SVD-form triplets P·Λ·Q on every rank, with no orthogonality
regularizer; the scaling of every module stays ``lora_alpha / init_r`` (or / sqrt(init_r)
with rsLoRA) where the reference divides by the current rank, so growth leaves the function
unchanged; exactly ``grow_modules`` modules grow (ties by name), where the reference grows
every module whose score ties with the last one, and its budget test counts modules where we
count ranks (it can pass its target); Adam's moments start at zero for grown ranks. The
result is a standard LoRA.

The saved adapter is a standard peft LoRA dir whose ``rank_pattern`` gives each module's final
rank and ``alpha_pattern`` keeps each module's scaling; ``incrlora_config.json`` beside it keeps
the budget and the growth history (step, module, new rank).

The method's parameters (``method_params``) are those of :class:`IncreLoRA` below, with the
defaults in :attr:`IncreLoRAMethod.params`; ``peft:`` configures the LoRA it grows (any option
but ``r``: ``init_r`` and ``budget`` set the ranks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from mergehub.adapters.methods.base import register
from mergehub.adapters.methods.lora import PeftMethod, lora_layers, wrap_peft
from mergehub.adapters.schema import ConfigError

#: the fixed factor of a reserve component's output, and a grown rank's starting scale E (the
#: reference's 1e-5)
RESERVE_GATE = 1e-5
#: the attribute of a LoRA layer holding its reserve (no "lora_" in it: peft saves only those)
RESERVE = "increment_reserve"
SCORES = ("dense", "factors")


class Reserve(torch.nn.Module):
    """A module's reserve components: ``k`` rank-one pairs, rows of ``a`` (k × in) and columns
    of ``b`` (out × k), acting as ``RESERVE_GATE · b a`` beside the adapter."""

    def __init__(self, k: int, features_in: int, features_out: int, std: float,
                 gen: torch.Generator, like: torch.Tensor):
        super().__init__()
        draw = lambda *shape: (torch.randn(*shape, generator=gen) * std).to(like)  # noqa: E731
        self.a = torch.nn.Parameter(draw(k, features_in))
        self.b = torch.nn.Parameter(draw(features_out, k))


class GrownScale(torch.nn.Module):
    """Parametrization of B: its columns past the first ``initial`` are multiplied by the
    trainable scales E of the grown ranks (the reference's E, its singular values, on those
    ranks only)."""

    def __init__(self, initial: int, like: torch.Tensor):
        super().__init__()
        self.initial = initial
        self.scales = torch.nn.Parameter(like.new_zeros(0))

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        if not self.scales.numel():
            return b
        return torch.cat([b[:, :self.initial], b[:, self.initial:] * self.scales], dim=1)


class IncreLoRA:
    """Grows the ranks of a peft LoRA model's modules under a total budget (module docstring).

    ``observe()`` after each backward pass updates the importance scores; ``maybe_grow(step)``
    after the optimizer step adds ranks when due and returns the modules that grew (the caller
    rebuilds its optimizer: the grown parameters are new tensors); ``finish()`` before saving
    leaves a plain peft LoRA (grown scales folded into B, reserves and hooks removed).
    """

    def __init__(self, model: torch.nn.Module, *, init_r: int, budget: int | None,
                 grow_every: int, grow_modules: int, warmup: int, beta: float, init_std: float,
                 seed: int, grow_rank: int | None = None, beta_unc: float = 0.85,
                 score: str = "dense", uncertainty: bool = True, reserve: bool = True,
                 adapter: str = "default"):
        from torch.nn.utils import parametrize

        self.model, self.adapter = model, adapter
        self.layers = lora_layers(model, adapter)
        if not self.layers:
            raise ConfigError("incrlora: the peft config targets no module of this model")
        if score not in SCORES:
            raise ConfigError(f"incrlora: score must be 'dense' or 'factors', not {score!r}")
        self.init_r = init_r
        self.budget = budget if budget is not None else 4 * init_r * len(self.layers)
        if self.budget < init_r * len(self.layers):
            raise ConfigError(f"incrlora: budget {self.budget} is below the starting total rank "
                              f"{init_r} x {len(self.layers)} modules")
        self.grow_rank = grow_rank or max(1, self.budget // (2 * len(self.layers)))
        self.grow_every, self.grow_modules, self.warmup = grow_every, grow_modules, warmup
        self.beta, self.beta_unc, self.init_std = beta, beta_unc, init_std
        self.score, self.uncertainty, self.reserve = score, uncertainty, reserve
        self.seed = seed
        self.sensitivity = {name: 0.0 for name in self.layers}  # moving averages
        self.unsure = {name: 0.0 for name in self.layers}
        self.history: list[tuple[int, str, int]] = []
        self.finished = False
        self._step_score = {name: 0.0 for name in self.layers}
        self._inputs: dict[str, torch.Tensor] = {}
        self._hooks = []
        for index, (name, layer) in enumerate(self.layers.items()):
            b = layer.lora_B[adapter]
            parametrize.register_parametrization(b, "weight", GrownScale(init_r, b.weight))
            if reserve:
                setattr(layer, RESERVE, self._new_reserve(layer, index, step=-1))
            self._hooks += [
                layer.lora_A[adapter].register_forward_pre_hook(self._keep_input(name)),
                b.register_forward_hook(self._after_b(name))]
        if self.total_rank() >= self.budget:
            self._drop_reserves()

    # --- structure ---------------------------------------------------------------------

    def _factors(self, name: str) -> tuple[torch.nn.Linear, torch.nn.Linear, GrownScale]:
        layer = self.layers[name]
        b = layer.lora_B[self.adapter]
        return layer.lora_A[self.adapter], b, b.parametrizations.weight[0]

    def _new_reserve(self, layer: Any, index: int, step: int) -> Reserve:
        a = layer.lora_A[self.adapter]
        gen = torch.Generator().manual_seed(self.seed * 7919 + (step + 1) * 131 + index)
        return Reserve(self.grow_rank, a.in_features, layer.lora_B[self.adapter].out_features,
                       self.init_std, gen, a.weight)

    def ranks(self) -> dict[str, int]:
        return {name: layer.r[self.adapter] for name, layer in self.layers.items()}

    def total_rank(self) -> int:
        return sum(self.ranks().values())

    # --- scores --------------------------------------------------------------------------

    def _keep_input(self, name: str):
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            self._inputs[name] = args[0]
        return hook

    def _after_b(self, name: str):
        """lora_B's forward hook: adds the reserve's output; in a backward pass to come, the
        dense score of this forward (``score: dense``)."""
        def hook(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
            x = self._inputs.pop(name, None)
            reserve = getattr(self.layers[name], RESERVE, None)
            if x is None:
                return None
            if reserve is not None:
                out = out + RESERVE_GATE * ((x @ reserve.a.T) @ reserve.b.T).to(out.dtype)
            if self.score == "dense" and not self.finished and out.requires_grad:
                out.register_hook(lambda grad: self._dense(name, x.detach(), grad))
            return out
        return hook

    @torch.no_grad()
    def _dense(self, name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Adds |ΔW ⊙ ∂L/∂ΔW| / sqrt(size) of one forward to the step's score: ∂L/∂ΔW is
        Σ_t g_t x_tᵀ / scaling (g the gradient at lora_B's output), ΔW = scaling · (B A + the
        reserve), so the scaling cancels."""
        a, b, _ = self._factors(name)
        delta = b.weight @ a.weight
        reserve = getattr(self.layers[name], RESERVE, None)
        if reserve is not None:
            delta = delta + RESERVE_GATE * (reserve.b @ reserve.a)
        grad_w = grad.reshape(-1, grad.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()
        score = float((delta.float() * grad_w).abs().sum()) / math.sqrt(delta.numel())
        self._step_score[name] += score

    @torch.no_grad()
    def _factor_score(self, name: str) -> float:
        """mean |w ⊙ ∂L/∂w| over the entries of A and B (``score: factors``)."""
        a, b, _ = self._factors(name)
        total, count = 0.0, 0
        for w in (a.weight, b.parametrizations.weight.original):
            if w.grad is not None:
                total += float((w * w.grad).abs().sum())
                count += w.numel()
        return total / max(count, 1)

    def importance(self) -> dict[str, float]:
        """The score each module is ranked by: sensitivity average × uncertainty average
        (or the sensitivity average alone without ``uncertainty``)."""
        return {n: self.sensitivity[n] * (self.unsure[n] if self.uncertainty else 1.0)
                for n in self.layers}

    def observe(self) -> None:
        """Fold this step's scores into the moving averages (after the backward pass)."""
        if self.finished:
            return
        for name in self.layers:
            s = self._step_score[name] if self.score == "dense" else self._factor_score(name)
            self._step_score[name] = 0.0
            self.sensitivity[name] = self.beta * self.sensitivity[name] + (1 - self.beta) * s
            self.unsure[name] = self.beta_unc * self.unsure[name] + \
                (1 - self.beta_unc) * abs(s - self.sensitivity[name])

    # --- growth --------------------------------------------------------------------------

    def maybe_grow(self, step: int) -> list[str]:
        """After optimizer step ``step`` (0-based): grow the top modules when due."""
        done = step + 1
        if self.finished or done < self.warmup or (done - self.warmup) % self.grow_every:
            return []
        scores = self.importance()
        grown = []
        for name in sorted(scores, key=lambda n: (-scores[n], n))[:self.grow_modules]:
            room = self.budget - self.total_rank()
            if room <= 0:
                break
            self.grow(name, min(self.grow_rank, room), step)
            grown.append(name)
        if self.total_rank() >= self.budget:
            self._drop_reserves()
        return grown

    @torch.no_grad()
    def grow(self, name: str, k: int, step: int) -> None:
        """Add ``k`` ranks to module ``name``: its reserve's first k components with scale E =
        1e-5 (or fresh components with E = 0 without reserves), then a new reserve."""
        layer = self.layers[name]
        a, b, scale = self._factors(name)
        index = list(self.layers).index(name)
        source = getattr(layer, RESERVE, None) or self._new_reserve(layer, index, step)
        start = RESERVE_GATE if self.reserve else 0.0
        original = b.parametrizations.weight.original
        a.weight = torch.nn.Parameter(torch.cat([a.weight, source.a[:k]]))
        b.parametrizations.weight.original = torch.nn.Parameter(
            torch.cat([original, source.b[:, :k]], dim=1))
        scale.scales = torch.nn.Parameter(torch.cat([scale.scales,
                                                     scale.scales.new_full((k,), start)]))
        a.out_features = b.in_features = layer.r[self.adapter] + k
        layer.r[self.adapter] += k  # scaling[adapter] stays: the function is unchanged
        if self.reserve:
            setattr(layer, RESERVE, self._new_reserve(layer, index, step))
        self.history.append((step + 1, name, layer.r[self.adapter]))

    def _drop_reserves(self) -> None:
        """The budget is reached: no more reserves, no more scores."""
        self.finished = True
        for layer in self.layers.values():
            if hasattr(layer, RESERVE):
                delattr(layer, RESERVE)

    def finish(self) -> None:
        """Leave a plain peft LoRA: grown scales folded into B, reserves and hooks removed."""
        from torch.nn.utils import parametrize

        self._drop_reserves()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name in self.layers:
            b = self._factors(name)[1]
            parametrize.remove_parametrizations(b, "weight", leave_parametrized=True)

    # --- checkpoints and saving ----------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the grown structure (the tensors are saved as
        the model's trainable parameters)."""
        return {"ranks": self.ranks(), "sensitivity": self.sensitivity, "unsure": self.unsure,
                "finished": self.finished, "history": [list(h) for h in self.history]}

    def restore(self, state: dict[str, Any]) -> None:
        """Grow every module to its checkpointed rank (weights are loaded afterwards)."""
        for name, rank in state["ranks"].items():
            while rank > self.layers[name].r[self.adapter]:  # a reserve holds grow_rank
                self.grow(name, min(self.grow_rank, rank - self.layers[name].r[self.adapter]), -1)
        if state["finished"]:
            self._drop_reserves()
        self.sensitivity = {k: float(v) for k, v in state["sensitivity"].items()}
        self.unsure = {k: float(v) for k, v in state["unsure"].items()}
        self.history = [(int(s), str(n), int(r)) for s, n, r in state["history"]]

    def finalize_config(self, config: Any) -> None:
        """Set ``rank_pattern`` / ``alpha_pattern`` on the peft config so that a standard
        ``PeftModel.from_pretrained`` rebuilds every module with its rank and its scaling."""
        ranks = self.ranks()
        scaling = {n: layer.scaling[self.adapter] for n, layer in self.layers.items()}
        root = math.sqrt if getattr(config, "use_rslora", False) else float
        config.rank_pattern = {n: r for n, r in ranks.items()}
        config.alpha_pattern = {n: scaling[n] * root(r) for n, r in ranks.items()}

    def write_side_config(self, out: Path) -> None:
        (out / "incrlora_config.json").write_text(json.dumps({
            "method": "incrlora", "init_r": self.init_r, "budget": self.budget,
            "grow_every": self.grow_every, "grow_modules": self.grow_modules,
            "grow_rank": self.grow_rank, "warmup": self.warmup, "beta": self.beta,
            "beta_unc": self.beta_unc, "score": self.score, "uncertainty": self.uncertainty,
            "reserve": self.reserve, "init_std": self.init_std,
            "total_rank": self.total_rank(), "ranks": self.ranks(),
            "history": [{"step": s, "module": n, "rank": r} for s, n, r in self.history]},
            indent=2) + "\n")


@register
class IncreLoRAMethod(PeftMethod):
    """IncreLoRA: LoRA whose ranks grow by importance under a budget."""

    name = "incrlora"
    params = {"init_r": 1, "budget": None, "grow_every": 10, "grow_modules": 2,
              "grow_rank": None, "warmup": 10, "beta": 0.85, "beta_unc": 0.85,
              "init_std": 0.02, "score": "dense", "uncertainty": True, "reserve": True}

    @classmethod
    def check_params(cls, params, peft, task_type, at, doc):
        super().check_params(params, peft, task_type, at, doc)
        spec = peft or {}
        if str(spec.get("peft_type", "LORA")).upper() != "LORA":
            raise ConfigError(f"{at(spec, 'peft_type')}: incrlora grows a LoRA: peft_type must "
                              "be LORA")
        if "r" in spec:
            raise ConfigError(f"{at(spec, 'r')}: incrlora sets the rank itself: use "
                              "method_params init_r and budget instead of peft r")
        score = cls.param_value(params, "score")
        if score not in SCORES:
            raise ConfigError(f"{at(params, 'score')}: incrlora score must be 'dense' or "
                              f"'factors', not {score!r}")

    def build(self, model, resume):
        model = wrap_peft(model, self.cfg, r=int(self.cfg.param("init_r")))
        p = self.cfg.param
        self.grower = IncreLoRA(
            model, init_r=int(p("init_r")), budget=p("budget"), grow_every=int(p("grow_every")),
            grow_modules=int(p("grow_modules")), grow_rank=p("grow_rank"), warmup=int(p("warmup")),
            beta=float(p("beta")), beta_unc=float(p("beta_unc")), init_std=float(p("init_std")),
            score=str(p("score")), uncertainty=bool(p("uncertainty")),
            reserve=bool(p("reserve")), seed=self.cfg.seed)
        if resume is not None:
            self.grower.restore(resume[1]["incrlora"])
        return model

    def after_backward(self, step: int) -> None:
        self.grower.observe()

    def after_step(self, step: int) -> None:
        old = self.params
        if not self.grower.maybe_grow(step):
            return
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        old_opt, self.optimizer = self.optimizer, self.make_optimizer()
        for name, p in self.params.items():  # carry Adam's moments over, zero for new ranks
            state = old_opt.state.get(old[name]) if name in old else None
            if state and RESERVE not in name:  # a reserve is drawn anew
                self.optimizer.state[p] = {k: _pad(v, p.shape) if torch.is_tensor(v) and v.dim() else v
                                           for k, v in state.items()}

    def extra_state(self) -> dict[str, Any]:
        return {"incrlora": self.grower.state()}

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        self.grower.finish()
        self.grower.finalize_config(self.model.peft_config["default"])
        kind, facts = super().save(out, dtype)
        self.grower.write_side_config(out)
        return kind, {**facts, "incrlora_total_rank": self.grower.total_rank(),
                      "incrlora_budget": self.grower.budget}


def _pad(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = value.new_zeros(shape)
    out[tuple(slice(0, s) for s in value.shape)] = value
    return out
