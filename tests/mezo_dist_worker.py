"""What the ranks of tests/test_mezo_dist.py run: each scenario writes its results (losses,
bytes, weights) to files the test reads. Imported once by the fork server that starts the
ranks (so the ranks fork with torch, transformers and mergehub already imported), and by the
test itself for the single-process references."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers.models.llama.modeling_llama  # noqa: F401  (imported lazily otherwise)
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from mergehub.adapters import distributed, mezo
from mergehub.adapters.data import token_loss
from mergehub.adapters.trainer import train

VOCAB, ROWS, WIDTH = 64, 6, 12


def tiny_llama(hidden: int) -> LlamaForCausalLM:
    """A 2-layer Llama, the same on every rank (seeded)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def batch(step: int) -> torch.Tensor:
    """Step ``step``'s global batch of token ids."""
    return torch.randint(VOCAB, (ROWS, WIDTH), generator=torch.Generator().manual_seed(step))


def optimizer_run(out: Path, tag: str, *, hidden: int = 32, steps: int = 20, shard: bool = False,
                  report: str = "split", group: Any = None, chunk: int | None = None,
                  **options: Any) -> None:
    """``steps`` MeZO steps on :func:`tiny_llama`; rank 0 (or the only process) writes
    ``tag.json`` (losses, collective bytes per step) and ``tag.safetensors`` (the weights).

    ``report``: ``split``: each rank evaluates its rows of the batch (``batch_rows``);
    ``rank0``: every rank runs the forward on the whole batch and rank 0 alone reports its
    loss (the others report (0, 0)), so the loss is that of one process whatever the number
    of ranks. ``chunk`` sets ``mezo.CHUNK`` (small: shards start and end inside blocks)."""
    saved = mezo.CHUNK
    mezo.CHUNK = chunk or saved
    try:
        _optimizer_run(out, tag, hidden, steps, shard, report, group, options)
    finally:
        mezo.CHUNK = saved


def _optimizer_run(out: Path, tag: str, hidden: int, steps: int, shard: bool, report: str,
                   group: Any, options: dict[str, Any]) -> None:
    model = tiny_llama(hidden).eval()
    if shard:
        distributed.shard_model(model)
    params = [p for p in model.parameters()]
    opt = mezo.MeZO(params, lr=1e-3, eps=1e-3, seed=7, process_group=group, **options)
    rank = dist.get_rank() if group is not None else 0
    losses = []
    with distributed.count_bytes() as sent:
        for step in range(steps):
            ids = batch(step)
            if report == "split":
                ids = ids[opt.batch_rows(len(ids))]

            def closure() -> tuple[float, int]:
                total, weight = token_loss(model(input_ids=ids).logits, ids)
                return (total, weight) if report == "split" or rank == 0 else (0.0, 0)
            losses.append(opt.step(closure))
    weights = {n: distributed.whole(p).contiguous() for n, p in model.named_parameters()}
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in weights.values()))
    (out / f"{tag}.rank{rank}.digest").write_text(digest.hexdigest())
    if rank == 0:
        save_file(weights, str(out / f"{tag}.safetensors"))
        (out / f"{tag}.json").write_text(json.dumps(
            {"losses": losses, "bytes_per_step": sent.bytes / steps,
             "calls_per_step": sent.calls / steps}))


def train_run(out: Path, tag: str, config: dict[str, Any], **kwargs: Any) -> None:
    """``hub train``'s :func:`train` on every rank; each rank writes ``tag.rankR.json`` with
    what its result says."""
    result = train(config, **kwargs)
    (out / f"{tag}.rank{dist.get_rank()}.json").write_text(json.dumps(
        {"rank": result.rank, "losses": result.losses, "interrupted": result.interrupted,
         "output_dir": str(result.output_dir) if result.output_dir else None,
         "entry": result.entry.name if result.entry else None}))


SCENARIOS = {"optimizer": optimizer_run, "train": train_run}


def rank_main(rank: int, world: int, port: int, out: Path,
              scenarios: list[tuple[str, str, dict[str, Any]]]) -> None:
    """One rank: join the group as torchrun's environment would describe it, then run the
    scenarios (kind, tag, arguments) in order."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    try:
        for kind, tag, kwargs in scenarios:
            if kind == "optimizer":
                kwargs = {"group": dist.group.WORLD, **kwargs}
            SCENARIOS[kind](out, tag, **kwargs)
    finally:
        dist.destroy_process_group()
