#!/usr/bin/env python
"""Benchmark of mergehub's merge against mergekit 0.1.5: time, peak RSS, I/O floor, outputs.

What it builds (no transformers, no downloads): a Llama-style bf16 model written with
:func:`mergehub.storage.writer.write_model_dir`, one tensor at a time, and 4 fine-tune-like
variants of it. Default size: hidden 2048, intermediate 5632, 16 layers, vocab 32000, 32 heads
(MHA, no GQA), untied embed_tokens/lm_head: per layer q/k/v/o (2048x2048), gate/up (5632x2048),
down (2048x5632) and two RMSNorm weights (2048); plus embed_tokens and lm_head (32000x2048) and
the final norm: 953,223,168 parameters in 147 tensors, 1.91 GB of bf16 per model (one
``model.safetensors`` with the default ``--shard-size`` 2GB). ``config.json`` is a
LlamaForCausalLM config that transformers (and hence mergekit) can parse.

Weights (the base): ``N(0, 0.02)`` in bf16; RMSNorm weights 1.0. Every tensor comes from a
``torch.Generator`` seeded from a hash of (model tag, tensor name), so it can be re-created on
its own and generation memory stays at about one tensor.

Fine-tune ``i`` (i = 1..4), every tensor changed: in float32,
``w + N(0, 1) * 0.05 * s + sparse``, cast to bf16, where ``s`` is the std of the base tensor
(0.02 for the RMSNorm weights, whose std is 0) and ``sparse`` puts ``±10 * s`` (random signs)
on ``max(1, round(0.005 * n))`` random entries (drawn with replacement): small dense noise,
like a short fine-tune, plus a few large changes. (On the RMSNorm weights, 1.0 in bf16 has a
spacing of 2**-7, so the dense noise mostly rounds away there and only the sparse entries
change.)

Recipes (mergekit YAML, the same file given to both tools, written into the work dir):

* ``ties``: base_model + the 4 fine-tunes with weights 1, 0.5, 0.75, 1 and density 0.2;
  normalize true, lambda 1.0; ``dtype: float32`` (mergekit computes in fp32, as mergehub
  always does), ``out_dtype: bfloat16``;
* ``task_arithmetic``: the same models and weights, normalize false, lambda 0.5, same dtypes;
* ``breadcrumbs`` (``--methods``): as task arithmetic, with density 0.2 and gamma 0.01 per
  model; ``dare_ties``: as ``ties`` (its random drops differ between the tools: their outputs
  are compared for the record only).

For each recipe both tools run as child processes (``mergekit-yaml RECIPE OUT --no-cuda
--no-copy-tokenizer --quiet`` from ``--mergekit``, and ``hub merge RECIPE -o OUT``), each under
``/usr/bin/time -v`` when it exists (else ``os.wait4``): wall time, user + system CPU, and peak
RSS (``ru_maxrss``; it counts file pages a process has memory-mapped, e.g. safetensors inputs,
as well as its own memory). A sampler also reads the child's ``/proc/PID/status`` every 0.1 s
for the peak of ``RssAnon`` (private memory) and ``RssFile`` (mapped file pages) separately.
``os.sync()`` runs before each child, and the ``os.sync()`` right after it is timed and shown:
mergehub fsyncs its output before it returns, mergekit does not, so "wall + sync" is the fair
comparison of the two. The order of the two tools alternates between recipes (and between
repeats, ``--repeats``).

Page cache: nothing is dropped from it (that needs root and disturbs other users of the
machine); instead every input byte is read once before anything is timed (the models have also
just been written), so both tools and the I/O floor see a warm page cache.

I/O floor (same run, same warm cache): the time to read every input file once (base + 4
fine-tunes, 64 MB ``readinto`` chunks into one reused buffer; best of 2 passes), and the time to
write the output bytes (a copy of one merge output with ``shutil.copyfile``, then ``fsync``).

Outputs: for each recipe the two outputs are compared tensor by tensor (``safe_open``, in
float32): max abs difference, max relative difference ``|a - b| / max(|b|, tiny)``, the number
of differing elements and the worst tensor. TIES outputs of bf16 inputs can differ legitimately
(see ``TIES_NOTE``): for TIES the differences are also split into those at "tie positions"
(an element where some task vector's |delta| equals that tensor's trim threshold while more
than k entries reach it) and the others. The comparison is repeated on a small float32 model
(``--fp32-check``, on by default, at most 2 layers / hidden 512 / intermediate 1408 / vocab
4000) with float32 output, where ties at the trim threshold are rare, to check the "equal
within 1e-6 relative" target. The CLI start-up time of each tool (``hub --version``,
``mergekit-yaml --help``: mostly imports) is measured too, as context for small models.

Run (repository root; at full size ~15.3 GB of scratch disk at the peak: 9.5 GB of inputs, the
two 1.9 GB outputs of one recipe and one 1.9 GB copy; estimated ~20 min on 2 cores, most of it
mergekit's TIES)::

    python benchmarks/bench_merge.py                                   # full size
    python benchmarks/bench_merge.py --layers 2 --hidden 256 --intermediate 512 --vocab 1000

``--ray`` (no mergekit needed; ``pip install 'mergehub[ray]'``) instead measures the overhead of
``hub merge --ray`` on the same inputs and machine: for each recipe, ``hub merge`` in one
process, then the same merge on a local Ray instance started with 1 and with 2 worker CPUs
(``ray.init(num_cpus=N)`` in the child, timed apart), all with the output in ``--ray-shards``
shards (``--max-shard-size`` of the output size over that, so that the tasks have shards to
share), each output checked byte for byte against the single process's. One machine, so a
check of overhead, not of speed-up. From the rows it prints an estimate of the wall time of a
4-input 405B merge on N machines (:func:`estimate_405b`) for ``--disk-gbps`` and
``--net-gbps``::

    python benchmarks/bench_merge.py --ray --methods ties,task_arithmetic

With ``--device cuda`` the single process merges on one GPU and each Ray task on a GPU of its
own (``--ray-workers 1 2``: local Ray instances of 1 and 2 GPUs; the models are drawn on the
GPU, which is faster and draws other numbers than the CPU)::

    python benchmarks/bench_merge.py --ray --device cuda --methods ties,task_arithmetic
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from mergehub.storage.safetensors_format import TensorSpec
from mergehub.storage.writer import write_model_dir

MB = 1_000_000
N_FINETUNES = 4
WEIGHTS = (1.0, 0.5, 0.75, 1.0)
DENSITY = 0.2
GAMMA = 0.01  # breadcrumbs: the share of largest magnitudes dropped
#: the recipes this benchmark can run, and those of them that sparsify (density per model)
METHODS = ("ties", "task_arithmetic", "linear", "breadcrumbs", "dare_ties")
SPARSE = ("ties", "breadcrumbs", "dare_ties")
DENSE_REL = 0.05  # dense noise std, relative to the tensor's std
SPARSE_FRAC = 0.005  # fraction of entries with a large change
SPARSE_REL = 10.0  # size of a large change, relative to the tensor's std
NORM_STD = 0.02  # reference scale for RMSNorm weights (their own std is 0)
CHUNK = 64 << 20
TIME_BIN = "/usr/bin/time"
TIES_NOTE = (
    "Why TIES outputs may differ: both tools keep the k = int(density * n) largest |delta| of "
    "each task vector per tensor, but mergehub keeps every entry tied with the k-th largest "
    "(the TIES paper's rule, deterministic everywhere) while mergekit keeps exactly k, chosen "
    "among tied entries by torch's unstable CPU argsort order. Deltas of bf16 weights take few "
    "distinct values, so many entries tie at the threshold: at those positions one tool keeps "
    "a delta the other drops, which also changes the sign election and the divisor there. "
    "Task arithmetic has no trim, so it should match exactly. The float32 check below has "
    "(almost) no ties.")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the synthetic models -----------------------------------------------------------------------

def shape_args(ap: argparse.ArgumentParser, layers: int, hidden: int, intermediate: int,
               vocab: int, heads: int | None = None, kv_heads: int | None = None) -> None:
    """The options of a Llama-style model's shape, with this benchmark's defaults (the
    benchmarks that build such models share them)."""
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--intermediate", type=int, default=intermediate)
    ap.add_argument("--vocab", type=int, default=vocab)
    if heads is not None:
        ap.add_argument("--heads", type=int, default=heads)
        ap.add_argument("--kv-heads", type=int, default=kv_heads)


def llama_specs(layers: int, hidden: int, inter: int, vocab: int, dtype: str) -> list[TensorSpec]:
    """Tensor names and shapes of a Llama-style causal LM (MHA, untied embeddings)."""
    specs = [TensorSpec("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        specs += [TensorSpec(p + f"self_attn.{m}.weight", dtype, (hidden, hidden))
                  for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        specs += [TensorSpec(p + "mlp.gate_proj.weight", dtype, (inter, hidden)),
                  TensorSpec(p + "mlp.up_proj.weight", dtype, (inter, hidden)),
                  TensorSpec(p + "mlp.down_proj.weight", dtype, (hidden, inter)),
                  TensorSpec(p + "input_layernorm.weight", dtype, (hidden,)),
                  TensorSpec(p + "post_attention_layernorm.weight", dtype, (hidden,))]
    specs += [TensorSpec("model.norm.weight", dtype, (hidden,)),
              TensorSpec("lm_head.weight", dtype, (vocab, hidden))]
    return specs


def config_json(layers: int, hidden: int, inter: int, vocab: int, dtype: str) -> bytes:
    heads = max(1, hidden // 64)
    return json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": dtype,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
        "tie_word_embeddings": False}, indent=2).encode() + b"\n"


def generator(tag: str, name: str, device: str = "cpu") -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(f"{tag}:{name}".encode()).digest()[:8], "little")
    return torch.Generator(device).manual_seed(seed & (2**63 - 1))


def base_f32(spec: TensorSpec, tag: str, device: str = "cpu") -> torch.Tensor:
    """The base's tensor, drawn on ``device`` (another device draws other numbers)."""
    if spec.name.endswith("norm.weight"):
        return torch.ones(spec.shape, device=device)
    return torch.randn(spec.shape, generator=generator(tag, spec.name, device),
                       device=device).mul_(0.02)


