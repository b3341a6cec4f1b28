"""The LoRA family through peft, and IncreLoRA (a variant peft lacks) as an extension of it.

**peft tuners.** A config's ``peft:`` mapping is handed to peft as it is: ``peft_type`` picks
the tuner (``LORA`` by default; ``ADALORA``, ``IA3``, ``LOHA``, ``LOKR``, ``VERA``, ``OFT``,
... whatever the installed peft has) and every other key is an option of that tuner's config
class (for LoRA: ``r``, ``lora_alpha``, ``use_rslora``, ``use_dora``, ``target_modules``,
``init_lora_weights`` (``pissa``, ``olora``, ...), ``rank_pattern``, ...). peft rejects unknown
options; the message names the config line. Results are standard adapter dirs
(``adapter_config.json`` + ``adapter_model.safetensors``, ``PeftModel.save_pretrained``).

**IncreLoRA** (Zhang et al. 2023, "IncreLoRA: Incremental parameter allocation method for
parameter-efficient fine-tuning"): every target module starts at rank ``init_r``; after
``warmup`` steps and then every ``grow_every`` steps, each module's importance (an exponential
moving average, factor ``beta``, of mean |w ⊙ ∂L/∂w| over its LoRA parameters, AdaLoRA's
sensitivity) ranks the modules and the ``grow_modules`` most important ones get one more rank
until the total rank reaches ``budget``. A new rank-one component is a row of A drawn from
N(0, ``init_std``²) and a zero column of B, so the function is unchanged at the moment of
growth; the scaling of every module stays ``lora_alpha / init_r`` (or / sqrt(init_r) with
rsLoRA) throughout. What we follow from the paper: incremental rank allocation by AdaLoRA-style
importance under a total budget; what we simplify: no SVD-form (P·Λ·Q) parametrization and no
orthogonality regularizer, plain LoRA factors instead, so the result is a standard LoRA.

The saved adapter is a standard peft LoRA dir whose ``rank_pattern`` gives each module's final
rank and ``alpha_pattern`` keeps each module's scaling; ``incrlora_config.json`` beside it keeps
the budget and the growth history (step, module, new rank).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from mergehub.adapters.config import ConfigError

PEFT_PREFIX = "base_model.model."
#: LoRA inits that rewrite the base weights (the adapter alone is not a delta of the base)
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "orthogonal")


def peft_config(spec: dict[str, Any], where: str, steps: int) -> Any:
    """The peft config object ``spec`` (a config's ``peft:`` mapping) describes."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    spec = dict(spec)
    peft_type = str(spec.pop("peft_type", "LORA")).upper()
    try:
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)]
    except (ValueError, KeyError):
        known = ", ".join(sorted(t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING))
        raise ConfigError(f"{where}: unknown peft_type {peft_type!r} (this peft has {known})") from None
    spec.setdefault("task_type", "CAUSAL_LM")
    if peft_type == "ADALORA":
        spec.setdefault("total_step", steps)
    try:
        return cls(**spec)
    except TypeError as e:
        raise ConfigError(f"{where}: peft {peft_type}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: peft {peft_type}: {e}") from None


def is_plain_lora(config: Any) -> bool:
    """Whether the adapter is a dense delta B·A·scaling of the base (what ``hub merge`` reads
    from an adapter dir): LoRA, without DoRA, with an init that leaves the base weights as
    they are."""
    init = getattr(config, "init_lora_weights", True)
    return (str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type)
            == "LORA" and not getattr(config, "use_dora", False)
            and not (isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS)))


