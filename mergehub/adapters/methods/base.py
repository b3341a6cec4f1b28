"""What a training method is, and the one registry of them (:data:`METHODS`).

A method is a :class:`Method` subclass in a module of its own under
``mergehub/adapters/methods/``, passed to :func:`register` and imported by the package's
``__init__``. Its class says everything that differs between methods:

* its parameters (``method_params`` of a config) and their defaults, ``params``; the config
  parser refuses other keys and calls :meth:`Method.check_params` for the values it can check
  before anything is loaded;
* whether it trains a peft adapter (``peft``), whether it runs on several processes
  (``parallel``, :meth:`Method.check_world`);
* how it prepares the model (:meth:`Method.build`), its optimizer, one training step and its
  hooks, what a checkpoint keeps of it, and how its result is saved.

The loop around it (data, schedule, evaluation, checkpoints, resume, output dir and store
entry) is :mod:`mergehub.adapters.trainer`, the same for every method. :class:`Method`
itself is full fine-tuning with AdamW; the other methods override the parts that differ.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from mergehub.adapters.data import Batch, Dataset
from mergehub.adapters.distributed import World
from mergehub.adapters.layout import BaseLayout, save_full
from mergehub.adapters.schema import ConfigError, TrainConfig, fresh_hint
from mergehub.errors import InputError

#: method name -> its class: what ``hub train`` builds and the config parser checks against
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to :data:`METHODS` under its ``name``."""
    METHODS[cls.name] = cls
    return cls


class Method:
    """Full fine-tuning with AdamW; the other methods override the parts that differ.

    A method owns the model it trains (``self.model``), its optimizer, one training step, the
    state a checkpoint keeps, and how the result is saved.
    """

    #: the ``method:`` of a config
    name: ClassVar[str] = ""
    #: its parameters (``method_params``) and their defaults
    params: ClassVar[dict[str, Any]] = {}
    #: old parameter name -> (new name, why): an old name is an error naming the new one
    renamed: ClassVar[dict[str, tuple[str, str]]] = {}
    #: whether it trains a peft adapter (``peft:`` configures it; LoRA by default)
    peft: ClassVar[bool] = False
    #: the method parameter under which it trains a peft adapter all the same (MeZO's
    #: ``over: adapter``), for the error that refuses a ``peft:`` section
    peft_condition: ClassVar[str] = ""
    #: whether it trains on several processes (torchrun)
    parallel: ClassVar[bool] = False
    #: whether the parameters are sharded over the ranks (every rank must then take part in
    #: evaluating, checkpointing and saving)
    sharded = False
    #: the base's tensors, which saved results are named after (set by the loop)
    layout: BaseLayout | None = None

    @classmethod
    def check_params(cls, params: Any, peft: dict[str, Any] | None, task_type: str,
                     at: Callable[[Any, str], str], doc: Any) -> None:
        """Refuse the config's parameters where they cannot work (``params`` the given
        ``method_params``, ``peft`` the ``peft:`` section, ``at(section, key)`` the place of a
        key for the message, ``doc`` the whole config). By default: a ``peft:`` section for a
        method that trains no adapter."""
        if peft is not None and not cls.peft:
            raise ConfigError(f"{at(doc, 'peft')}: method {cls.name} does not train a peft "
                              f"adapter (peft: applies to {peft_methods()})")

    @classmethod
    def param_value(cls, params: Any, key: str) -> Any:
        """A ``method_params`` value as given, or its default."""
        return params.get(key, cls.params[key])

    @staticmethod
    def refuse_invalid(check: Callable[[], None], where: str) -> None:
        """Run a method's own check of its parameters at config time: its ``InputError`` as a
        ``ConfigError`` at ``where`` (the config's place of the parameters)."""
        try:
            check()
        except (InputError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def trains_adapter(cls, cfg: TrainConfig) -> bool:
        """Whether ``cfg`` trains an adapter (which keeps no new head of the base model)."""
        return cls.peft

    @classmethod
    def check_world(cls, cfg: TrainConfig, size: int) -> None:
        """Refuse a config that cannot train on ``size`` processes."""
        if size > 1:
            parallel = [name for name, m in METHODS.items() if m.parallel]
            raise ConfigError(f"{cfg.source}: method {cfg.method} trains on one process; of the "
                              f"methods only {' and '.join(parallel)} run on {size} processes")

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, dataset: Dataset,
                 resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
                 world: World | None = None):
        self.cfg, self.dataset, self.world = cfg, dataset, world
        self.model = self.build(model, resume)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = self.make_optimizer()

    def build(self, model: torch.nn.Module,
              resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None) -> torch.nn.Module:
        """The model to train, made from the loaded base (``resume``: the checkpoint's tensors
        and method state, for a method whose structure depends on them)."""
        model.requires_grad_(True)
        return model

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(self.params.values()), lr=self.cfg.lr,
                                 weight_decay=self.cfg.weight_decay)

    def step(self, batch: Batch, step: int) -> float:
        """One optimizer step on ``batch``; returns the batch loss before the update."""
        loss = self.model(**batch.kwargs()).loss
        loss.backward()
        self.after_backward(step)
        self.optimizer.step()
        self.before_zero_grad(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.after_step(step)
        return loss.item()

    def after_backward(self, step: int) -> None:
        """Hook: gradients are present."""

    def before_zero_grad(self, step: int) -> None:
        """Hook: after the optimizer step, gradients still present."""

    def after_step(self, step: int) -> None:
        """Hook: the step is complete."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the model: the trainable tensors by name."""
        return {n: p.detach() for n, p in self.params.items()}

    def extra_state(self) -> dict[str, Any]:
        """JSON-able method state a checkpoint keeps (besides tensors and optimizer)."""
        return {}

    def whole_model(self, fresh: Callable[[], torch.nn.Module]) -> None:
        """Before rank 0 saves: make ``self.model`` the whole model there (a sharded method
        gathers its weights into ``fresh()``, a plain copy of the model; every rank calls
        this)."""

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                if name not in tensors:
                    raise InputError(f"checkpoint has no tensor {name!r} (another method or "
                                     f"model? start afresh with {fresh_hint()})")
                p.copy_(tensors[name])

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        """Write the result to ``out``; returns the store kind and facts for provenance."""
        save_full(self.model, out, dtype, self.layout)
        return "finetune", {}


def peft_methods() -> str:
    """The methods that take a ``peft:`` section, as the error refusing one lists them."""
    always = ", ".join(sorted(name for name, m in METHODS.items() if m.peft))
    conditions: dict[str, list[str]] = {}
    for name, m in METHODS.items():
        if m.peft_condition:
            conditions.setdefault(m.peft_condition, []).append(name)
    return always + "".join(f", and to {'/'.join(names)} with {condition}"
                            for condition, names in conditions.items())