def finetune_f32(base: torch.Tensor, spec: TensorSpec, tag: str) -> torch.Tensor:
    """``base + dense noise + sparse large changes`` in float32 (see the module docstring),
    drawn on ``base``'s device."""
    dev = base.device
    gen = generator(tag, spec.name, str(dev))
    s = NORM_STD if spec.name.endswith("norm.weight") else float(base.std())
    out = base + torch.randn(base.shape, generator=gen, device=dev).mul_(DENSE_REL * s)
    flat = out.view(-1)
    k = max(1, round(SPARSE_FRAC * flat.numel()))
    idx = torch.randint(flat.numel(), (k,), generator=gen, device=dev)
    signs = torch.randint(0, 2, (k,), generator=gen, device=dev).float().mul_(2).sub_(1)
    flat.index_add_(0, idx, signs.mul_(SPARSE_REL * s))
    return out


def write_models(root: Path, specs: list[TensorSpec], config: bytes, tag: str,
                 shard_size: str, device: str = "cpu") -> dict[str, Path]:
    """Write the base and the fine-tunes under ``root``; bf16 or fp32 as ``specs`` say; the
    numbers drawn on ``device`` (a GPU draws a large model's in seconds; other numbers than
    the CPU's, so compare only runs that drew on the same kind of device)."""
    fp32 = specs[0].dtype == "F32"
    side = {"config.json": config}

    def base_tensor(spec: TensorSpec) -> torch.Tensor:
        w = base_f32(spec, f"{tag}-base", device)
        return (w if fp32 else w.to(torch.bfloat16)).cpu()

    def ft_tensor(i: int, spec: TensorSpec) -> torch.Tensor:
        base = base_f32(spec, f"{tag}-base", device)
        base = base if fp32 else base.to(torch.bfloat16).float()
        w = finetune_f32(base, spec, f"{tag}-ft{i}")
        return (w if fp32 else w.to(torch.bfloat16)).cpu()

    paths = {}
    for i in range(N_FINETUNES + 1):
        name = "base" if i == 0 else f"ft{i}"
        log(f"writing {tag} {name}")
        get = base_tensor if i == 0 else (lambda s, i=i: ft_tensor(i, s))
        paths[name] = write_model_dir(root / name, specs, get, max_shard_size=shard_size,
                                      side_files=side, progress=False)
    return paths


