#!/usr/bin/env python
"""Live composition (``mergehub.load`` + ``Composer``) against ``hub merge`` + ``from_pretrained``,
PEFT's weighted adapters and the bytes floor, all in one run on the same inputs (issue 14).

What it builds (under a temp dir, deleted at the end; random init, no downloads): a Llama-style
bf16 model (default 16 layers, hidden 2048, intermediate 5632, vocab 32000: 953M parameters,
`bench_merge.llama_specs`), 4 full fine-tunes (every weight + N(0, (0.05·0.02)²), computed in
float32 on the benchmark's device, rounded to bf16), stored losslessly against the base, and
compressed copies (ft1, ft2 with ``bit1``, ft3, ft4 with ``compeft`` density 0.1); and 4 LoRA
adapters (r 16, q_proj and v_proj, random A and B) stored against the base.

Rows, on ``--device`` (each: seconds, the bytes floor and the ratio to it, peak device memory
and peak host memory during the row):

* ``load``: ``mergehub.load("base", store, device=...)``;
* ``apply`` of task arithmetic (K=2) and TIES (K=2, 4) over the lossless fine-tunes, and TIES
  K=4 over the compressed copies (bit1, bit1, compeft, compeft), each ``cold`` (a new Composer:
  empty delta cache, store blobs in the page cache; twice, as the first of a process also
  compiles the Triton kernels of that recipe on CUDA) and ``warm`` (the same recipe again after
  ``reset``, every input in the delta cache; twice, as the first also compiles the kernel that
  merges many tensors in one launch; the second is the same recipe onto the same cached
  inputs, which launches the first one's recorded merges again), each followed by ``reset``;
  and warm with other weights (a recipe not applied before: planned and prepared anew);
* (a) PEFT: the 4 LoRAs loaded with ``PeftModel.from_pretrained`` / ``load_adapter``, then
  ``add_weighted_adapter(combination_type="ties", density=0.5)`` and ``merge_adapter`` (timed
  together), against ``apply`` of TIES (density 0.5) over the same stored LoRAs; and PEFT's
  ``cat`` (exact sum of the adapters) + merge against ``apply`` of task arithmetic: the
  difference of the merged weights from ours is printed (TIES: PEFT trims the factors A and B,
  we the dense deltas B·A·s; task arithmetic: PEFT adds the bf16-rounded delta to the bf16
  weight, we round θ0 + Σ τ once);
* (b) ``hub merge -o`` of the TIES K=4 compressed recipe on the same device (in-process), then
  ``from_pretrained`` of its output onto the device; and the time to write that output alone
  (a copy of the dir + sync), for "hub merge minus its writing", and where ``/dev/shm`` exists
  the same merge onto it (tmpfs: its writing is a memory copy), which times that directly;
* (c) the bytes floor: the bytes of the tensors an operation must read and write (apply: the
  base, the K inputs as the cache holds them (the decoded bf16 tensors) and the result;
  reset: the saved base and the result; load: the model's bytes) at the device's copy
  bandwidth, measured in the same run by a device-to-device copy (load: at the host-to-device
  copy bandwidth from pinned memory, on CUDA).

Peak device memory: ``torch.cuda.max_memory_allocated`` during the row (the model and the cache
included); peak host memory: the process's sampled peak RssAnon during the row.

    python benchmarks/bench_compose.py --device cuda            # ~1B, on the GPU machine
    python benchmarks/bench_compose.py --device cpu              # ~1B on CPU (quiet machine)
    python benchmarks/bench_compose.py --device cpu --layers 2 --hidden 256 --intermediate 512 \\
        --vocab 1000                                             # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_merge as bm  # noqa: E402  (the model's tensor names and config, the RSS sampler)

import mergehub  # noqa: E402
from mergehub.storage.store import Store  # noqa: E402
from mergehub.storage.writer import write_model_dir  # noqa: E402

LORA_TARGETS = ("q_proj", "v_proj")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a large copy on ``device`` (median of 5)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[1:])


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second from pinned host memory to ``device`` (median of 5)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:])


class Row:
    """Times a block, with the peaks of device and host memory during it."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Row":
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sampler = bm.Sampler(os.getpid(), interval=0.02)
        self.sampler.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        self.sampler.stop.set()
        self.sampler.join()
        self.host_mib = self.sampler.anon / 1024
        self.device_mib = (torch.cuda.max_memory_allocated(self.device) / 2**20
                           if self.device.type == "cuda" else float("nan"))


