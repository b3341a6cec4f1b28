#!/usr/bin/env python
"""A merge that reads store entries against the same merge from plain folders (issue 15, item 4).

The model: a BERT encoder of all-MiniLM-L6-v2's shape (6 layers, hidden 384, intermediate 1536,
vocab 30522: 22.7M parameters, float32), randomly initialized and written with
``save_pretrained``; two fine-tunes perturb every float tensor by N(0, 1) * 5% of its std, as
a full fine-tune does. The three are added to a fresh store (the fine-tunes against the base,
as lossless deltas). Nothing is downloaded.

Then the same recipe (``--method``, default task_arithmetic, base + both fine-tunes, float32)
is merged from the folders and from the store entries, alternating, ``--repeats`` times each
after one warm-up run of each (the page cache is warm for both): in this process with
``mergehub.merge`` (wall and CPU time), then ``--cli-repeats`` times as ``hub merge RECIPE -o
OUT`` subprocesses (wall time, with the CLI's start-up, which is what a user sees); torch on
``--threads`` intra-op threads in both (``OMP_NUM_THREADS`` for the CLI; default: torch's
default, one per core; on a busy machine pass 1, else two threads' barriers stall and the
folder merge alone takes several times longer). Each line gives store / folder of that round; the summary the median ratio.
The load average is printed before and after: on a busy machine the wall times (and to a
lesser degree the CPU times) are not valid benchmarks, only the ratios within a round mean
something.

Run (repository root; ~300 MB of scratch disk)::

    python benchmarks/bench_store_merge.py --work /tmp/bench-store-merge
    python benchmarks/bench_store_merge.py --work /tmp/bsm --method ties --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(work: Path) -> None:
    """The base, two fine-tunes and the store (skipped when the store exists)."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    from mergehub import Store

    if (work / "store").exists():
        return
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                        num_attention_heads=12, intermediate_size=1536)
    BertModel(config).save_pretrained(work / "base")
    weights = load_file(work / "base" / "model.safetensors")
    for i in (1, 2):
        gen = torch.Generator().manual_seed(i)
        shutil.copytree(work / "base", work / f"ft{i}")
        save_file({k: (v + torch.randn(v.shape, generator=gen) * v.float().std() * 0.05).to(v.dtype)
                   if v.is_floating_point() else v for k, v in weights.items()},
                  work / f"ft{i}" / "model.safetensors", metadata={"format": "pt"})
    with Store.init(work / "store") as store:
        store.add(work / "base", "base", progress=False)
        for i in (1, 2):
            store.add(work / f"ft{i}", f"ft{i}", base="base", progress=False)


def recipe(method: str, base: str, a: str, b: str) -> str:
    density = ", density: 0.3" if method in ("ties", "dare_ties", "breadcrumbs") else ""
    return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
            f"  - model: {a}\n    parameters: {{weight: 1.0{density}}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5{density}}}\ndtype: float32\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cli-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    import mergehub
    from mergehub import Store

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    build(work)
    torch.set_num_threads(args.threads)
    texts = {"folder": recipe(args.method, *(str(work / n) for n in ("base", "ft1", "ft2"))),
             "store": recipe(args.method, "base", "ft1", "ft2")}
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs; torch threads "
          f"{args.threads}; method {args.method}", flush=True)
    store = Store(work / "store")

    def in_process(kind: str) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        mergehub.merge(texts[kind], out=work / f"out-{kind}", store=store, overwrite=True,
                       progress=False)
        return time.perf_counter() - wall, time.process_time() - cpu

    in_process("folder"), in_process("store")  # warm-up
    walls, cpus = [], []
    for i in range(args.repeats):
        (fw, fc), (sw, sc) = in_process("folder"), in_process("store")
        walls.append(sw / fw)
        cpus.append(sc / fc)
        print(f"in process {i + 1}: folder {fw:.2f} s wall, {fc:.2f} s CPU; store {sw:.2f} s "
              f"wall, {sc:.2f} s CPU; store/folder wall {sw / fw:.2f}, CPU {sc / fc:.2f}",
              flush=True)
    store.close()
    for kind, text in texts.items():
        (work / f"{kind}.yaml").write_text(text)
    hub = [sys.executable, "-c", "from mergehub.hub.cli import main; main()"]
    # `python -c` looks in its working directory first: run it in the tree this process
    # imported mergehub from (a code tree on PYTHONPATH, not the checkout it was started in)
    tree = Path(mergehub.__file__).resolve().parents[1]

    def cli(kind: str) -> float:
        start = time.perf_counter()
        subprocess.run([*hub, "--store", str(work / "store"), "merge", str(work / f"{kind}.yaml"),
                        "-o", str(work / f"cli-{kind}"), "--overwrite"], check=True,
                       capture_output=True, cwd=tree,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        return time.perf_counter() - start

    cli_ratios = []
    for i in range(args.cli_repeats):
        f, s = cli("folder"), cli("store")
        cli_ratios.append(s / f)
        print(f"hub merge {i + 1}: folder {f:.2f} s, store {s:.2f} s; store/folder {s / f:.2f}",
              flush=True)
    print(f"median store/folder: in process wall {statistics.median(walls):.2f}, CPU "
          f"{statistics.median(cpus):.2f}" + (f"; hub merge wall "
                                              f"{statistics.median(cli_ratios):.2f}"
                                              if cli_ratios else ""))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
