#!/usr/bin/env python
"""mergehub's merge on a GPU (``device="cuda"``) against the I/O floor of the same machine.

Companion of ``bench_merge.py`` (same ~1B-parameter bf16 Llama-style model, same 4 fine-tunes,
same TIES and task-arithmetic recipes, built by its functions) for the device machine, where
mergekit cannot be installed (no network): it measures the merge in-process with
``torch.cuda.max_memory_allocated`` and peak RSS, and the time to read all input bytes once
(warm page cache), the floor a merge cannot beat.

    python benchmarks/bench_merge_gpu.py                 # full size, on a CUDA machine
    python benchmarks/bench_merge_gpu.py --layers 2 --hidden 256 --intermediate 512 --vocab 1000
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_merge as bm  # noqa: E402  (the model builder and recipes)

import mergehub  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=2)
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
    for method in ("task_arithmetic", "ties"):
        recipe = work / f"{method}.yaml"
        recipe.write_text(bm.recipe_text(method, paths, "bfloat16"))
        for r in range(args.repeats):
            out = work / f"out-{method}-{r}"
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            result = mergehub.merge(recipe, out=out, device=args.device, progress=False,
                                    echo=lambda s: None)
            wall = time.perf_counter() - t
            gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(f"{method:16s} run {r + 1}: {wall:6.2f} s ({result.bytes / 1e9:.2f} GB out) = "
                  f"{wall / floor:.2f}x the read floor; GPU peak {gpu:.2f} GiB; "
                  f"process peak RSS {rss:.2f} GiB", flush=True)
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
