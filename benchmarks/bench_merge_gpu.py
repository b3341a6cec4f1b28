#!/usr/bin/env python
"""mergehub's merge on a GPU (``device="cuda"``) against the I/O floor of the same machine.

Companion of ``bench_merge.py`` (same ~1B-parameter bf16 Llama-style model, same 4 fine-tunes,
same TIES and task-arithmetic recipes, built by its functions) for the device machine, where
mergekit cannot be installed (no network): it measures the merge in-process with
``torch.cuda.max_memory_allocated`` and peak RSS, by the chunked path (torch ops per row chunk)
and by the fused one (whole tensors through :func:`mergehub.kernels.merge_tensor`, the default on
CUDA), compares their outputs, and measures the time to read all input bytes once (warm page
cache; the floor a merge cannot beat) and to write one output (copy + fsync).

    python benchmarks/bench_merge_gpu.py                 # full size, on a CUDA machine
    python benchmarks/bench_merge_gpu.py --layers 2 --hidden 256 --intermediate 512 --vocab 1000
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_merge as bm  # noqa: E402  (the model builder and recipes)

from mergehub.merge.engine import execute  # noqa: E402
from mergehub.merge.plan import plan_merge  # noqa: E402
from mergehub.merge.recipe import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bm.shape_args(ap, layers=16, hidden=2048, intermediate=5632, vocab=32000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunked", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the chunked path once and compare its output (default: yes)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-merge-gpu-"))
    specs = bm.llama_specs(args.layers, args.hidden, args.intermediate, args.vocab, "BF16")
    params = sum(s.nbytes for s in specs) // 2
    config = bm.config_json(args.layers, args.hidden, args.intermediate, args.vocab, "bfloat16")
    t0 = time.perf_counter()
    paths = bm.write_models(work / "models", specs, config, "bf16", "2GB")
    print(f"{params:,} params, 5 models written in {time.perf_counter() - t0:.0f} s; "
          f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; "
          f"torch {torch.__version__}; {os.cpu_count()} CPUs", flush=True)
    files = [f for p in paths.values() for f in bm.data_files(p)]
    buf = bytearray(64 << 20)
    total = bm.read_all(files, buf)  # warm the page cache
    reads = []
    for _ in range(3):
        t = time.perf_counter()
        bm.read_all(files, buf)
        reads.append(time.perf_counter() - t)
    floor = min(reads)
    print(f"read floor: {total / 1e9:.2f} GB in {floor:.2f} s ({total / floor / 1e9:.1f} GB/s)")
    written = None
    for method in ("task_arithmetic", "ties"):
        recipe = work / f"{method}.yaml"
        recipe.write_text(bm.recipe_text(method, paths, "bfloat16"))
        outs = {}
        # the chunked path (per-chunk torch ops, the path before the fused kernels) once, then
        # the fused one (mergehub.kernels.merge_tensor on whole tensors, the default on CUDA)
        for fused, repeats in ((False, int(args.chunked)), (True, args.repeats)):
            for r in range(repeats):
                out = work / f"out-{method}-{fused}-{r}"
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                plan = plan_merge(load_recipe(recipe))
                result = execute(plan, out, device=args.device, progress=False, fused=fused)
                wall = time.perf_counter() - t
                gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                path = "fused  " if fused else "chunked"
                print(f"{method:16s} {path} run {r + 1}: {wall:6.2f} s "
                      f"({result.bytes / 1e9:.2f} GB out) = {wall / floor:.2f}x the read floor; "
                      f"GPU peak {gpu:.2f} GiB; process peak RSS {rss:.2f} GiB", flush=True)
                if r == 0:
                    outs[fused] = out
                else:
                    shutil.rmtree(out)
        if written is None:
            nbytes, t_copy, t_sync = bm.write_floor(outs[True], work / "copy")
            written = t_copy + t_sync
            print(f"write floor: {nbytes / 1e9:.2f} GB copied in {t_copy:.2f} s + fsync "
                  f"{t_sync:.2f} s; read + write floor {floor + written:.2f} s")
        # a fresh `hub merge` process (imports, CUDA start-up; Triton's compiled kernels come
        # from its on-disk cache, which the runs above filled)
        out = work / f"out-{method}-cli"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from mergehub.hub.cli import main; main()",
                        "merge", str(recipe), "-o",
                        str(out), "--device", args.device], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        print(f"{method:16s} `hub merge --device {args.device}` (fresh process): {wall:6.2f} s "
              f"= {wall / floor:.2f}x the read floor", flush=True)
        shutil.rmtree(out)
        if not args.chunked:
            shutil.rmtree(outs[True])
            continue
        d = bm.compare_outputs(outs[True], outs[False], paths["base"])
        print(f"{method:16s} fused vs chunked: {d.tensors} tensors, {d.differing:,} of "
              f"{d.elements:,} elements differ, max abs diff {d.max_abs:.3g} (worst "
              f"{d.worst}){'; ' + '; '.join(d.problems) if d.problems else ''}", flush=True)
        for out in outs.values():
            shutil.rmtree(out)

if __name__ == "__main__":
    main()
