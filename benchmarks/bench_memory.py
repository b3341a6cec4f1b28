#!/usr/bin/env python
"""Peak memory of ``hub add`` / ``verify`` / ``export`` on a model with one large tensor (issue 12).

The model: one bf16 embedding of ``--rows`` x ``--cols`` (default 262144 x 2048: 2^29 values,
1.07 GB, 1 GiB), a 2048-value norm weight and a ``config.json``. Weights are N(0, 0.02) drawn
from generators seeded per row block, written a block at a time through
:func:`mergehub.storage.writer.write_model_dir`, so building the model needs little memory. A
fine-tune perturbs every embedding value by N(0, 1) * 0.02 * ``--rel`` (default 0.05), the
same perturbation model as ``bench_store.py``.

Each step runs the ``hub`` CLI in a subprocess of its own under ``/usr/bin/time -f %M``: its
peak resident set size ("Maximum resident set size" of ``/usr/bin/time -v``). (Not ``os.wait4``
from this process: Linux carries a parent's peak RSS over fork and exec into the child's
``ru_maxrss``, and this process has torch loaded.) Memory figures do not depend on what else
the machine runs; the wall times are printed for orientation only and are not benchmarks on a
shared machine.

Steps, in one fresh store: add the base, add the fine-tune against it (a delta: its reference
is read while encoding), verify the store, export the base, export the fine-tune (each export
checked bit for bit against its source with :func:`mergehub.hub.demo.dir_digests`), then a
task arithmetic merge of the two from the store and the same merge of the model dirs (the two
outputs checked equal).

Run (about 5 GB of disk in the work dir)::

    python benchmarks/bench_memory.py --work /tmp/bench-memory
    python benchmarks/bench_memory.py --work /tmp/bm --rows 8192   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mergehub.hub.demo import dir_digests
from mergehub.storage.safetensors_format import TensorSpec
from mergehub.storage.writer import write_model_dir

MIB = 1 << 20
BLOCK_ROWS = 4096


def embedding_blocks(rows: int, cols: int, rel: float | None):
    """The embedding in blocks of rows: the base's, or a fine-tune's when ``rel`` is given."""
    for r0 in range(0, rows, BLOCK_ROWS):
        n = min(BLOCK_ROWS, rows - r0)
        w = torch.randn(n, cols, generator=torch.Generator().manual_seed(r0)).mul_(0.02)
        w = w.to(torch.bfloat16)
        if rel is not None:
            noise = torch.randn(n, cols, generator=torch.Generator().manual_seed(10**9 + r0))
            w = (w.float() + noise * 0.02 * rel).to(torch.bfloat16)
        yield w


def build(out: Path, rows: int, cols: int, rel: float | None) -> Path:
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (rows, cols)),
             TensorSpec("model.norm.weight", "BF16", (cols,))]

    def get(spec: TensorSpec):
        if spec.name == "model.norm.weight":
            return torch.ones(cols, dtype=torch.bfloat16)
        return embedding_blocks(rows, cols, rel)

    config = b'{"architectures": ["Embedding"], "model_type": "bench-memory"}\n'
    return write_model_dir(out, specs, get, side_files={"config.json": config}, progress=False)


def run(args: list[str]) -> tuple[float, float]:
    """Run the ``hub`` CLI with ``args``; return (peak RSS in MiB, wall seconds)."""
    with tempfile.NamedTemporaryFile("r") as peak:
        cmd = ["/usr/bin/time", "-f", "%M", "-o", peak.name, sys.executable, "-c",
               "from mergehub.hub.cli import main; main()", *args]
        start = time.monotonic()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wall = time.monotonic() - start
        if proc.returncode != 0:
            raise SystemExit(f"hub {' '.join(args)} failed:\n{proc.stdout.decode(errors='replace')}")
        return int(peak.read().split()[-1]) * 1024 / MIB, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="work dir (emptied first)")
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--rel", type=float, default=0.05)
    a = parser.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    base = build(a.work / "base", a.rows, a.cols, None)
    ft = build(a.work / "ft", a.rows, a.cols, a.rel)
    tensor_mb = a.rows * a.cols * 2 / 1e6
    store = str(a.work / "store")
    recipe = "merge_method: task_arithmetic\nbase_model: {}\nmodels: [{{model: {}}}]\n"
    (a.work / "store.yaml").write_text(recipe.format("base", "ft"))
    (a.work / "files.yaml").write_text(recipe.format(base, ft))
    steps = [("init (the interpreter and imports)", ["init"]),
             ("add base", ["add", str(base), "-n", "base"]),
             ("add fine-tune (delta)", ["add", str(ft), "-n", "ft", "-b", "base"]),
             ("verify", ["verify"]),
             ("export base", ["export", "base", "-o", str(a.work / "out-base")]),
             ("export fine-tune", ["export", "ft", "-o", str(a.work / "out-ft")]),
             ("merge from the store (task arithmetic: base + fine-tune)",
              ["merge", str(a.work / "store.yaml"), "-o", str(a.work / "merged-store")]),
             ("the same merge of the model dirs",
              ["merge", str(a.work / "files.yaml"), "-o", str(a.work / "merged-files")])]
    print(f"one bf16 tensor of {a.rows} x {a.cols} = {tensor_mb:.0f} MB "
          f"({tensor_mb * 1e6 / MIB:.0f} MiB); peak RSS of each `hub` subprocess (/usr/bin/time %M)\n")
    print("| step | peak RSS (MiB) | peak / tensor size | wall s (busy machine: not a timing) |")
    print("|---|---|---|---|")
    for label, args in steps:
        peak, wall = run(["--store", store, *args])
        print(f"| {label} | {peak:.0f} | {peak * MIB / (tensor_mb * 1e6):.2f} | {wall:.1f} |",
              flush=True)
    assert dir_digests(a.work / "out-base") == dir_digests(base), "base export differs"
    assert dir_digests(a.work / "out-ft") == dir_digests(ft), "fine-tune export differs"
    assert dir_digests(a.work / "merged-store") == dir_digests(a.work / "merged-files"), \
        "the merges differ"
    print("\nboth exports are bit-identical to their sources, the two merges to each other")
    shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
