"""Checkpoints of ``hub train``: ``RUN_DIR/checkpoint-NNNNNNN/``, written atomically every
``checkpoint_every`` steps and read back to resume.

A checkpoint holds the method's trainable tensors (``trainable.safetensors``), the optimizer's
state (``optimizer.safetensors``: tensors as tensors, the structure around them as JSON
metadata; no pickle) and ``state.json``: the step, the loss history, the method's own state
(IncreLoRA's grown ranks, ...) and a digest of the config, so a run resumes only with the
config it was made with (but for the keys in :data:`RESUMABLE_CHANGES`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mergehub.adapters.methods.base import Method
from mergehub.adapters.schema import ConfigError, TrainConfig, fresh_hint
from mergehub.errors import InputError
from mergehub.storage.atomic import atomic_output_dir

STATE_FILE, TENSORS_FILE, OPTIMIZER_FILE = ("state.json", "trainable.safetensors",
                                            "optimizer.safetensors")
#: config keys that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = ("steps", "output", "checkpoint_every", "keep_checkpoints", "run_dir",
                     "device")


def config_digest(cfg: TrainConfig) -> str:
    """A digest of the config but for the keys a resumed run may change."""
    keep = {k: v for k, v in cfg.raw.items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` (they appear atomically)."""
    found = sorted(run_dir.glob("checkpoint-*")) if run_dir.is_dir() else []
    found = [p for p in found if (p / STATE_FILE).is_file()]
    return found[-1] if found else None


def read_checkpoint(path: Path, cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(``state.json``, the trainable tensors) of the checkpoint at ``path``, refused when it
    was made with another config."""
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    if state.get("config_digest") != config_digest(cfg):
        raise ConfigError(f"{path}: this checkpoint was made with another config (only "
                          f"{', '.join(RESUMABLE_CHANGES)} may change to resume); start "
                          f"afresh with {fresh_hint()} or use another run_dir")
    return state, load_file(str(path / TENSORS_FILE))


def save_optimizer_state(state: dict[str, Any], path: Path) -> None:
    """Write an optimizer's ``state_dict()`` as one safetensors file, no pickle: its tensors as
    tensors, the nesting around them (with dict keys' types: torch keys ``state`` by parameter
    index) and the plain values as JSON in the file's metadata."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().contiguous().clone()
            return {"tensor": key}
        if isinstance(value, dict):
            return {"dict": [[k, encode(v)] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return {"list": [encode(v) for v in value]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise TypeError(f"optimizer state holds a {type(value).__name__}, which a checkpoint "
                        "cannot store")

    structure = json.dumps(encode(state))
    save_file(tensors, str(path), metadata={"mergehub.optimizer_state": structure})


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """Read what :func:`save_optimizer_state` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        structure = (f.metadata() or {}).get("mergehub.optimizer_state")
        if structure is None:
            raise InputError(f"{path}: not a mergehub optimizer state (no structure metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def decode(node: dict[str, Any]) -> Any:
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "dict" in node:
            return {k: decode(v) for k, v in node["dict"]}
        if "list" in node:
            return [decode(v) for v in node["list"]]
        return node["value"]

    return decode(json.loads(structure))


def write_checkpoint(cfg: TrainConfig, method: Method, step: int, losses: list[float],
                     history: list[dict[str, Any]], main: bool = True) -> Path | None:
    """Write ``checkpoint-STEP`` (on rank 0 only; the other ranks of a sharded run take part
    in gathering the tensors); returns its path."""
    from safetensors.torch import save_file

    state_tensors = method.state_tensors()
    if not main:
        return None
    path = cfg.run_dir / f"checkpoint-{step:07d}"
    with atomic_output_dir(path, overwrite=True) as tmp:
        tensors = {n: t.detach().contiguous().clone() for n, t in state_tensors.items()}
        save_file(tensors, str(tmp / TENSORS_FILE))
        save_optimizer_state(method.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({
            "step": step, "loss": losses[-1], "losses": losses, "history": history,
            "method": cfg.method, "method_state": method.extra_state(),
            "config_digest": config_digest(cfg)}))
    old = sorted(cfg.run_dir.glob("checkpoint-*"))[:-cfg.keep_checkpoints]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return path
