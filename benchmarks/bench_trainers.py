#!/usr/bin/env python
"""Trainer benchmarks (issue 6). ``memory``: peak memory of MeZO vs inference vs backprop;
``speed``: step times against inference's, alternating in one process (issue 16).

(Accuracy per method on the synthetic tasks is ``bench_trainer_accuracy.py``.)

Every mode runs on the same randomly initialized Llama-style model (transformers
``LlamaForCausalLM``, ``use_cache=False``) and the same batch of random tokens, each in its own
subprocess, so one mode's allocations cannot hide in another's peak:

- ``inference``: the forward pass with the loss, under ``torch.no_grad``;
- ``mezo``, ``sparse-mezo`` (q = 0.25), ``mezo-master`` (float32 copies of the weights):
  ``mergehub.adapters.mezo.MeZO.step`` over all parameters (two such forwards per step); on
  CUDA each also as ``...-torch`` (``backend="torch"``: z from ``torch.randn`` and torch ops,
  the path before the Triton kernels), so the s/step column compares the two in one run;
- ``adam``: backprop fine-tuning, ``loss.backward()`` + ``torch.optim.Adam`` over all
  parameters in the model's dtype;
- ``adam-amp`` (CUDA): the usual mixed-precision recipe, float32 weights, gradients and Adam
  moments with the forward under ``torch.autocast(bfloat16)``;
- ``inference-graph``, ``mezo-graph``, ``sparse-mezo-graph`` (CUDA): the same with the forward
  pass and its loss replayed from a CUDA graph (``mergehub.adapters.graphs.cuda_graphed``):
  the host launches one graph per forward instead of the model's hundreds of kernels. The
  ``x inf`` / ``x inf-graph`` columns give each mode's s/step over ``inference``'s and
  ``inference-graph``'s of the same run.

``--profile`` (CUDA) adds one more step per mode under ``torch.profiler`` and a summary of its
timeline: device time inside and outside the closure's forward passes, kernels launched, the
host's waits (:func:`profile_step`).

Measured: on CUDA ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) from just
before the first step; on CPU the process's peak RSS (VmHWM, reset through
``/proc/self/clear_refs`` once the model is built), both over ``--steps`` steps. Ratios are
against ``inference`` measured in the same run.

    python benchmarks/bench_trainers.py memory                      # CPU, ~125M params, fp32
    python benchmarks/bench_trainers.py memory --device cuda --dtype bfloat16 --hidden 2048 \\
        --intermediate 5632 --layers 22 --heads 32 --kv-heads 4 --batch 8 --seq 512
    python benchmarks/bench_trainers.py memory --hidden 64 --intermediate 128 --layers 2 \\
        --vocab 256 --heads 4 --kv-heads 2 --batch 2 --seq 16      # smoke test, seconds

``speed`` builds the model once and runs rounds of one step per mode (inference first, then
``--modes``, default ``mezo,sparse-mezo``), so every ratio compares steps taken seconds apart
on the same device state (:func:`speed`)::

    python benchmarks/bench_trainers.py speed --device cuda --dtype bfloat16 --hidden 2048 \\
        --intermediate 5632 --layers 22 --heads 32 --kv-heads 4 --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import bench_merge as bm  # the model-shape options (benchmarks/ is on the path of a script)

if TYPE_CHECKING:
    import torch

FORWARD = "closure forward"  # the profiler range around each of the closure's forward passes
CPU_MODES = ("inference", "mezo", "sparse-mezo", "adam")
CUDA_MODES = ("inference", "mezo", "mezo-torch", "sparse-mezo", "sparse-mezo-torch",
              "mezo-master", "mezo-master-torch", "adam", "adam-amp", "inference-graph",
              "mezo-graph", "sparse-mezo-graph")


def _status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    """The benchmark's model (random init, built in ``dtype`` on ``args.device``) and its batch."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(args.seq, 128), use_cache=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy on the way
    with device:
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(default)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(args.vocab, (args.batch, args.seq), generator=gen).to(device)
    return model, ids


