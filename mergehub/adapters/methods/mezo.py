"""MeZO and Sparse MeZO as training methods (``mezo``, ``sparse_mezo``): zeroth-order steps
with the :class:`mergehub.adapters.mezo.MeZO` optimizer, over every parameter of the model or
over a peft adapter's (``over: adapter``), on one process or several (torchrun: the ranks share
out each batch or the perturbations, or hold a shard of every parameter with ``shard: true``).

The objective is the token loss (``objective: loss``) or, for a causal LM, the number of
completion tokens predicted wrong (``objective: token_error``, not differentiable: MeZO needs
only its value).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mergehub.adapters import distributed
from mergehub.adapters.data import Batch, completion_scores, token_loss
from mergehub.adapters.methods.base import Method, register
from mergehub.adapters.methods.lora import save_peft, wrap_peft
from mergehub.adapters.mezo import MeZO, forward_only
from mergehub.adapters.schema import ConfigError, TrainConfig, fresh_hint
from mergehub.errors import InputError, shown


@register
class MezoMethod(Method):
    """MeZO / Sparse MeZO (zeroth order, two forward passes per step) over every parameter or
    over a peft adapter's; the optimizer is :class:`mergehub.adapters.mezo.MeZO`. On several
    processes the ranks share out each batch (or, with ``n_perturbations`` > 1, the
    perturbations) and exchange only loss values; with ``shard: true`` each rank holds 1/N of
    every parameter (FSDP2, :func:`mergehub.adapters.distributed.shard_model`)."""

    name = "mezo"
    params = {"eps": 1e-3, "objective": "loss", "over": "all", "n_perturbations": 1,
              "shard": False}
    peft_condition = "over: adapter"
    parallel = True

    @classmethod
    def check_params(cls, params, peft, task_type, at, doc):
        over = params.get("over", cls.params["over"])
        if over not in ("all", "adapter"):
            raise ConfigError(f"{at(params, 'over')}: over must be 'all' or 'adapter'")
        if params.get("objective", "loss") not in ("loss", "token_error"):
            raise ConfigError(f"{at(params, 'objective')}: objective must be 'loss' or "
                              "'token_error'")
        if params.get("objective") == "token_error" and task_type != "causal_lm":
            raise ConfigError(f"{at(params, 'objective')}: objective token_error scores "
                              "completions of a causal LM; use loss with task_type "
                              f"{task_type}")
        perturbations = params.get("n_perturbations", 1)
        if isinstance(perturbations, bool) or not isinstance(perturbations, int) \
                or perturbations < 1:
            raise ConfigError(f"{at(params, 'n_perturbations')}: n_perturbations must be an "
                              f"integer >= 1, got {shown(perturbations)}")
        if not isinstance(params.get("shard", False), bool):
            raise ConfigError(f"{at(params, 'shard')}: shard must be true or false, got "
                              f"{shown(params['shard'])}")
        if peft is None and over == "adapter":
            raise ConfigError(f"{at(doc, 'method')}: {cls.name} over 'adapter' needs a peft: "
                              "section")

    @classmethod
    def trains_adapter(cls, cfg: TrainConfig) -> bool:
        return cfg.param("over") == "adapter"

    @classmethod
    def check_world(cls, cfg: TrainConfig, size: int) -> None:
        """A batch shared out among the ranks needs a row for each, and ``shard`` needs
        several processes and whole-model training."""
        shard = cfg.param("shard")
        if shard and cfg.param("over") == "adapter":
            raise ConfigError(f"{cfg.source}: shard: true shards the model's own weights; MeZO "
                              "over an adapter trains a few tensors: run it data-parallel "
                              "without shard")
        if size == 1:
            if shard:
                raise ConfigError(f"{cfg.source}: shard: true needs more than one process "
                                  "(torchrun --nproc-per-node N, or hub train --nproc N)")
            return
        by_batch = shard or int(cfg.param("n_perturbations")) == 1
        if by_batch and cfg.batch_size < size:
            raise ConfigError(f"{cfg.source}: batch_size {cfg.batch_size} is smaller than the "
                              f"{size} processes that share out each batch (one row each at "
                              "least)")

    def density(self) -> float | None:
        """Sparse MeZO's fraction of each tensor trained; None: every entry (MeZO)."""
        return None

    def build(self, model, resume):
        # the trained parameters are those that require grad (MeZO's rule); the closure runs
        # under no_grad, so no autograd graph is built: the memory of inference
        if self.cfg.param("over") == "adapter":
            return wrap_peft(model, self.cfg)
        model.requires_grad_(True)
        if self.cfg.param("shard"):
            self.sharded = True
            return distributed.shard_model(model)
        return model

    def make_optimizer(self) -> torch.optim.Optimizer:
        return MeZO(list(self.params.values()), lr=self.cfg.lr, eps=float(self.cfg.param("eps")),
                    weight_decay=self.cfg.weight_decay, seed=self.cfg.seed, density=self.density(),
                    n_perturbations=int(self.cfg.param("n_perturbations")),
                    process_group=None if self.world is None else torch.distributed.group.WORLD)

    def step(self, batch: Batch, step: int) -> float:
        objective = self.cfg.param("objective")  # checked by the config
        part = batch.part(self.optimizer.batch_rows(len(batch.input_ids)))

        def closure() -> tuple[torch.Tensor | int, torch.Tensor | int]:
            """(loss sum, scored tokens) of this rank's rows: the ranks' sums and counts add
            up to the loss of the whole batch (as tensors: MeZO reads both forwards' values
            at once)."""
            logits = self.model(**part.inputs()).logits
            if objective == "loss":
                return token_loss(logits, part.labels, self.cfg.task_type == "causal_lm")
            _, right, total = completion_scores(logits, part.labels)
            return total - right, total

        with forward_only(self.model):  # eval mode: both passes see the same function
            return float(self.optimizer.step(closure))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors; sharded, gathered one at a time (every rank must call this)
        and kept by rank 0 only."""
        if not self.sharded:
            return super().state_tensors()
        keep = self.world.main
        return {n: t for n, p in self.params.items()
                for t in [distributed.whole(p)] if keep}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self.sharded:
            return super().load_tensors(tensors)
        for name, p in self.params.items():
            if name not in tensors or tensors[name].shape != p.shape:
                raise InputError(f"checkpoint has no tensor {name!r} of shape {tuple(p.shape)} "
                                 f"(another method or model? start afresh with {fresh_hint()})")
            distributed.set_whole(p, tensors[name])

    def whole_model(self, fresh: Callable[[], torch.nn.Module]) -> None:
        if not self.sharded:
            return
        tensors = self.state_tensors()
        if self.world.main:
            self.model = fresh().requires_grad_(True)
            self.params = dict(self.model.named_parameters())
            self.sharded = False
            self.load_tensors(tensors)

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        if self.cfg.param("over") == "adapter":
            return save_peft(self.model, self.cfg, out, dtype, self.layout)
        return super().save(out, dtype)


@register
class SparseMezoMethod(MezoMethod):
    """Sparse MeZO (Liu et al. 2024): MeZO perturbing and updating only the fraction
    ``density`` of each tensor, its entries of smallest magnitude."""

    name = "sparse_mezo"
    params = {"eps": 1e-3, "objective": "loss", "over": "all", "density": 0.25,
              "n_perturbations": 1, "shard": False}
    renamed = {"sparsity": ("density", "it is the fraction of each tensor trained (the "
                            "entries of smallest |θ|); a sparsity would be 1 - density")}

    def density(self) -> float | None:
        return float(self.cfg.param("density"))
