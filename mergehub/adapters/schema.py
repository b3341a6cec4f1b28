"""A checked training config (:class:`TrainConfig`) and its error (:class:`ConfigError`).

They sit below the training methods (``mergehub.adapters.methods``), which read their
parameters from a config and refuse bad ones with a ConfigError, and below
:mod:`mergehub.adapters.config`, which parses a YAML file into a TrainConfig with the
methods' parameter lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergehub.errors import MergehubError, spelled


class ConfigError(MergehubError):
    """A training config that cannot be run; the message starts with ``FILE:LINE:``."""


@dataclass
class TrainConfig:
    """A checked training config. ``source`` is the file (or ``<config>``); paths in it are
    relative to the file's directory. ``method_params`` holds the parameters the config gives,
    ``param_defaults`` the method's defaults of the others."""

    base: str
    method: str
    data: dict[str, Any]
    task_type: str = "causal_lm"
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    #: where the model trains: ``cpu``, ``cuda`` or ``cuda:N`` (under torchrun ``cuda`` is each
    #: process's local GPU)
    device: str = "cpu"
    #: the dtype the weights train in: ``float32``, ``bfloat16``, ``float16`` or ``base`` (the
    #: base's own)
    dtype: str = "float32"
    run_dir: Path | None = None
    method_params: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] | None = None
    output: dict[str, Any] = field(default_factory=dict)
    source: str = "<config>"
    raw: dict[str, Any] = field(default_factory=dict)
    param_defaults: dict[str, Any] = field(default_factory=dict)

    def param(self, key: str) -> Any:
        """A method parameter (given, else the method's default)."""
        return self.method_params.get(key, self.param_defaults[key])


def fresh_hint() -> str:
    """How the caller starts a run over, as it spells it (error messages)."""
    return spelled("resume=False", "`hub train --fresh`")