def build(work: Path, args: argparse.Namespace, device: torch.device) -> tuple[Store, int]:
    """The base, fine-tunes, compressed copies and LoRAs, stored; returns the store and the
    model's parameter count."""
    specs = bm.llama_specs(args.layers, args.hidden, args.intermediate, args.vocab, "BF16")
    config = bm.config_json(args.layers, args.hidden, args.intermediate, args.vocab, "bfloat16")
    gen = torch.Generator(device=device)

    def base(spec):
        gen.manual_seed(hash(spec.name) % 2**31)
        if spec.name.endswith("norm.weight"):
            return torch.ones(spec.shape, dtype=torch.bfloat16)
        w = torch.randn(spec.shape, generator=gen, device=device).mul_(0.02)
        return w.to(torch.bfloat16).cpu()

    def finetune(i):
        def make(spec):
            b = base(spec).to(device).float()
            gen.manual_seed((hash(spec.name) + 7919 * i) % 2**31)
            noise = torch.randn(spec.shape, generator=gen, device=device).mul_(0.05 * 0.02)
            return (b + noise).to(torch.bfloat16).cpu()
        return make

    store = Store.init(work / "store")
    t0 = time.perf_counter()
    paths = {}
    for name, get in [("base", base)] + [(f"ft{i}", finetune(i)) for i in range(1, 5)]:
        paths[name] = write_model_dir(work / name, specs, get, side_files={"config.json": config},
                                      progress=False)
    log(f"wrote 5 models ({time.perf_counter() - t0:.0f} s)")
    store.add(paths["base"], "base", progress=False)

    def in_own_store(job):  # a Store per thread (sqlite connections are per thread)
        with Store(store.root) as own:
            job(own)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(in_own_store, [lambda s, i=i: s.add(paths[f"ft{i}"], f"ft{i}", base="base",
                                                         progress=False) for i in range(1, 5)]))
        log(f"stored base and 4 fine-tunes ({time.perf_counter() - t0:.0f} s)")
        jobs = [(1, "bit1", {}), (2, "bit1", {}), (3, "compeft", {"density": 0.1}),
                (4, "compeft", {"density": 0.1})]
        list(pool.map(in_own_store, [lambda s, j=j: s.compress(f"ft{j[0]}", j[1], j[2],
                                                               progress=False) for j in jobs]))
    log(f"compressed ft1, ft2 with bit1 and ft3, ft4 with compeft "
        f"({time.perf_counter() - t0:.0f} s)")
    for path in paths.values():
        shutil.rmtree(path)
    from safetensors.torch import save_file

    for i in range(1, 5):
        adapter = work / f"lora{i}"
        adapter.mkdir()
        tensors = {}
        gen.manual_seed(1000 + i)
        for layer in range(args.layers):
            for module in LORA_TARGETS:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{prefix}.lora_A.weight"] = (torch.randn(
                    (args.rank, args.hidden), generator=gen, device=device) / args.hidden ** 0.5
                ).to(torch.bfloat16).cpu()
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn(
                    (args.hidden, args.rank), generator=gen, device=device) * 0.002
                ).to(torch.bfloat16).cpu()
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank,
            "target_modules": list(LORA_TARGETS), "base_model_name_or_path": None,
            "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none"}))
        store.add(adapter, f"lora{i}", base="base", progress=False)
    log(f"stored 4 LoRAs ({time.perf_counter() - t0:.0f} s)")
    return store, sum(s.nbytes for s in specs) // 2


