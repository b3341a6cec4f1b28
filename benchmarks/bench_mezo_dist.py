#!/usr/bin/env python
"""Data-parallel and sharded MeZO against DDP backprop on N processes (issues 17 and 21).

The same randomly initialized Llama-style model (transformers ``LlamaForCausalLM``) and the
same global batches of random tokens, on N = 1, 2, 4 processes (``--procs``) joined by
torch.distributed (gloo on the CPU, NCCL with ``--device cuda``, one GPU a process), one row
per N and ``--modes``:

- ``mezo``: :class:`mergehub.adapters.mezo.MeZO` with ``process_group``: every rank holds the
  whole model, draws the same z, evaluates L(theta +- eps z) on its rows of the batch, and the
  ranks all-reduce the loss sums and their token counts;
- ``sharded``: the same MeZO on the model sharded with FSDP2
  (:func:`mergehub.adapters.distributed.shard_model`): a rank holds 1/N of each parameter,
  perturbs and updates its shard only (z keyed by the global element index), and FSDP gathers
  each block for its forward; with ``--meta-init`` no rank ever holds the whole model, so the
  model may be larger than one device;
- ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` backprop with AdamW: every rank runs
  forward and backward on its rows and the ranks all-reduce the gradients.

Per row: steps/s (the median step time of ``--steps`` steps after ``--warmup``, the slowest
rank's), the bytes a rank hands to collectives per step and the peak memory of the fullest
rank (``torch.cuda.max_memory_allocated``, or the peak RSS on the CPU; every row runs in fresh
processes). MeZO's bytes are counted by :func:`mergehub.adapters.distributed.count_bytes` (a
wrapper around torch.distributed's collectives, the FSDP all-gathers of ``sharded`` included);
DDP's gradient all-reduce runs inside its C++ reducer, so it is counted by a communication
hook that adds up the buckets it all-reduces. N = 1 exchanges nothing (no process group
except for ``sharded``; DDP is not used at N = 1, its row is plain backprop). ``--weights``
gathers every MeZO row's final weights and compares them with the first MeZO row's: sharded
and replicated MeZO on the same N take the same steps bit for bit.

    python benchmarks/bench_mezo_dist.py                              # CPU, ~30M params
    python benchmarks/bench_mezo_dist.py --hidden 64 --intermediate 128 --layers 2 \\
        --vocab 256 --steps 3 --warmup 1 --modes mezo sharded ddp --weights  # seconds
    python benchmarks/bench_mezo_dist.py --device cuda --dtype bfloat16 --procs 1 2 \\
        --hidden 2048 --intermediate 5632 --layers 22 --heads 32 --kv-heads 4 --vocab 32000 \\
        --seq 512 --batch 8                                           # 1.1B, GPUs
    python benchmarks/bench_mezo_dist.py --device cuda --dtype bfloat16 --procs 2 \\
        --modes sharded --meta-init --hidden 8192 --intermediate 28672 --layers 96 \\
        --heads 64 --kv-heads 8 --vocab 128256 --seq 512 --batch 2   # 84B on 2 GPUs

Timings on a shared or busy machine are not comparable; run on an otherwise idle one, with
``--threads`` x N at most the cores (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bench_merge as bm  # the model-shape options (benchmarks/ is on the path of a script)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _model(args: argparse.Namespace, device: torch.device, shard: bool) -> torch.nn.Module:
    """The benchmark's Llama on ``device`` in ``--dtype``, FSDP2-sharded over the ranks when
    ``shard``. By default its weights are transformers' random init under seed 0 (the same on
    every rank and for every N); ``--meta-init`` builds it on the meta device, shards it first,
    then draws N(0, 0.02) weights (norms 1) into each rank's shard on ``device``, one whole
    parameter at a time (the same weights for every N): no rank ever holds the whole model,
    so it may be larger than one device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergehub.adapters import distributed

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(args.seq, 128), use_cache=False)
    dtype = DTYPES[args.dtype]
    if not args.meta_init:
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
        return distributed.shard_model(model) if shard else model
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    if shard:
        distributed.shard_model(model)
    model.to_empty(device=device)
    gen = torch.Generator(device)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            local, offset = distributed.local_run(p)
            if name.endswith("norm.weight"):
                local.fill_(1.0)
                continue
            # the whole parameter drawn (one at a time), this rank's run of it kept: the
            # weights do not depend on N or the rank
            full = torch.empty(p.shape, dtype=p.dtype, device=device)
            full.normal_(0.0, 0.02, generator=gen.manual_seed(i))
            local.copy_(full.view(-1)[offset:offset + local.numel()].view(local.shape))
            del full
        for module in model.modules():  # buffers computed at init: the rotary embedding's
            if next(module.buffers(recurse=False), None) is not None:
                fresh = type(module)(config=module.config)  # small; built on the CPU
                for key, buf in fresh.named_buffers(recurse=False):
                    getattr(module, key).copy_(buf)
    return model