def lora_layers(model: torch.nn.Module, adapter: str = "default") -> dict[str, Any]:
    """The peft LoRA layers of ``model`` by module name in the base model."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX): m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


class IncreLoRA:
    """Grows the ranks of a peft LoRA model's modules under a total budget (module docstring).

    ``observe()`` after each backward pass updates the importance scores; ``maybe_grow(step)``
    after the optimizer step adds ranks when due and returns the modules that grew (the caller
    rebuilds its optimizer: the grown parameters are new tensors).
    """

    def __init__(self, model: torch.nn.Module, *, init_r: int, budget: int | None,
                 grow_every: int, grow_modules: int, warmup: int, beta: float, init_std: float,
                 seed: int, adapter: str = "default"):
        self.model, self.adapter = model, adapter
        self.layers = lora_layers(model, adapter)
        if not self.layers:
            raise ConfigError("incrlora: the peft config targets no module of this model")
        self.init_r = init_r
        self.budget = budget if budget is not None else 4 * init_r * len(self.layers)
        if self.budget < init_r * len(self.layers):
            raise ConfigError(f"incrlora: budget {self.budget} is below the starting total rank "
                              f"{init_r} x {len(self.layers)} modules")
        self.grow_every, self.grow_modules, self.warmup = grow_every, grow_modules, warmup
        self.beta, self.init_std = beta, init_std
        self.seed = seed
        self.scores = {name: 0.0 for name in self.layers}
        self.history: list[tuple[int, str, int]] = []

    def ranks(self) -> dict[str, int]:
        return {name: layer.r[self.adapter] for name, layer in self.layers.items()}

    def total_rank(self) -> int:
        return sum(self.ranks().values())

    @torch.no_grad()
    def observe(self) -> None:
        """Fold the current gradients into each module's moving-average importance."""
        for name, layer in self.layers.items():
            total, count = 0.0, 0
            for w in (layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight):
                if w.grad is not None:
                    total += float((w * w.grad).abs().sum())
                    count += w.numel()
            self.scores[name] = self.beta * self.scores[name] + (1 - self.beta) * total / max(count, 1)

    def maybe_grow(self, step: int) -> list[str]:
        """After optimizer step ``step`` (0-based): grow the top modules when due."""
        done = step + 1
        if done < self.warmup or (done - self.warmup) % self.grow_every or \
                self.total_rank() >= self.budget:
            return []
        order = sorted(self.scores, key=lambda n: (-self.scores[n], n))
        grown = []
        for name in order[:self.grow_modules]:
            if self.total_rank() >= self.budget:
                break
            self.grow(name, step)
            grown.append(name)
        return grown

    @torch.no_grad()
    def grow(self, name: str, step: int) -> None:
        """Add one rank to module ``name``: a small random row of A, a zero column of B."""
        layer = self.layers[name]
        a_old, b_old = layer.lora_A[self.adapter], layer.lora_B[self.adapter]
        r = a_old.out_features
        like = {"device": a_old.weight.device, "dtype": a_old.weight.dtype}
        gen = torch.Generator().manual_seed(self.seed * 7919 + step * 131 + len(self.history))
        a_new = torch.nn.Linear(a_old.in_features, r + 1, bias=False, **like)
        b_new = torch.nn.Linear(r + 1, b_old.out_features, bias=False, **like)
        a_new.weight[:r] = a_old.weight
        a_new.weight[r:] = torch.randn(1, a_old.in_features, generator=gen).to(**like) \
            * self.init_std
        b_new.weight[:, :r] = b_old.weight
        b_new.weight[:, r:] = 0
        layer.lora_A[self.adapter] = a_new
        layer.lora_B[self.adapter] = b_new
        layer.r[self.adapter] = r + 1  # scaling[adapter] stays: the function is unchanged
        self.history.append((step + 1, name, r + 1))

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the grown structure."""
        return {"ranks": self.ranks(), "scores": self.scores,
                "history": [list(h) for h in self.history]}

    def restore(self, state: dict[str, Any]) -> None:
        """Grow every module to its checkpointed rank (weights are loaded afterwards)."""
        for name, rank in state["ranks"].items():
            while self.layers[name].r[self.adapter] < rank:
                self.grow(name, -1)
        self.scores = {k: float(v) for k, v in state["scores"].items()}
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
            "warmup": self.warmup, "beta": self.beta, "init_std": self.init_std,
            "total_rank": self.total_rank(), "ranks": self.ranks(),
            "history": [{"step": s, "module": n, "rank": r} for s, n, r in self.history]},
            indent=2) + "\n")