def recipe_text(method: str, paths: dict[str, Path], out_dtype: str | None) -> str:
    """The recipe given to both tools. ``linear`` averages the 4 fine-tunes (normalized) and
    names no base_model: mergekit would otherwise average the base in too (and require a
    weight for it)."""
    lines = [f"merge_method: {method}"]
    if method != "linear":
        lines.append(f"base_model: {paths['base']}")
    lines.append("models:")
    for i, w in enumerate(WEIGHTS, 1):
        lines += [f"  - model: {paths[f'ft{i}']}", "    parameters:", f"      weight: {w}"]
        if method in SPARSE:
            lines.append(f"      density: {DENSITY}")
        if method == "breadcrumbs":
            lines.append(f"      gamma: {GAMMA}")
    lines.append("parameters:")
    lines += (["  normalize: true", "  lambda: 1.0"] if method in ("ties", "dare_ties") else
              ["  normalize: true"] if method == "linear" else
              ["  normalize: false", "  lambda: 0.5"])
    lines.append("dtype: float32")
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    return "\n".join(lines) + "\n"


# --- measuring a child process ------------------------------------------------------------------

@dataclass
class ChildRun:
    tool: str
    method: str
    repeat: int
    wall: float = 0.0
    sync: float = 0.0
    cpu: float = 0.0
    maxrss_kb: int = 0
    anon_kb: int = 0  # sampled peak of RssAnon
    file_kb: int = 0  # sampled peak of RssFile
    rc: int = 0
    log: Path | None = None
    out: Path | None = None
    order: int = 0