def recipe(method: str, inputs: list[str], density: float | None = None) -> str:
    lines = [f"merge_method: {method}", "base_model: base", "models:"]
    for ref in inputs:
        params = "{weight: 1.0" + (f", density: {density}" if density else "") + "}"
        lines += [f"  - model: {ref}", f"    parameters: {params}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bm.shape_args(ap, layers=16, hidden=2048, intermediate=5632, vocab=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma-separated row groups to skip: "
                    "peft, hubmerge, dense")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--wait-for", type=Path, help="before timing anything, wait until this file "
                    "exists (lets other work share the machine only during the setup)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-compose-"))
    rows: list[dict] = []
    try:
        run(work, args, device, skip, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


def run(work: Path, args: argparse.Namespace, device: torch.device, skip: set[str],
        rows: list[dict]) -> None:
    store, params = build(work, args, device)
    nbytes = 2 * params
    while args.wait_for and not args.wait_for.exists():
        time.sleep(1)
    bw = copy_bandwidth(device)
    load_bw = h2d_bandwidth(device) if device.type == "cuda" else bw
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{os.cpu_count()} CPUs"
    print(f"# bench_compose: {params:,} params bf16 ({args.layers} layers, hidden {args.hidden}, "
          f"intermediate {args.intermediate}, vocab {args.vocab}); device {name}; torch "
          f"{torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)"
          + (f", host-to-device {load_bw / 1e9:.1f} GB/s" if device.type == "cuda" else ""))

    def report(label: str, row: Row, floor_bytes: int | None, bandwidth: float = bw,
               note: str = "") -> None:
        floor = floor_bytes / bandwidth if floor_bytes else None
        entry = {"row": label, "seconds": row.seconds, "floor_seconds": floor,
                 "device_peak_mib": row.device_mib, "host_peak_mib": row.host_mib, "note": note}
        rows.append(entry)
        ratio = f"{row.seconds / floor:8.1f}x" if floor else f"{'-':>9s}"
        print(f"{label:44s} {row.seconds:9.3f} {floor if floor else float('nan'):9.4f} {ratio} "
              f"{row.device_mib:10.0f} {row.host_mib:10.0f}  {note}", flush=True)

    print(f"{'row':44s} {'seconds':>9s} {'floor s':>9s} {'vs floor':>9s} {'dev MiB':>10s} "
          f"{'host MiB':>10s}")
    import transformers

    transformers.LlamaForCausalLM  # noqa: B018 - import the class's module before timing load
    with Row(device) as row:
        model = mergehub.load("base", store, device=device)
    report("load", row, nbytes, load_bw)

    cases = [("task_arithmetic K=2", recipe("task_arithmetic", ["ft1", "ft2"]), 2),
             ("ties K=2", recipe("ties", ["ft1", "ft2"], 0.3), 2),
             ("ties K=4", recipe("ties", ["ft1", "ft2", "ft3", "ft4"], 0.3), 4)]
    if "dense" in skip:
        cases = []
    compressed = recipe("ties", ["ft1-bit1", "ft2-bit1", "ft3-compeft", "ft4-compeft"], 0.3)
    cases.append(("ties K=4 compressed (bit1, compeft)", compressed, 4))
    for label, text, k in cases:
        guarded(f"apply {label}", apply_rows, model, text, k, label, nbytes, report)
    if "hubmerge" not in skip:
        guarded("(b)", hub_merge_rows, work, store, model, compressed, device, report)
    if "peft" not in skip:
        guarded("(a)", peft_rows, work, store, model, device, report)


def guarded(label: str, fn, *args) -> None:
    """Run one group of rows; a failure is printed and the next group runs."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - a benchmark reports and goes on
        import traceback

        print(f"{label}: FAILED: {traceback.format_exc().strip().splitlines()[-1]}", flush=True)
        traceback.print_exc()


def apply_rows(model, text: str, k: int, label: str, nbytes: int, report) -> None:
    """Cold and warm apply of one recipe, then reset."""
    device = model.device
    floor = (2 + k) * nbytes
    for first in (True, False):  # the first cold apply of a process also compiles kernels
        composer = mergehub.Composer(model)
        with Row(device) as row:
            composer.apply(text)
        report(f"apply {label}, cold{' (1st)' if first else ''}", row, floor,
               note="includes compiling the kernels (Triton)" if first and device.type == "cuda"
               else "")
        composer.reset()
    for first in (True, False):  # the first warm apply also compiles the batched kernel
        with Row(device) as row:
            active = composer.apply(text)
        report(f"apply {label}, warm{' (1st)' if first else ''}", row, floor,
               note=f"cache {composer.cache.bytes / 2**30:.1f} GiB"
               + ("; includes compiling the batched kernel (Triton)"
                  if first and device.type == "cuda" else ""))
        assert active.rewritten == active.tensors
        with Row(device) as row:
            composer.reset()
        report("reset", row, 2 * nbytes)
    other = text.replace("weight: 1.0", "weight: 0.9")  # a recipe not applied before
    with Row(device) as row:
        composer.apply(other)
    report(f"apply {label}, warm, other weights", row, floor,
           note="planned and prepared anew (no recorded launches)")
    composer.reset()
    del composer


def hub_merge_rows(work: Path, store: Store, model, compressed: str, device: torch.device,
                   report) -> None:
    """(b): hub merge -o, then from_pretrained of its output, on the same device."""
    out = work / "hub-merge-out"
    with Row(device) as merge_row:
        mergehub.merge(compressed, out=out, store=store, device=str(device), progress=False,
                       echo=lambda line: None)
    report("(b) hub merge -o, ties K=4 compressed", merge_row, None)
    with Row(device) as row:
        merged = transformers_model(out, device)
    report("(b) from_pretrained of its output", row, None)
    print(f"    (b) together: {merge_row.seconds + row.seconds:.3f} s")
    os.sync()
    t0 = time.perf_counter()
    shutil.copytree(out, work / "hub-merge-copy")
    os.sync()
    written = time.perf_counter() - t0
    shutil.rmtree(work / "hub-merge-copy")
    print(f"    writing its output alone (copy of the dir + sync): {written:.3f} s; hub merge "
          f"minus that: {merge_row.seconds - written:.3f} s")
    if Path("/dev/shm").is_dir():  # writing onto tmpfs is a memory copy: timed, not subtracted
        with Row(device) as row:
            mergehub.merge(compressed, out="/dev/shm/bench-compose-out", store=store,
                           device=str(device), progress=False, echo=lambda line: None,
                           overwrite=True)
        shutil.rmtree("/dev/shm/bench-compose-out")
        report("(b) hub merge -o onto tmpfs (minus its writing)", row, None)
    composer = mergehub.Composer(model)
    composer.apply(compressed)
    ours, theirs = model.state_dict(), merged.state_dict()
    same = all(torch.equal(ours[n], theirs[n]) for n in theirs)
    print(f"    composed weights {'==' if same else '!='} hub merge's output, bit for bit")
    composer.reset()
    del merged, composer
    shutil.rmtree(out)


def transformers_model(path: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)


def peft_rows(work: Path, store: Store, model, device: torch.device, report) -> None:
    """(a): PEFT's weighted adapters + merge against apply over the same stored LoRAs."""
    from peft import PeftModel

    loras = [f"lora{i}" for i in range(1, 5)]
    for combination, method, density in (("ties", "ties", 0.5), ("cat", "task_arithmetic", None)):
        composer = mergehub.Composer(model)
        text = recipe(method, loras, density)
        with Row(device) as row:
            composer.apply(text)
        report(f"apply {method} K=4 LoRA, cold", row, None)
        composer.reset()
        with Row(device) as row:
            composer.apply(text)
        report(f"apply {method} K=4 LoRA, warm", row, None)
        ours = {n: t.clone() for n, t in model.state_dict().items()}
        composer.reset()
        base = model.state_dict()
        delta = max(float((t.float() - base[n].float()).abs().max()) for n, t in ours.items()
                    if t.is_floating_point())
        del composer, base

        plain = mergehub.load("base", store, device=device)
        dirs = [store.export(name, work / f"export-{name}", progress=False) for name in loras]
        peft_model = PeftModel.from_pretrained(plain, dirs[0], adapter_name=loras[0])
        for name, path in zip(loras[1:], dirs[1:]):
            peft_model.load_adapter(path, adapter_name=name)
        with Row(device) as row:
            kwargs = {"density": density} if density else {}
            peft_model.add_weighted_adapter(loras, [1.0] * 4, "merged",
                                            combination_type=combination, **kwargs)
            peft_model.set_adapter("merged")
            peft_model.merge_adapter()
        report(f"(a) PEFT add_weighted_adapter({combination}) + merge", row, None)
        theirs = {n.removeprefix("base_model.model.").replace(".base_layer", ""): t
                  for n, t in peft_model.state_dict().items() if "lora_" not in n}
        diffs, changed, total = [], 0, 0
        for name, t in ours.items():
            other = theirs[name]
            if t.is_floating_point():
                d = (t.float() - other.float()).abs()
                changed += int((d > 0).sum())
                total += t.numel()
                diffs.append(float(d.max()))
        print(f"    PEFT {combination} vs our {method}: {changed:,} of {total:,} weights differ, "
              f"max |diff| {max(diffs):.3g} (our largest |merged - base| {delta:.3g})")
        del peft_model, plain, dirs, ours
        for name in loras:
            shutil.rmtree(work / f"export-{name}", ignore_errors=True)


if __name__ == "__main__":
    main()
