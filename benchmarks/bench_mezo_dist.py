#!/usr/bin/env python
"""Data-parallel MeZO against DDP backprop on N processes (issue 17, item 5).

The same randomly initialized Llama-style model (transformers ``LlamaForCausalLM``) and the
same global batches of random tokens, on N = 1, 2, 4 processes (``--procs``) joined by
torch.distributed (gloo on the CPU, NCCL with ``--device cuda``, one GPU a process):

- ``mezo``: :class:`mergehub.adapters.mezo.MeZO` with ``process_group``: every rank draws the
  same z, evaluates L(theta +- eps z) on its rows of the batch, and the ranks all-reduce the
  loss sums and their token counts;
- ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` backprop with SGD: every rank runs
  forward and backward on its rows and the ranks all-reduce the gradients.

Per row: steps/s (the median step time of ``--steps`` steps after ``--warmup``, the slowest
rank's) and the bytes a rank hands to collectives per step. MeZO's are counted by
:func:`mergehub.adapters.distributed.count_bytes` (a wrapper around torch.distributed's
collectives); DDP's gradient all-reduce runs inside its C++ reducer, so it is counted by a
communication hook that adds up the buckets it all-reduces (DDP's default all-reduce, then
the bucket's bytes). The headline is DDP's bytes per step over MeZO's, at equal N; N = 1
exchanges nothing (no process group; DDP is not used at N = 1, its row is plain backprop).

    python benchmarks/bench_mezo_dist.py                              # CPU, ~30M params
    python benchmarks/bench_mezo_dist.py --hidden 64 --intermediate 128 --layers 2 \\
        --vocab 256 --steps 3 --warmup 1                              # smoke test, seconds
    python benchmarks/bench_mezo_dist.py --device cuda --procs 1 2 4 8 --hidden 2048 \\
        --intermediate 5632 --layers 22 --heads 32 --kv-heads 4 --seq 512 --batch 32

Timings on a shared or busy machine are not comparable; run on an otherwise idle one, with
``--threads`` x N at most the cores (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(args.seq, 128), use_cache=False)
    return LlamaForCausalLM(config)


def _batch(args: argparse.Namespace, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return torch.randint(args.vocab, (args.batch, args.seq), generator=gen)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One process: ``--steps`` timed steps of ``args.mode``; rank 0 writes its row."""
    from mergehub.adapters import distributed
    from mergehub.adapters.data import token_loss
    from mergehub.adapters.mezo import MeZO, forward_only

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    group = dist.group.WORLD if world > 1 else None
    model = _model(args).to(device)
    rows = distributed.rows(args.batch, rank, world)
    sent = [0]
    if args.mode == "mezo":
        opt = MeZO(list(model.parameters()), lr=1e-6, eps=1e-3, seed=0, process_group=group)

        def step(ids: torch.Tensor) -> None:
            def closure() -> tuple[float, int]:
                return token_loss(model(input_ids=ids).logits, ids)
            with forward_only(model):
                opt.step(closure)
    else:
        net = model
        if world > 1:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[rank] if cuda else None)

            def counting(state, bucket):  # no annotations: DDP checks them as objects
                sent[0] += bucket.buffer().numel() * bucket.buffer().element_size()
                return default_hooks.allreduce_hook(state, bucket)
            net.register_comm_hook(None, counting)
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)

        def step(ids: torch.Tensor) -> None:
            logits = net(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    times = []
    with distributed.count_bytes() as counted:
        for i in range(args.warmup + args.steps):
            ids = _batch(args, i)[rows].to(device)
            if world > 1:
                dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(ids)
            if cuda:
                torch.cuda.synchronize()
            if i == args.warmup - 1:
                sent[0], counted.bytes = 0, 0
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    if world > 1:  # the slowest rank sets the pace
        median = _slowest(median, device)
    if rank == 0:
        bytes_per_step = (counted.bytes if args.mode == "mezo" else sent[0]) / args.steps
        Path(out).write_text(json.dumps({
            "mode": args.mode, "procs": world, "steps_per_s": 1 / median,
            "bytes_per_step": bytes_per_step,
            "params": sum(p.numel() for p in model.parameters())}))
    if world > 1:
        dist.destroy_process_group()


def _slowest(value: float, device: torch.device) -> float:
    """The largest ``value`` over the ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, mode: str, procs: int) -> dict:
    """One row: ``mode`` on ``procs`` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "row.json")
        args = argparse.Namespace(**{**vars(args), "mode": mode})
        if procs == 1:
            _rank(0, 1, 0, args, out)
        else:
            mp.start_processes(_rank, args=(procs, _free_port(), args, out), nprocs=procs,
                               start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows), split over N")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args()
    if any(args.batch < n for n in args.procs):
        sys.exit(f"error: --batch {args.batch} has fewer rows than --procs {max(args.procs)}")
    rows = [run(args, mode, n) for n in args.procs for mode in ("mezo", "ddp")]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{rows[0]['params'] / 1e6:.1f}M parameters, global batch {args.batch} x {args.seq}, "
          f"{args.device}, {args.threads} thread(s) a process")
    print(f"{'N':>3} {'MeZO steps/s':>13} {'DDP steps/s':>12} {'MeZO B/step':>12} "
          f"{'DDP B/step':>14} {'DDP/MeZO bytes':>15}")
    for n in args.procs:
        mezo, ddp = (next(r for r in rows if r["procs"] == n and r["mode"] == m)
                     for m in ("mezo", "ddp"))
        ratio = f"{ddp['bytes_per_step'] / mezo['bytes_per_step']:.3g}" \
            if mezo["bytes_per_step"] else "-"
        print(f"{n:>3} {mezo['steps_per_s']:>13.3f} {ddp['steps_per_s']:>12.3f} "
              f"{mezo['bytes_per_step']:>12.0f} {ddp['bytes_per_step']:>14.0f} {ratio:>15}")


if __name__ == "__main__":
    main()