def _ppid_map() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
                out[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _status_kb(pid: int) -> dict[str, int]:
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    vals[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return vals


class Sampler(threading.Thread):
    """Peaks of RssAnon / RssFile of ``pid`` and its descendants (max over processes)."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.anon = self.file = 0

    def run(self) -> None:
        pids, last_scan = {self.pid}, 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now - last_scan > 1.0:  # rescan the process tree once a second
                ppid = _ppid_map()
                frontier = {self.pid}
                pids = set(frontier)
                while frontier:
                    frontier = {p for p, pp in ppid.items() if pp in frontier} - pids
                    pids |= frontier
                last_scan = now
            for p in pids:
                st = _status_kb(p)
                self.anon = max(self.anon, st.get("RssAnon", 0))
                self.file = max(self.file, st.get("RssFile", 0))
            self.stop.wait(self.interval)


def run_child(run: ChildRun, cmd: list[str], log_path: Path) -> ChildRun:
    os.sync()
    use_time = os.access(TIME_BIN, os.X_OK)
    time_out = log_path.with_suffix(".time")
    full = [TIME_BIN, "-v", "-o", str(time_out)] + cmd if use_time else cmd
    run.log = log_path
    with open(log_path, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=logf, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        run.wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    t0 = time.perf_counter()
    os.sync()
    run.sync = time.perf_counter() - t0
    run.anon_kb, run.file_kb = sampler.anon, sampler.file
    run.rc = proc.returncode
    if use_time and time_out.is_file():
        text = time_out.read_text()
        grab = lambda key: re.search(rf"{re.escape(key)}: *([\d.]+)", text)  # noqa: E731
        m = grab("Maximum resident set size (kbytes)")
        run.maxrss_kb = int(m.group(1)) if m else 0
        u, s = grab("User time (seconds)"), grab("System time (seconds)")
        run.cpu = (float(u.group(1)) if u else 0.0) + (float(s.group(1)) if s else 0.0)
        m = grab("Exit status")
        if m and run.rc == 0:
            run.rc = int(m.group(1))
    else:  # no /usr/bin/time: the child's own rusage from wait4
        run.maxrss_kb = usage.ru_maxrss
        run.cpu = usage.ru_utime + usage.ru_stime
    return run


def hub_command() -> list[str]:
    exe = Path(sys.executable).parent / "hub"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'hub'; "
            "from mergehub.hub.cli import main; main()"]


def merge_commands(mergekit: Path, recipe: Path, out: Path) -> dict[str, list[str]]:
    return {"mergekit": [str(mergekit), str(recipe), str(out), "--no-cuda",
                         "--no-copy-tokenizer", "--quiet"],
            "mergehub": hub_command() + ["merge", str(recipe), "-o", str(out)]}


def run_pair(method: str, recipe: Path, outdir: Path, logs: Path, mergekit: Path, repeat: int,
             mergekit_first: bool) -> list[ChildRun]:
    order = ["mergekit", "mergehub"] if mergekit_first else ["mergehub", "mergekit"]
    runs = []
    for pos, tool in enumerate(order):
        out = outdir / f"{method}-{tool}-r{repeat}"
        cmds = merge_commands(mergekit, recipe, out)
        log(f"{method}: {tool} (run {repeat + 1}, {'first' if pos == 0 else 'second'})")
        r = run_child(ChildRun(tool, method, repeat, order=pos), cmds[tool],
                      logs / f"{method}-{tool}-r{repeat}.log")
        r.out = out
        if r.rc != 0:
            tail = r.log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"{tool} failed on {method} (exit {r.rc}); log {r.log}:\n{tail}")
        log(f"  {r.wall:.1f} s (+{r.sync:.1f} s sync), peak RSS {r.maxrss_kb / 1024:.0f} MiB")
        runs.append(r)
    return runs


# --- I/O floor --------------------------------------------------------------------------------

def data_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors")


def read_all(files: list[Path], buf: bytearray) -> int:
    view = memoryview(buf)
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def write_floor(src_dir: Path, dest: Path) -> tuple[int, float, float]:
    """Copy the data files of ``src_dir`` to ``dest``: bytes, copy seconds, fsync seconds."""
    dest.mkdir(parents=True)
    os.sync()
    nbytes, t_copy, t_sync = 0, 0.0, 0.0
    for p in data_files(src_dir):
        t0 = time.perf_counter()
        shutil.copyfile(p, dest / p.name)
        t1 = time.perf_counter()
        fd = os.open(dest / p.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        t_copy, t_sync = t_copy + t1 - t0, t_sync + time.perf_counter() - t1
        nbytes += p.stat().st_size
    shutil.rmtree(dest)
    return nbytes, t_copy, t_sync


# --- output comparison ----------------------------------------------------------------------------

@dataclass
class Diff:
    tensors: int = 0
    elements: int = 0
    differing: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: str = "-"
    worst_count: int = 0
    max_delta: float = 0.0  # max |mergekit output - base|, for scale
    problems: list[str] = field(default_factory=list)
    tie_checked: bool = False
    tie_positions: int = 0  # elements where some task vector ties at its trim threshold
    outside: int = 0  # differing elements that are not tie positions
    outside_abs: float = 0.0
    outside_rel: float = 0.0


def _index(path: Path) -> dict[str, Path]:
    out = {}
    for p in data_files(path):
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                out[k] = p
    return out


def tie_positions(base: torch.Tensor, fts: list[torch.Tensor], density: float) -> torch.Tensor:
    """Elements where some task vector's |delta| equals its trim threshold (the k-th largest)
    while more than k entries reach it: where "keep all tied" and "keep exactly k" can differ."""
    mask = torch.zeros(base.shape, dtype=torch.bool)
    for ft in fts:
        mag = (ft - base).abs_()
        flat = mag.reshape(-1)
        k = max(1, int(density * flat.numel()))
        if density >= 1 or k >= flat.numel():
            continue
        thr = torch.kthvalue(flat, flat.numel() - k + 1).values
        if int((flat >= thr).sum()) > k:
            mask |= mag == thr
    return mask


def compare_outputs(ours: Path, theirs: Path, base: Path,
                    ties: tuple[list[Path], float] | None = None) -> Diff:
    """mergehub output ``ours`` vs mergekit output ``theirs``, tensor by tensor, in float32.

    With ``ties`` (the fine-tune dirs and the density of a TIES recipe), differences are also
    split into those at tie positions (see :func:`tie_positions`) and the others.
    """
    a_idx, b_idx, base_idx = _index(ours), _index(theirs), _index(base)
    ft_idx = [_index(p) for p in ties[0]] if ties else []
    d = Diff(tie_checked=ties is not None)
    for name in sorted(set(a_idx) ^ set(b_idx)):
        d.problems.append(f"{name} only in {'mergehub' if name in a_idx else 'mergekit'}")
    tiny = torch.finfo(torch.float32).tiny

    def get(idx: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(str(idx[name]), framework="pt") as f:
            return f.get_tensor(name)

    for name in sorted(set(a_idx) & set(b_idx)):
        ta, tb = get(a_idx, name), get(b_idx, name)
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            d.problems.append(f"{name}: mergehub {ta.dtype} {tuple(ta.shape)}, mergekit "
                              f"{tb.dtype} {tuple(tb.shape)}")
            continue
        a, b = ta.float(), tb.float()
        differs = a != b
        n_diff = int(differs.sum())
        diff = (a - b).abs_()
        rel = diff / b.abs().clamp_min(tiny)
        d.tensors += 1
        d.elements += a.numel()
        d.differing += n_diff
        if n_diff:
            d.max_abs = max(d.max_abs, float(diff.max()))
            d.max_rel = max(d.max_rel, float(rel.max()))
        if n_diff > d.worst_count:
            d.worst, d.worst_count = name, n_diff
        c = get(base_idx, name).float()
        d.max_delta = max(d.max_delta, float((b - c).abs().max()) if b.numel() else 0.0)
        if ties:
            tie = tie_positions(c, [get(i, name).float() for i in ft_idx], ties[1])
            d.tie_positions += int(tie.sum())
            out = differs & ~tie
            n_out = int(out.sum())
            if n_out:
                d.outside += n_out
                d.outside_abs = max(d.outside_abs, float(diff[out].max()))
                d.outside_rel = max(d.outside_rel, float(rel[out].max()))
    return d


def print_diff(label: str, d: Diff) -> None:
    frac = d.differing / max(d.elements, 1)
    print(f"{label}: {d.tensors} tensors, {d.elements:,} elements; differing {d.differing:,} "
          f"({frac:.4%}); max abs diff {d.max_abs:.3g}, max rel diff {d.max_rel:.3g} "
          f"(largest |merged - base| is {d.max_delta:.3g})")
    if d.differing:
        print(f"  worst tensor: {d.worst} ({d.worst_count:,} differing elements)")
    if d.tie_checked:
        print(f"  tie positions (some task vector's |delta| equals its trim threshold, which "
              f"more than k entries reach): {d.tie_positions:,} elements; differing elements "
              f"outside them: {d.outside:,} (max abs diff {d.outside_abs:.3g}, max rel diff "
              f"{d.outside_rel:.3g})")
    for p in d.problems:
        print(f"  PROBLEM: {p}")


# --- Ray overhead (--ray) -------------------------------------------------------------------------

#: the child that merges on a local Ray instance of N workers (CPUs, or GPUs with device
#: cuda: one task per GPU): ray.init timed apart
RAY_CHILD = """
import os, sys, time
import ray
import mergehub
recipe, out, shard, n, device = sys.argv[1:6]
t0 = time.perf_counter()
if device == "cuda":
    ray.init(num_cpus=os.cpu_count(), num_gpus=int(n), include_dashboard=False,
             logging_level="ERROR")
else:
    ray.init(num_cpus=int(n), include_dashboard=False, logging_level="ERROR")
print(f"ray.init {time.perf_counter() - t0:.3f} s", flush=True)
t0 = time.perf_counter()
mergehub.merge(recipe, out, max_shard_size=int(shard), executor="ray", progress=False,
               device=device)
print(f"merge {time.perf_counter() - t0:.3f} s", flush=True)
"""

#: a 4-input merge of a 405B model: base + 4 inputs read, one model written (bf16)
PARAMS_405B = 405_000_000_000


def estimate_405b(rate: float, workers: int, machines: int, disk: float, net: float,
                  fixed: float) -> tuple[float, str]:
    """Seconds for a 4-input 405B bf16 merge on ``machines`` machines of ``workers`` worker
    CPUs each, and what bounds it. Each machine merges 1/N of the output's shards: it reads
    its share of the 5 inputs (base + 4) and writes its share of the output, through its own
    disk (``disk`` bytes/s, reads and writes together) and its network link (``net`` bytes/s:
    inputs on shared storage or the Hub, the output to shared storage), and computes at
    ``rate`` output bytes/s per worker CPU (measured: the 1-worker Ray row). ``fixed``: start
    and plan (measured). The three overlap (streamed), so the slowest sets the time; the
    shared storage's own total bandwidth is assumed not to bind (it must serve
    N x net)."""
    out = 2 * PARAMS_405B
    moved = out * (N_FINETUNES + 1) + out  # read 5 models, write 1
    bounds = {"compute": out / (rate * workers * machines),
              "disk": moved / (disk * machines), "network": moved / (net * machines)}
    which = max(bounds, key=bounds.get)
    return fixed + bounds[which], which


def run_ray(args: argparse.Namespace, work: Path, methods: list[str]) -> None:
    """The --ray rows (see the module docstring)."""
    import ray  # noqa: F401  (fails here, before the models are written, if Ray is missing)

    from mergehub.hub.demo import dir_digests

    dims = (args.layers, args.hidden, args.intermediate, args.vocab)
    specs = llama_specs(*dims, "BF16")
    n_params = sum(s.nbytes for s in specs) // 2
    gpus = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name()}" \
        if args.device == "cuda" else ""
    print(f"mergehub --ray overhead: Llama-style, {n_params:,} params bf16, {len(specs)} tensors; "
          f"base + {N_FINETUNES} fine-tunes; torch {torch.__version__}, ray {ray.__version__}, "
          f"{os.cpu_count()} CPUs{gpus}; device {args.device}; load average "
          f"{os.getloadavg()[0]:.2f}; work dir {work}")
    t0 = time.perf_counter()
    paths = write_models(work / "models", specs, config_json(*dims, "bfloat16"), "bf16",
                         args.shard_size, args.device)
    files = [f for p in paths.values() for f in data_files(p)]
    in_bytes = sum(f.stat().st_size for f in files)
    out_bytes = sum(s.nbytes for s in specs)
    shard = -(-out_bytes // args.ray_shards)
    print(f"generated 5 models in {time.perf_counter() - t0:.0f} s: {in_bytes / 1e9:.3f} GB of "
          f"input; output {out_bytes / 1e9:.3f} GB in {args.ray_shards} shards of <= {shard:,} "
          "bytes (--max-shard-size)")
    read_all(files, bytearray(CHUNK))  # warm the page cache, as for the mergekit rows
    logs = work / "logs"
    logs.mkdir()
    rows = []
    for m in methods:
        recipe = work / f"{m}.yaml"
        recipe.write_text(recipe_text(m, paths, "bfloat16"))
        single = work / f"{m}-single"
        unit = "GPU" if args.device == "cuda" else "worker"
        cmds = [("single process", 0, hub_command() + ["merge", str(recipe), "-o", str(single),
                                                       "--max-shard-size", str(shard),
                                                       "--device", args.device])]
        cmds += [(f"ray, {n} {unit}{'s' * (n > 1)}", n,
                  [sys.executable, "-c", RAY_CHILD, str(recipe), str(work / f"{m}-ray{n}"),
                   str(shard), str(n), args.device]) for n in args.ray_workers]
        for label, n, cmd in cmds:
            for r in range(args.repeats):
                log(f"{m}: {label} (run {r + 1})")
                x = run_child(ChildRun(label, m, r), cmd, logs / f"{m}-{n}-r{r}.log")
                if x.rc != 0:
                    raise SystemExit(f"{label} failed on {m} (exit {x.rc}); log {x.log}:\n"
                                     f"{x.log.read_text(errors='replace')[-3000:]}")
                text = x.log.read_text()
                init = re.search(r"ray.init ([\d.]+) s", text)
                merge_s = re.search(r"merge ([\d.]+) s", text)
                out = work / f"{m}-ray{n}" if n else single
                same = n == 0 or dir_digests(out) == dir_digests(single)
                rows.append((m, label, n, r, x, float(init.group(1)) if init else 0.0,
                             float(merge_s.group(1)) if merge_s else x.wall, same))
                if n:
                    shutil.rmtree(out)
        shutil.rmtree(single)
    print(f"\n## hub merge --ray against one process ({n_params:,} params, output "
          f"{out_bytes / 1e9:.2f} GB in {args.ray_shards} shards; wall = the child process, "
          "+sync = with the os.sync() after it; ray.init and merge = inside the Ray child; "
          "anon MiB = peak RssAnon of its largest process (the driver or one Ray worker); "
          "same = output identical to the single process's)")
    print(f"{'method':16s} {'how':18s} {'run':>3s} {'wall s':>7s} {'+sync s':>7s} "
          f"{'ray.init s':>10s} {'merge s':>8s} {'GB/s out':>8s} {'anon MiB':>8s} same")
    for m, label, n, r, x, init, merge_s, same in rows:
        print(f"{m:16s} {label:18s} {r + 1:>3d} {x.wall:7.2f} {x.wall + x.sync:7.2f} "
              f"{init:10.2f} {merge_s:8.2f} {out_bytes / merge_s / 1e9:8.3f} "
              f"{x.anon_kb / 1024:8.0f} {'yes' if same else 'NO'}")
    if not all(row[-1] for row in rows):
        raise SystemExit("a Ray output differs from the single-process output")
    if args.device != "cpu" or 1 not in args.ray_workers:
        return  # the estimate below scales the 1-worker CPU rate
    print(f"\n## Estimate: a 4-input merge of a 405B model (bf16: {2 * PARAMS_405B / 1e12:.2f} "
          f"TB per model; {2 * PARAMS_405B * (N_FINETUNES + 1) / 1e12:.2f} TB read, "
          f"{2 * PARAMS_405B / 1e12:.2f} TB written) on N machines of {args.workers_per_machine} "
          f"worker CPUs, disk {args.disk_gbps} GB/s and network {args.net_gbps} GB/s each "
          "(see estimate_405b); the compute rate per worker is the best 1-worker Ray row's "
          "(its merge time includes the workers' start), the fixed cost its ray.init")
    for m in methods:
        one = [row for row in rows if row[0] == m and row[2] == 1]
        rate = max(out_bytes / row[6] for row in one)  # best run: the least disturbed
        fixed = min(row[5] for row in one)
        cells = []
        for machines in (1, 2, 4, 8, 16, 32, 64):
            secs, bound = estimate_405b(rate, args.workers_per_machine, machines,
                                        args.disk_gbps * 1e9, args.net_gbps * 1e9, fixed)
            cells.append(f"N={machines}: {secs / 3600:.2f} h ({bound})")
        print(f"{m} ({rate / 1e6:.0f} MB/s of output per worker): " + "; ".join(cells))


# --- the benchmark ------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shape_args(ap, layers=16, hidden=2048, intermediate=5632, vocab=32000)
    ap.add_argument("--shard-size", default="2GB", help="shard size of the inputs (default 2GB)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each tool per recipe (order alternates; default 1)")
    ap.add_argument("--methods", default="ties,task_arithmetic,linear",
                    help="comma-separated recipes to run, of " + ",".join(METHODS)
                    + " (default: ties,task_arithmetic,linear)")
    ap.add_argument("--fp32-check", action=argparse.BooleanOptionalAction, default=True,
                    help="also compare TIES (and task arithmetic) on a small float32 model")
    ap.add_argument("--mergekit", type=Path, default=Path("/tmp/mkvenv/bin/mergekit-yaml"),
                    help="mergekit-yaml executable (its own venv; never a mergehub dependency)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch dir (default: a new temp dir under /tmp); must be empty or "
                         "absent")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (models, outputs)")
    ap.add_argument("--ray", action="store_true",
                    help="measure hub merge --ray with 1 and 2 local workers against one process "
                         "instead of comparing with mergekit (see the module docstring)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="--ray: where every merge runs (cuda: the single process on one GPU, "
                         "each Ray task on a GPU of its own; default cpu)")
    ap.add_argument("--ray-workers", type=int, nargs="+", default=[1, 2],
                    help="--ray: local Ray instances of these many worker CPUs (GPUs with "
                         "--device cuda) (default: 1 2)")
    ap.add_argument("--ray-shards", type=int, default=8,
                    help="--ray: shards of the output, the tasks' units (default 8)")
    ap.add_argument("--workers-per-machine", type=int, default=32,
                    help="--ray estimate: worker CPUs per machine (default 32)")
    ap.add_argument("--disk-gbps", type=float, default=2.0,
                    help="--ray estimate: disk GB/s per machine, reads and writes (default 2)")
    ap.add_argument("--net-gbps", type=float, default=3.125,
                    help="--ray estimate: network GB/s per machine (default 3.125: 25 Gbit/s)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not set(methods) <= set(METHODS):
        ap.error(f"--methods: some of {', '.join(METHODS)}")
    if not args.ray and not os.access(args.mergekit, os.X_OK):
        ap.error(f"--mergekit {args.mergekit}: not an executable (install mergekit in its own "
                 "venv, e.g. python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit)")
    t_start = time.perf_counter()
    if args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir="/tmp"))
    else:
        work = args.workdir.absolute()
        if work.exists() and any(work.iterdir()):
            ap.error(f"--workdir {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
    try:
        (run_ray if args.ray else run)(args, work, methods)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s; peak RSS of this script "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def run(args: argparse.Namespace, work: Path, methods: list[str]) -> None:
    dims = (args.layers, args.hidden, args.intermediate, args.vocab)
    specs = llama_specs(*dims, "BF16")
    n_params = sum(s.nbytes for s in specs) // 2
    mk_version = subprocess.run([str(args.mergekit.parent / "python"), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip() or "?"
    print(f"mergehub vs mergekit merge benchmark: Llama-style, {n_params:,} params bf16, "
          f"{args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab "
          f"{args.vocab}, {len(specs)} tensors; base + {N_FINETUNES} fine-tunes (dense noise "
          f"{DENSE_REL} std + {SPARSE_FRAC:.1%} entries at +-{SPARSE_REL:g} std); torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs; mergekit {mk_version} "
          f"({args.mergekit}); work dir {work}")
    timer = TIME_BIN + " -v" if os.access(TIME_BIN, os.X_OK) else "os.wait4"
    print(f"peak RSS measured with {timer} (ru_maxrss, includes mapped file pages); "
          "RssAnon/RssFile peaks sampled every 0.1 s")

    t0 = time.perf_counter()
    paths = write_models(work / "models", specs, config_json(*dims, "bfloat16"), "bf16",
                         args.shard_size, args.device)
    files = [f for p in paths.values() for f in data_files(p)]
    in_bytes = sum(f.stat().st_size for f in files)
    print(f"generated 5 models in {time.perf_counter() - t0:.0f} s: "
          f"{in_bytes / len(paths) / 1e9:.3f} GB each, {in_bytes / 1e9:.3f} GB of input in all")

    recipes = {}
    for m in methods:
        recipes[m] = work / f"{m}.yaml"
        recipes[m].write_text(recipe_text(m, paths, "bfloat16"))
        print(f"\n--- recipe {recipes[m].name} (given to both tools) ---\n"
              f"{recipes[m].read_text()}", end="")

    # --- CLI start-up ----------------------------------------------------------------------------
    logs = work / "logs"
    logs.mkdir()
    startup = {}
    for tool, cmd in (("mergehub", hub_command() + ["--version"]),
                      ("mergekit", [str(args.mergekit), "--help"])):
        startup[tool] = run_child(ChildRun(tool, "startup", 0), cmd, logs / f"startup-{tool}.log")
    print("\nCLI start-up (imports; `hub --version`, `mergekit-yaml --help`): " + ", ".join(
        f"{t} {r.wall:.2f} s, peak RSS {r.maxrss_kb / 1024:.0f} MiB" for t, r in startup.items()))

    # --- warm-up + read floor -------------------------------------------------------------------
    buf = bytearray(CHUNK)
    log("warm-up read of all inputs")
    t0 = time.perf_counter()
    read_all(files, buf)
    t_warm = time.perf_counter() - t0
    reads = []
    for _ in range(2):
        t0 = time.perf_counter()
        read_all(files, buf)
        reads.append(time.perf_counter() - t0)
    t_read = min(reads)
    print(f"\nI/O floor: read all {in_bytes / 1e9:.3f} GB of input (64 MB chunks): warm-up "
          f"{t_warm:.2f} s, then {reads[0]:.2f} s and {reads[1]:.2f} s -> floor {t_read:.2f} s "
          f"({in_bytes / t_read / MB:.0f} MB/s; page cache warm)")

    outdir = work / "out"
    outdir.mkdir()
    all_runs: list[ChildRun] = []
    diffs: dict[str, Diff] = {}
    wfloor = None
    for mi, m in enumerate(methods):
        for r in range(args.repeats):
            runs = run_pair(m, recipes[m], outdir, logs, args.mergekit, r,
                            mergekit_first=(mi + r) % 2 == 0)
            all_runs += runs
            if wfloor is None:
                hub_out = next(x.out for x in runs if x.tool == "mergehub")
                log("write floor: copying one merge output")
                wfloor = write_floor(hub_out, work / "copy")
            if r > 0:
                for x in runs:
                    shutil.rmtree(x.out, ignore_errors=True)
        first = {x.tool: x.out for x in all_runs if x.method == m and x.repeat == 0}
        log(f"{m}: comparing outputs")
        ft_dirs = [paths[f"ft{i}"] for i in range(1, N_FINETUNES + 1)]
        diffs[m] = compare_outputs(first["mergehub"], first["mergekit"], paths["base"],
                                   (ft_dirs, DENSITY) if m == "ties" else None)
        if not args.keep:
            for p in first.values():
                shutil.rmtree(p, ignore_errors=True)
    out_bytes, t_copy, t_fsync = wfloor
    t_write = t_copy + t_fsync
    print(f"I/O floor: write {out_bytes / 1e9:.3f} GB (copy of one merge output): copy "
          f"{t_copy:.2f} s + fsync {t_fsync:.2f} s = {t_write:.2f} s "
          f"({out_bytes / t_write / MB:.0f} MB/s)")
    floor_rw = t_read + t_write

    # --- fp32 check -----------------------------------------------------------------------------
    fp32_diffs = {}
    if args.fp32_check:
        fdims = (min(args.layers, 2), min(args.hidden, 512), min(args.intermediate, 1408),
                 min(args.vocab, 4000))
        fspecs = llama_specs(*fdims, "F32")
        fparams = sum(s.nbytes for s in fspecs) // 4
        fpaths = write_models(work / "models-fp32", fspecs, config_json(*fdims, "float32"),
                              "fp32", args.shard_size)
        print(f"\n--- float32 check: {fdims[0]} layers, hidden {fdims[1]}, intermediate "
              f"{fdims[2]}, vocab {fdims[3]}: {fparams:,} params, float32 inputs, same noise "
              "model, same recipes with dtype float32 and no out_dtype (float32 output) ---")
        for m in methods:
            rp = work / f"{m}-fp32.yaml"
            rp.write_text(recipe_text(m, fpaths, None))
            fr = run_pair(f"{m}-fp32", rp, outdir, logs, args.mergekit, 0, mergekit_first=True)
            out = {x.tool: x.out for x in fr}
            ft_dirs = [fpaths[f"ft{i}"] for i in range(1, N_FINETUNES + 1)]
            fp32_diffs[m] = compare_outputs(out["mergehub"], out["mergekit"], fpaths["base"],
                                            (ft_dirs, DENSITY) if m == "ties" else None)

    # --- report ---------------------------------------------------------------------------------
    mk = {(x.method, x.repeat): x for x in all_runs if x.tool == "mergekit"}
    print(f"\n## Results ({n_params:,} params; input {in_bytes / 1e9:.2f} GB, output "
          f"{out_bytes / 1e9:.2f} GB; read floor {t_read:.2f} s, read + write floor "
          f"{floor_rw:.2f} s; MiB = 2^20 bytes)")
    print("'wall' is the child process alone; '+sync' adds the os.sync() right after it "
          "(mergehub fsyncs its output itself, mergekit does not). Ratios: time of mergekit / "
          "time of the tool (>1: faster than mergekit) on wall+sync; RSS of the tool / RSS of "
          "mergekit; wall+sync / read floor; wall+sync / (read + write floor).")
    head = (f"{'method':16s} {'tool':9s} {'run':>3s} {'wall s':>7s} {'+sync s':>7s} "
            f"{'CPU s':>7s} {'peak RSS MiB':>12s} {'anon MiB':>8s} {'file MiB':>8s} "
            f"{'speedup':>7s} {'RSS ratio':>9s} {'/read':>6s} {'/r+w':>6s}")
    print(head)
    for x in sorted(all_runs, key=lambda x: (methods.index(x.method), x.repeat, x.tool)):
        ref = mk[(x.method, x.repeat)]
        tot, ref_tot = x.wall + x.sync, ref.wall + ref.sync
        print(f"{x.method:16s} {x.tool:9s} {x.repeat + 1:>3d} {x.wall:7.2f} {tot:7.2f} "
              f"{x.cpu:7.2f} {x.maxrss_kb / 1024:12.0f} {x.anon_kb / 1024:8.0f} "
              f"{x.file_kb / 1024:8.0f} {ref_tot / tot:6.2f}x {x.maxrss_kb / ref.maxrss_kb:8.2f}x "
              f"{tot / t_read:6.2f} {tot / floor_rw:6.2f}")
    order = ", ".join(f"{m} run {r + 1}: " + ("mergekit first" if (mi + r) % 2 == 0 else
                                              "mergehub first")
                      for mi, m in enumerate(methods) for r in range(args.repeats))
    print(f"order: {order}")

    print("\n## Outputs: mergehub vs mergekit (a = mergehub, b = mergekit; rel = |a-b| / "
          "max(|b|, tiny); bf16 outputs, so one bf16 step is a relative difference of up to "
          "2^-8 = 0.0039)")
    for m in methods:
        print_diff(f"{m} (bf16 inputs, bf16 output)", diffs[m])
    if "ties" in methods:
        print(TIES_NOTE)
    for m, d in fp32_diffs.items():
        print_diff(f"{m} (fp32 inputs, fp32 output)", d)

    print("\n## Targets")
    hub = [x for x in all_runs if x.tool == "mergehub"]
    for m in methods:
        for x in (y for y in hub if y.method == m):
            ref = mk[(m, x.repeat)]
            tot, ref_tot = x.wall + x.sync, ref.wall + ref.sync
            speed = ref_tot / tot
            print(f"{m} run {x.repeat + 1}: faster than mergekit (target 3x): {speed:.2f}x "
                  f"({'met' if speed >= 3 else 'faster, below 3x' if speed > 1 else 'NOT met'}); "
                  f"peak RSS < 2 GB: {x.maxrss_kb * 1024 / 1e9:.2f} GB "
                  f"({'met' if x.maxrss_kb * 1024 < 2e9 else 'NOT met'}); within 1.5x of the "
                  f"read floor: {tot / t_read:.2f}x ({'met' if tot / t_read <= 1.5 else 'NOT met'}"
                  f"; {tot / floor_rw:.2f}x of read + write floor)")
    for m, d in fp32_diffs.items():
        extra = ""
        if d.tie_checked:
            extra = (f"; outside the {d.tie_positions:,} tie positions: max rel diff "
                     f"{d.outside_rel:.3g} "
                     f"({'met' if d.outside_rel <= 1e-6 and not d.problems else 'NOT met'})")
        print(f"{m} fp32 outputs equal within 1e-6 relative: max rel diff {d.max_rel:.3g} "
              f"({'met' if d.max_rel <= 1e-6 and not d.problems else 'NOT met'}){extra}")
    for m, d in diffs.items():
        extra = (f"; {d.outside:,} of them outside tie positions" if d.tie_checked else "")
        print(f"{m} bf16 outputs identical: {d.differing:,} differing elements "
              f"({'yes' if d.differing == 0 and not d.problems else 'no'}){extra}")


if __name__ == "__main__":
    main()