def _peak_mib(device: torch.device) -> float:
    """This process's peak memory: allocated on the GPU, or resident (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


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
    sharded = args.mode == "sharded"
    joined = world > 1 or sharded  # FSDP2 needs a process group, also of one
    if cuda:
        torch.cuda.set_device(device)
    if joined:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                device_id=device if cuda else None)
    group = dist.group.WORLD if joined else None
    model = _model(args, device, sharded)
    rows = distributed.rows(args.batch, rank, world)
    sent = [0]
    losses: list[float] = []
    if args.mode in ("mezo", "sharded"):
        opt = MeZO(list(model.parameters()), lr=1e-6, eps=1e-3, seed=0, process_group=group)

        def step(ids: torch.Tensor) -> None:
            def closure() -> tuple[float, int]:
                return token_loss(model(input_ids=ids).logits, ids)
            with forward_only(model):
                losses.append(opt.step(closure))
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
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

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
            if joined:
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
    peak = _peak_mib(device)
    if joined:  # the slowest rank sets the pace; the fullest the peak
        median, peak = _largest(median, device), _largest(peak, device)
    if args.weights:  # every rank takes part in gathering a sharded parameter
        final = {n: distributed.whole(p).cpu() for n, p in model.named_parameters()}
    if rank == 0:
        bytes_per_step = (sent[0] if args.mode == "ddp" else counted.bytes) / args.steps
        if args.weights:
            from safetensors.torch import save_file

            save_file(final, str(Path(out).with_suffix(".safetensors")))
        Path(out).write_text(json.dumps({
            "mode": args.mode, "procs": world, "steps_per_s": 1 / median,
            "bytes_per_step": bytes_per_step, "peak_mib": peak, "losses": losses,
            "params": sum(p.numel() for p in model.parameters())}))
    if joined:
        dist.destroy_process_group()


def _largest(value: float, device: torch.device) -> float:
    """The largest ``value`` over the ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, mode: str, procs: int, keep: Path) -> dict:
    """One row: ``mode`` on ``procs`` fresh processes (also at N = 1, so that each row's peak
    memory is its own); with ``--weights`` the final weights are kept in ``keep``."""
    out = str(keep / f"{mode}-{procs}.json")
    args = argparse.Namespace(**{**vars(args), "mode": mode})
    mp.start_processes(_rank, args=(procs, _free_port(), args, out), nprocs=procs,
                       start_method="spawn")
    row = json.loads(Path(out).read_text())
    if args.weights:
        row["weights"] = str(Path(out).with_suffix(".safetensors"))
    return row


def _differences(rows: list[dict]) -> list[str]:
    """For ``--weights``: each MeZO row's final weights and losses against the first MeZO
    row's (bit-identical, or the largest absolute difference)."""
    from safetensors.torch import load_file

    runs = [r for r in rows if r["mode"] != "ddp"]
    first = load_file(runs[0]["weights"])
    lines = []
    for r in runs[1:]:
        other = load_file(r["weights"])
        same = all(torch.equal(first[k], other[k]) for k in first)
        diff = max(float((first[k].float() - other[k].float()).abs().max()) for k in first)
        lines.append(f"{r['mode']} N={r['procs']} against {runs[0]['mode']} "
                     f"N={runs[0]['procs']}: weights {'bit-identical' if same else 'differ'} "
                     f"(max |diff| {diff:.3g}), losses "
                     f"{'equal' if r['losses'] == runs[0]['losses'] else 'differ'}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", choices=("mezo", "ddp", "sharded"),
                    default=["mezo", "ddp"], help="rows per N (default: mezo ddp)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ap.add_argument("--meta-init", action="store_true",
                    help="build on the meta device and draw each rank's shard in place (a "
                    "model larger than one device; fast on a GPU; other weights than the "
                    "default init, the same for every N)")
    ap.add_argument("--weights", action="store_true",
                    help="gather the final weights and compare the MeZO rows' bit for bit")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows), split over N")
    ap.add_argument("--seq", type=int, default=64)
    bm.shape_args(ap, layers=8, hidden=512, intermediate=1408, vocab=8192, heads=8, kv_heads=4)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args()
    if any(args.batch < n for n in args.procs):
        sys.exit(f"error: --batch {args.batch} has fewer rows than --procs {max(args.procs)}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in args.procs:
            for mode in args.modes:
                rows.append(run(args, mode, n, Path(tmp)))
                if not args.json:
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}),
                          flush=True)
        compared = _differences(rows) if args.weights else []
    if args.json:
        for row in rows:
            print(json.dumps({k: v for k, v in row.items() if k != "weights"}))
        for line in compared:
            print(json.dumps({"compare": line}))
        return
    print(f"\n{rows[0]['params'] / 1e6:.1f}M parameters ({args.dtype}), global batch "
          f"{args.batch} x {args.seq}, {args.device}, {args.threads} thread(s) a process")
    print(f"{'N':>3} {'mode':>8} {'steps/s':>9} {'bytes/step':>14} {'peak MiB':>10}")
    for r in rows:
        print(f"{r['procs']:>3} {r['mode']:>8} {r['steps_per_s']:>9.3f} "
              f"{r['bytes_per_step']:>14,.0f} {r['peak_mib']:>10,.0f}")
    for n in args.procs:
        got = {r["mode"]: r for r in rows if r["procs"] == n}
        if "mezo" in got and "ddp" in got and got["mezo"]["bytes_per_step"]:
            print(f"N={n}: DDP/MeZO bytes per step "
                  f"{got['ddp']['bytes_per_step'] / got['mezo']['bytes_per_step']:.3g}")
    for line in compared:
        print(line)


if __name__ == "__main__":
    main()