def step_of(mode: str, model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    """One step of ``mode`` (the module docstring's modes) on ``model`` and the batch ``ids``."""
    import torch
    from torch.profiler import record_function

    from mergehub.adapters.graphs import cuda_graphed
    from mergehub.adapters.mezo import MeZO

    def forward(input_ids):
        return model(input_ids=input_ids, labels=input_ids).loss

    run = cuda_graphed(forward) if mode.endswith("-graph") else forward

    def loss():
        with record_function(FORWARD):
            return run(input_ids=ids)

    if mode.startswith("inference"):
        def step():
            with torch.no_grad():
                return float(loss())
    elif "mezo" in mode:
        variant = mode.removesuffix("-torch").removesuffix("-graph")
        opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3,
                   density=0.25 if variant == "sparse-mezo" else None,
                   master_weights=variant == "mezo-master",
                   backend="torch" if mode.endswith("-torch") else None)

        def step():
            return opt.step(loss)
    elif mode in ("adam", "adam-amp"):
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)

        def step():
            with torch.autocast(ids.device.type, dtype=torch.bfloat16,
                                enabled=mode == "adam-amp"):
                value = loss()
            value.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(value)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return step


def run_mode(args: argparse.Namespace) -> dict:
    """Build the model, run ``args.child`` for ``args.steps`` steps, return its peak memory."""
    import torch

    mode, device = args.child, torch.device(args.device)
    dtype = torch.float32 if mode == "adam-amp" else getattr(torch, args.dtype)
    baseline_kib = _status_kib("VmRSS")
    model, ids = build(args, dtype)
    params = sum(p.numel() for p in model.parameters())
    step = step_of(mode, model, ids)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start_alloc = torch.cuda.memory_allocated() if cuda else 0
    start_kib = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out = {"mode": mode, "params": params, "dtype": str(dtype).removeprefix("torch."),
           "step_s": sorted(times)[len(times) // 2], "losses": losses,
           "rss_baseline_mib": baseline_kib / 1024, "rss_start_mib": start_kib / 1024,
           "peak_rss_mib": _status_kib("VmHWM") / 1024, "rss_peak_reset": reset}
    if cuda:
        out.update(start_mib=start_alloc / 2**20,
                   peak_mib=torch.cuda.max_memory_allocated() / 2**20,
                   reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
                   gpu=torch.cuda.get_device_name())
        if args.profile:
            out["profile"] = profile_step(step)
    return out


def profile_step(step) -> dict:
    """One more step under ``torch.profiler`` (after the timed ones), summarized from its
    Chrome trace: the step's wall time (profiler overhead included), the device's busy time
    (union of kernel intervals) and kernel count inside the closure's forward passes (the
    ``FORWARD`` ranges) and outside them (the optimizer's own work), the host time outside the
    forwards, the runtime calls that wait for the device (synchronizations, copies), and the
    kernels outside the forwards that took the most device time."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    forwards = [(e["ts"], e["ts"] + e["dur"]) for e in events
                if e.get("cat") == "user_annotation" and e.get("name") == FORWARD]
    runtime = {e["args"]["correlation"]: e for e in events  # launches: runtime or driver API
               if e.get("cat") in ("cuda_runtime", "cuda_driver")
               and "correlation" in e.get("args", {})}
    kernels = [e for e in events if e.get("cat") == "kernel"]

    def in_forward(kernel: dict) -> bool:
        launch = runtime.get(kernel.get("args", {}).get("correlation"))
        return launch is not None and any(a <= launch["ts"] <= b for a, b in forwards)

    def busy_ms(ks: list[dict]) -> float:
        total, end = 0.0, -math.inf
        for k in sorted(ks, key=lambda k: k["ts"]):
            start, stop = max(k["ts"], end), k["ts"] + k["dur"]
            total += max(0.0, stop - start)
            end = max(end, stop)
        return total / 1e3

    fwd = [k for k in kernels if in_forward(k)]
    rest = [k for k in kernels if not in_forward(k)]
    top: dict[str, list[float]] = {}
    for k in rest:
        entry = top.setdefault(k["name"][:70], [0, 0.0])
        entry[0] += 1
        entry[1] += k["dur"] / 1e3
    waits = [e for e in runtime.values() if "Synchronize" in e["name"] or "Memcpy" in e["name"]]
    return {"wall_ms": wall * 1e3, "forwards": len(forwards),
            "forward_host_ms": sum(b - a for a, b in forwards) / 1e3,
            "kernels_forward": len(fwd), "kernels_other": len(rest),
            "device_busy_forward_ms": busy_ms(fwd), "device_busy_other_ms": busy_ms(rest),
            "launches": sum("LaunchKernel" in e["name"] for e in runtime.values()),
            "waits": len(waits), "wait_ms": sum(e["dur"] for e in waits) / 1e3,
            "top_other": sorted(([n, c, round(ms, 3)] for n, (c, ms) in top.items()),
                                key=lambda r: -r[2])[:8]}


def memory(args: argparse.Namespace) -> None:
    """Run every mode in a subprocess and print one table with ratios to inference."""
    import torch

    modes = args.modes.split(",") if args.modes else (
        CUDA_MODES if args.device == "cuda" else CPU_MODES)
    print(f"trainer memory benchmark: Llama hidden {args.hidden}, intermediate "
          f"{args.intermediate}, {args.layers} layers, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}; batch {args.batch} x {args.seq} tokens; {args.dtype}; "
          f"{args.steps} steps per mode; device {args.device}; torch {torch.__version__}; "
          f"{os.cpu_count()} CPUs", flush=True)
    results = []
    for mode in modes:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "memory", *sys.argv[2:], "--child", mode],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{mode}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - t
        results.append(result)
        print(json.dumps(result), flush=True)
    if not results:
        return
    cuda = args.device == "cuda"
    key = "peak_mib" if cuda else "peak_rss_mib"
    ref = next((r[key] for r in results if r["mode"] == "inference"), None)
    first = results[0]
    print(f"\n## Peak memory ({first['params']:,} params; MiB = 2^20 bytes; "
          f"{'torch.cuda.max_memory_allocated on ' + first['gpu'] if cuda else 'peak RSS of the process (VmHWM)'}"
          f"; ratios to inference)")
    steps = {r["mode"]: r["step_s"] for r in results}

    def times(mode: str, step_s: float) -> str:
        return f"{step_s / steps[mode]:.2f}x" if mode in steps else "-"

    print(f"{'mode':18s} {'dtype':9s} {'peak MiB':>10s} {'vs inference':>12s} "
          f"{'at start MiB':>12s} {'reserved MiB':>12s} {'s/step':>8s} {'x inf':>6s} "
          f"{'x inf-graph':>11s}")
    for r in results:
        ratio = f"{r[key] / ref:.2f}x" if ref else "-"
        start = r["start_mib"] if cuda else r["rss_start_mib"]
        reserved = f"{r['reserved_mib']:12.0f}" if cuda else f"{'-':>12s}"
        print(f"{r['mode']:18s} {r['dtype']:9s} {r[key]:10.0f} {ratio:>12s} {start:12.0f} "
              f"{reserved} {r['step_s']:8.4f} {times('inference', r['step_s']):>6s} "
              f"{times('inference-graph', r['step_s']):>11s}")
    if not cuda:
        print(f"(RSS of the interpreter with torch and transformers imported, before the model: "
              f"{first['rss_baseline_mib']:.0f} MiB; 'at start' is after building the model)")
    profiled = [r for r in results if "profile" in r]
    if profiled:
        print("\n## One profiled step (torch.profiler; ms; 'fwd' = inside the closure's forward "
              "passes, 'other' = the optimizer's own work)")
        print(f"{'mode':18s} {'wall':>8s} {'fwd host':>8s} {'busy fwd':>8s} {'busy oth':>8s} "
              f"{'k fwd':>6s} {'k oth':>6s} {'waits':>5s} {'wait ms':>8s}")
        for r in profiled:
            p = r["profile"]
            print(f"{r['mode']:18s} {p['wall_ms']:8.2f} {p['forward_host_ms']:8.2f} "
                  f"{p['device_busy_forward_ms']:8.2f} {p['device_busy_other_ms']:8.2f} "
                  f"{p['kernels_forward']:6d} {p['kernels_other']:6d} {p['waits']:5d} "
                  f"{p['wait_ms']:8.2f}")
            for name, count, ms in p["top_other"][:4]:
                print(f"{'':18s}   {ms:8.3f} ms {count:5d}x {name}")


def speed(args: argparse.Namespace) -> None:
    """Step time of each mode against inference's, the modes alternating in one process.

    Every round runs one step of each mode (``--modes``, inference first) on the same model
    and batch, each timed alone (synchronized before and after); after ``--warmup`` rounds,
    ``--rounds`` rounds are kept. Printed per mode: the median, min and max step time, the
    median over the median of its baseline (``inference-graph`` for a ``-graph`` mode where
    that runs too, else ``inference``), and the median and range of the per-round ratios.
    Where the device's speed drifts over minutes (clocks, a neighbour on the host), the
    rounds see the same drift and the ratios stay put, unlike those of :func:`memory`, whose
    modes run minutes apart in processes of their own.
    """
    import statistics

    import torch

    modes = ["inference", *[m for m in (args.modes or "mezo,sparse-mezo").split(",")
                            if m != "inference"]]
    cuda = args.device == "cuda"
    model, ids = build(args, getattr(torch, args.dtype))
    steps = {mode: step_of(mode, model, ids) for mode in modes}
    print(f"trainer speed benchmark: Llama hidden {args.hidden}, intermediate "
          f"{args.intermediate}, {args.layers} layers, heads {args.heads}/{args.kv_heads}, vocab "
          f"{args.vocab}; {sum(p.numel() for p in model.parameters()):,} params; batch "
          f"{args.batch} x {args.seq} tokens; {args.dtype}; device "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}; {args.warmup} + {args.rounds} "
          f"rounds of {', '.join(modes)}; torch {torch.__version__}", flush=True)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(args.warmup + args.rounds):
        for mode, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if r >= args.warmup:
                times[mode].append(time.perf_counter() - t)
    print(f"{'mode':18s} {'median ms':>9s} {'min ms':>8s} {'max ms':>8s} {'against':>16s} "
          f"{'x':>6s} {'per round: median [min, max]':>30s}")
    for mode, ts in times.items():
        against = ("inference-graph" if mode.endswith("-graph") and "inference-graph" in times
                   else "inference")
        ratios = [t / i for t, i in zip(ts, times[against])]
        print(f"{mode:18s} {statistics.median(ts) * 1e3:9.2f} {min(ts) * 1e3:8.2f} "
              f"{max(ts) * 1e3:8.2f} {against:>16s} "
              f"{statistics.median(ts) / statistics.median(times[against]):5.2f}x "
              f"{statistics.median(ratios):11.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    mem = sub.add_parser("memory", help="peak memory of MeZO vs inference vs Adam backprop")
    spd = sub.add_parser("speed", help="step time of MeZO vs inference, alternating in one "
                                       "process")
    for part in (mem, spd):  # the model and its batch
        part.add_argument("--device", default="cpu")
        part.add_argument("--dtype", default="float32",
                          choices=["float32", "bfloat16", "float16"])
        bm.shape_args(part, layers=12, hidden=768, intermediate=2048, vocab=32000, heads=12,
                      kv_heads=4)
        part.add_argument("--batch", type=int, default=4)
        part.add_argument("--seq", type=int, default=256)
    mem.add_argument("--steps", type=int, default=3)
    mem.add_argument("--modes", default=None, help="comma-separated subset of the modes")
    mem.add_argument("--profile", action="store_true",
                     help="CUDA: profile one more step per mode and summarize its timeline")
    mem.add_argument("--child", default=None, help=argparse.SUPPRESS)
    spd.add_argument("--modes", default=None,
                     help="comma-separated modes timed against inference (default: mezo,"
                          "sparse-mezo; e.g. inference-graph,mezo-graph on CUDA)")
    spd.add_argument("--rounds", type=int, default=30, help="rounds kept")
    spd.add_argument("--warmup", type=int, default=3, help="rounds run first, not kept")
    args = ap.parse_args()
    if args.part == "speed":
        speed(args)
    elif args.child:
        print(json.dumps(run_mode(args)))
    else:
        memory(args)


if __name__ == "__main__":
    main()
