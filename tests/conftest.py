"""Shared fixtures: real tiny checkpoints written by transformers / peft, and a fresh store."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers

from mergehub.hub.demo import make_finetune, make_lora, make_tiny_llama
from mergehub.storage.store import Store

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip @pytest.mark.gpu tests when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama checkpoints: a base per dtype, a sharded base, fine-tunes, a LoRA, another arch."""
    root = tmp_path_factory.mktemp("models")
    out: dict[str, Path] = {}
    for tag, dtype in DTYPES.items():
        out[f"base-{tag}"] = make_tiny_llama(root / f"base-{tag}", dtype=dtype)
        out[f"sharded-{tag}"] = make_tiny_llama(root / f"sharded-{tag}", dtype=dtype,
                                                max_shard_size="100KB")
    base = out["base-bf16"]
    out["ft-mlp"] = make_finetune(base, root / "ft-mlp", pattern="mlp")
    out["ft-attn"] = make_finetune(base, root / "ft-attn", pattern="self_attn", seed=5)
    out["ft-sharded"] = make_finetune(base, root / "ft-sharded", pattern="mlp", seed=7,
                                      max_shard_size="100KB")
    out["lora"] = make_lora(base, root / "lora")
    return out


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store.init(tmp_path / "store") as s:
        yield s
