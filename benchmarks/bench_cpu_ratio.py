#!/usr/bin/env python
"""TIES and DARE-TIES against task arithmetic on the CPU, in the same run: wall and CPU seconds
of ``mergehub.merge`` in a child process per merge, the methods (and code trees) alternated,
and the ratios TIES/TA and DARE-TIES/TA per repeat. With several code trees (``--code
NAME=PATH``, e.g. the commit before a change checked out with ``git worktree add``), each
method's outputs are also compared across them byte for byte.

The inputs are ``bench_merge.py``'s synthetic Llama-style bf16 base and 4 fine-tunes (default
here: 4 layers, hidden 1536, intermediate 4096, vocab 32000: 211,564,032 parameters); the
recipes use its weights and density 0.2 (TIES: normalize, lambda 1; DARE-TIES: lambda 1;
task arithmetic: lambda 0.5; with ``--methods``, breadcrumbs: as task arithmetic, with gamma
0.01), dtype float32, out_dtype bfloat16. CPU seconds are the child's
``getrusage`` user + system time around the merge call (imports outside); the child first
sets malloc as ``hub`` does (:func:`mergehub.host_memory.keep_freed_memory`).
The page cache is warm after the first merge. On a shared machine the ratios of one repeat
(methods run back to back) are the useful figures.

    python benchmarks/bench_cpu_ratio.py --repeats 3
    python benchmarks/bench_cpu_ratio.py --code before=/tmp/before --code after=. --repeats 3
    python benchmarks/bench_cpu_ratio.py --methods ties breadcrumbs --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge as bm  # noqa: E402

METHODS = ("task_arithmetic", "ties", "dare_ties")
#: methods ``--methods`` may add (task arithmetic always runs: the ratios' baseline)
MORE = ("breadcrumbs",)

CHILD = r"""
import resource, sys, time
from mergehub.merge.engine import merge
try:  # what `hub` does first (a code tree from before it existed: nothing)
    from mergehub.host_memory import keep_freed_memory
    keep_freed_memory()
except ImportError:
    pass
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
merge(sys.argv[1], sys.argv[2], overwrite=True, progress=False)
wall = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
print("RESULT", wall, cpu)
"""


def recipe(method: str, paths: dict[str, Path]) -> str:
    lines = [f"merge_method: {method}", f"base_model: {paths['base']}", "models:"]
    for i, w in enumerate(bm.WEIGHTS, 1):
        lines += [f"  - model: {paths[f'ft{i}']}", "    parameters:", f"      weight: {w}"]
        if method != "task_arithmetic":
            lines.append(f"      density: {bm.DENSITY}")
        if method == "breadcrumbs":
            lines.append(f"      gamma: {bm.GAMMA}")
    lines.append("parameters:")
    lines += {"ties": ["  normalize: true", "  lambda: 1.0"], "dare_ties": ["  lambda: 1.0"],
              "task_arithmetic": ["  normalize: false", "  lambda: 0.5"],
              "breadcrumbs": ["  normalize: false", "  lambda: 0.5"]}[method]
    lines += ["dtype: float32", "out_dtype: bfloat16"]
    return "\n".join(lines) + "\n"


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bm.shape_args(ap, layers=4, hidden=1536, intermediate=4096, vocab=32000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--code", action="append", default=[],
                    help="NAME=PATH of a source tree to run (default: this checkout)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the models go (kept and reused if given)")
    ap.add_argument("--methods", nargs="+", choices=METHODS + MORE, default=list(METHODS),
                    help="methods to time (task_arithmetic is always added: the baseline; "
                         "breadcrumbs: as task arithmetic, density 0.2, gamma 0.01)")
    args = ap.parse_args()
    methods = ["task_arithmetic"] + [m for m in args.methods if m != "task_arithmetic"]
    root = Path(__file__).resolve().parent.parent
    codes = [c.split("=", 1) for c in args.code] or [["this", str(root)]]
    codes = [(name, str(Path(path).resolve())) for name, path in codes]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-cpu-ratio-"))
    dims = (args.layers, args.hidden, args.intermediate, args.vocab)
    specs = bm.llama_specs(*dims, "BF16")
    models = work / "models"
    if not (models / f"ft{bm.N_FINETUNES}").exists():
        bm.write_models(models, specs, bm.config_json(*dims, "bfloat16"), "bf16", "2GB")
    paths = {name: models / name for name in ["base"] + [f"ft{i}" for i in range(1, 5)]}
    print(f"{sum(s.nbytes for s in specs) // 2:,} parameters bf16, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the start; codes: "
          + ", ".join(f"{n}={p}" for n, p in codes))
    runs = [(code, m) for code in codes for m in methods]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    digests: dict[tuple[str, str], str] = {}
    for r in range(args.repeats):
        for (name, path), m in runs if r % 2 == 0 else runs[::-1]:
            rp = work / f"{m}.yaml"
            rp.write_text(recipe(m, paths))
            out = work / f"out-{name}-{m}"
            env = {**os.environ, "PYTHONPATH": path}
            done = subprocess.run([sys.executable, "-c", CHILD, str(rp), str(out)], cwd=path,
                                  env=env, capture_output=True, text=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT")]
            if done.returncode or not line:
                sys.exit(f"{name} {m} failed:\n{done.stderr[-3000:]}")
            wall, cpu = map(float, line[0].split()[1:])
            times.setdefault((name, m), []).append((wall, cpu))
            digests[(name, m)] = digest(out)
            print(f"repeat {r} {name} {m}: wall {wall:.2f} s, CPU {cpu:.2f} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    for name, _ in codes:
        ta = times[(name, "task_arithmetic")]
        for m in methods[1:]:
            v = times[(name, m)]
            print(f"{name} {m}/task_arithmetic: wall "
                  + ", ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(v, ta)) + "; CPU "
                  + ", ".join(f"{a[1] / b[1]:.2f}" for a, b in zip(v, ta)))
    if len(codes) > 1:
        for m in methods:
            same = len({digests[(name, m)] for name, _ in codes}) == 1
            print(f"{m}: outputs of {', '.join(n for n, _ in codes)} "
                  f"{'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
