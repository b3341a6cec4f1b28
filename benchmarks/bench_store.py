#!/usr/bin/env python
"""Benchmark of the mergehub store: add / export throughput and bytes on disk (issue 2).

What it builds (no transformers, no downloads): a Llama-like bf16 model written with
:func:`mergehub.storage.writer.write_model_dir`, one tensor at a time, and 3 fine-tunes of it.
By default hidden 1024, intermediate 2816, vocab 32000, 34 layers: per layer q/k/v/o
(1024x1024), gate/up (2816x1024), down (1024x2816) and two RMSNorm weights (1024); plus
embed_tokens and lm_head (32000x1024) and the final norm: 502,338,560 parameters, ~1.0 GB of
bf16, sharded at ``--shard-size`` (500MB). A ``config.json`` is kept beside the shards.

Weights are ``N(0, 0.02)`` (RMSNorm weights are 1.0), drawn from a ``torch.Generator`` seeded
from the tensor's name, so every tensor can be re-created on its own and memory stays at about
one tensor.

Perturbation model of fine-tune ``i`` (i = 1, 2, 3):

* perturbed: the 7 weight matrices (q/k/v/o/gate/up/down) of every other layer -- the odd
  layers for odd ``i``, the even layers for even ``i`` -- plus ``embed_tokens`` for odd ``i`` or
  ``lm_head`` for even ``i``. That is about half of the weight bytes (17 of 34 layers and one
  of the two 32000x1024 matrices at full size). Each perturbed tensor becomes
  ``bf16(w + N(0, 1) * std(w) * rel)``, computed in float32, with the noise drawn from a
  generator seeded from ``(i, tensor name)`` and ``rel`` = ``--rel`` (0.05 by default), meant
  to resemble a short full fine-tune (an update of ~5% of the weights' spread);
* unchanged, bit for bit: every other tensor (the other layers, the other embedding matrix, all
  RMSNorm weights -- their std is 0, so the formula above would leave them unchanged anyway).

Fine-tunes 1 and 3 perturb the same tensors with different noise.

Measured in one run, on the same disk, page cache warm for every phase (the models were just
written, so copy and add both read them from memory); ``os.sync()`` runs before each timed phase:

(a) ``shutil.copytree`` of each model dir followed by ``os.sync()``: the reference throughput.
    add and export fsync what they write, and copytree alone only measures how fast the kernel
    takes dirty pages (from ~300 MB/s to ~1.5 GB/s on the test VM), so the sync is counted;
    the copytree time alone is printed too. The base is copied once more after the exports, to
    show how much the disk drifted during the run;
(b) ``Store.add`` of the base, then of each fine-tune with ``base="base"`` (add fsyncs every
    blob it writes);
(c) ``Store.export`` of the base and of fine-tune 1 (export fsyncs the dir it writes), each
    checked bit-exact against its source with :func:`mergehub.hub.demo.dir_digests`.

Throughput is MB/s with MB = 10**6 bytes: copy over the model's file bytes, add and export over
``ModelInfo.logical_bytes`` (the same bytes: every tensor, header and side file).

Then an encoding comparison on 3 tensors of the base and fine-tune 1 (an attention weight, an MLP
weight, the embedding): the codec as the store uses it, and alternatives computed here with
numpy + zstandard level 1 (plain zstd of the raw bytes, byte planes + zstd, XOR of the bit
patterns against the base + byte planes + zstd).

Run (about 1 GB per model, ~9 GB of disk at peak in the work dir)::

    python benchmarks/bench_store.py                       # full size
    python benchmarks/bench_store.py --layers 2 --vocab 4000   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

from mergehub.hub.demo import dir_digests
from mergehub.storage.checkpoint import open_checkpoint
from mergehub.storage.blob_format import sha256, unpack_blob
from mergehub.storage.codec import encode_lossless
from mergehub.storage.lossy_blobs import decode_blob
from mergehub.storage.safetensors_format import TensorSpec
from mergehub.storage.store import Store
from mergehub.storage.writer import write_model_dir

import bench_merge as bm  # the model-shape options (benchmarks/ is on the path of a script)

MB = 1_000_000
N_FINETUNES = 3
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


# --- the synthetic model ------------------------------------------------------------------------

def llama_specs(layers: int, hidden: int, inter: int, vocab: int) -> list[TensorSpec]:
    """Tensor names and shapes of a Llama-style causal LM (untied embeddings), state-dict order."""
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for l in range(layers):
        p = f"model.layers.{l}."
        specs += [TensorSpec(p + f"self_attn.{m}.weight", "BF16", (hidden, hidden))
                  for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        specs += [TensorSpec(p + "mlp.gate_proj.weight", "BF16", (inter, hidden)),
                  TensorSpec(p + "mlp.up_proj.weight", "BF16", (inter, hidden)),
                  TensorSpec(p + "mlp.down_proj.weight", "BF16", (hidden, inter)),
                  TensorSpec(p + "input_layernorm.weight", "BF16", (hidden,)),
                  TensorSpec(p + "post_attention_layernorm.weight", "BF16", (hidden,))]
    specs += [TensorSpec("model.norm.weight", "BF16", (hidden,)),
              TensorSpec("lm_head.weight", "BF16", (vocab, hidden))]
    return specs


def generator(tag: str, name: str) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(f"{tag}:{name}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(seed & (2**63 - 1))


def base_tensor(spec: TensorSpec) -> torch.Tensor:
    if spec.name.endswith("norm.weight"):
        return torch.ones(spec.shape, dtype=torch.bfloat16)
    w = torch.randn(spec.shape, generator=generator("base", spec.name))
    return w.mul_(0.02).to(torch.bfloat16)


def is_perturbed(i: int, name: str) -> bool:
    """Whether fine-tune ``i`` changes tensor ``name`` (see the module docstring)."""
    if name.endswith("norm.weight"):
        return False
    m = _LAYER.match(name)
    if m:
        return int(m.group(1)) % 2 == i % 2
    return name == ("model.embed_tokens.weight" if i % 2 else "lm_head.weight")


def finetune_tensor(i: int, spec: TensorSpec, rel: float) -> torch.Tensor:
    w = base_tensor(spec)
    if not is_perturbed(i, spec.name):
        return w
    wf = w.float()
    noise = torch.randn(spec.shape, generator=generator(f"ft{i}", spec.name))
    return wf.add_(noise.mul_(wf.std() * rel)).to(torch.bfloat16)


def config_json(args: argparse.Namespace) -> bytes:
    return json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": args.hidden, "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers, "vocab_size": args.vocab,
        "num_attention_heads": max(1, args.hidden // 64),
        "num_key_value_heads": max(1, args.hidden // 64), "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False}, indent=2).encode() + b"\n"


# --- helpers ------------------------------------------------------------------------------------

def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def dir_blocks(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn):
    """``os.sync()``, then run ``fn``: its result, wall seconds and CPU seconds."""
    os.sync()
    t0, c0 = time.perf_counter(), cpu_s()
    result = fn()
    return result, time.perf_counter() - t0, cpu_s() - c0


def best_of(fn, k: int = 3) -> float:
    """Best wall time of ``k`` calls (the first call on a large array pays page faults)."""
    times = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def zstd1(data: bytes) -> int:
    return len(zstandard.ZstdCompressor(level=1).compress(data))


def byte_planes(u16: np.ndarray) -> bytes:
    return np.ascontiguousarray(u16.view(np.uint8).reshape(-1, 2).T).tobytes()


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


# --- the benchmark ------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bm.shape_args(ap, layers=34, hidden=1024, intermediate=2816, vocab=32000)
    ap.add_argument("--rel", type=float, default=0.05,
                    help="fine-tune perturbation, relative to each tensor's std (default 0.05)")
    ap.add_argument("--shard-size", default="500MB")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where models, copies, store and exports go (default: a new temp dir "
                         "under /tmp); must be empty or absent")
    ap.add_argument("--keep", action="store_true", help="keep the work dir at the end")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # keep stdout and the stderr log in order
    rss_start = rss_mb()
    if args.layers < 2:
        ap.error("--layers must be at least 2 (the fine-tunes perturb alternate layers)")

    t_start = time.perf_counter()
    if args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="bench-store-", dir="/tmp"))
    else:
        work = args.workdir.absolute()
        if work.exists() and any(work.iterdir()):
            ap.error(f"--workdir {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
    ours = [work / d for d in ("models", "copies", "store", "exports")]
    try:
        run(args, work, rss_start)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            for d in ours:
                shutil.rmtree(d, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s; peak RSS (ru_maxrss) "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} KiB = {rss_mb():.0f} MB",
          flush=True)


def run(args: argparse.Namespace, work: Path, rss_start: float) -> None:
    specs = llama_specs(args.layers, args.hidden, args.intermediate, args.vocab)
    n_params = sum(s.nbytes for s in specs) // 2
    names = ["base"] + [f"ft{i}" for i in range(1, N_FINETUNES + 1)]
    changed = {"base": len(specs)}
    changed_bytes = {"base": sum(s.nbytes for s in specs)}
    for i in range(1, N_FINETUNES + 1):
        sel = [s for s in specs if is_perturbed(i, s.name)]
        changed[f"ft{i}"], changed_bytes[f"ft{i}"] = len(sel), sum(s.nbytes for s in sel)
    print(f"mergehub store benchmark: {n_params:,} params bf16, {args.layers} layers, hidden "
          f"{args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, "
          f"{len(specs)} tensors, shards of {args.shard_size}; rel={args.rel}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; work dir {work}", flush=True)

    # --- generate ---------------------------------------------------------------------------
    models = work / "models"
    side = {"config.json": config_json(args)}
    paths: dict[str, Path] = {}
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        log(f"writing {name}")
        get = base_tensor if i == 0 else (lambda s, i=i: finetune_tensor(i, s, args.rel))
        paths[name] = write_model_dir(models / name, specs, get, max_shard_size=args.shard_size,
                                      side_files=side, progress=False)
    t_gen = time.perf_counter() - t0
    raw = {n: dir_bytes(p) for n, p in paths.items()}
    raw_total = sum(raw.values())
    shards = sorted(p.name for p in paths["base"].iterdir())
    print(f"generated 4 models in {t_gen:.0f} s: {human(raw['base'])} each ({len(shards)} files: "
          f"{', '.join(shards)}), {human(raw_total)} in all; peak RSS so far {rss_mb():.0f} MB",
          flush=True)

    rows: list[tuple[str, int, float, float]] = []  # (phase, bytes, wall s, CPU s)

    # --- (a) plain copy ------------------------------------------------------------------------
    copies = work / "copies"
    copies.mkdir()

    def copy_model(name: str, dest: Path) -> tuple[float, float, float]:
        """Wall seconds of ``copytree``, of the ``os.sync()`` after it, and CPU seconds of both."""
        _, t_copy, c_copy = timed(lambda: shutil.copytree(paths[name], dest))
        t0, c0 = time.perf_counter(), cpu_s()
        os.sync()
        return t_copy, time.perf_counter() - t0, c_copy + cpu_s() - c0

    copy_t, sync_t, copy_c = {}, {}, {}
    for name in names:
        log(f"copytree {name}")
        copy_t[name], sync_t[name], copy_c[name] = copy_model(name, copies / name)
        rows.append((f"copy {name} (copytree + os.sync)", raw[name],
                     copy_t[name] + sync_t[name], copy_c[name]))
    copy_all = sum(copy_t.values()) + sum(sync_t.values())
    copy_mbs = raw_total / copy_all / MB
    rows.append(("copy all 4 (copytree + os.sync)", raw_total, copy_all, sum(copy_c.values())))
    rows.append(("  the same, copytree time alone", raw_total, sum(copy_t.values()), float("nan")))
    shutil.rmtree(copies)

    # --- (b) add -------------------------------------------------------------------------------
    store_root = work / "store"
    infos = {}
    with Store.init(store_root) as store:
        for name in names:
            log(f"store.add {name}")
            base = None if name == "base" else "base"
            infos[name], t, c = timed(
                lambda: store.add(paths[name], name, base=base, progress=False))
            rows.append((f"add {name}" + (" (base=base)" if base else ""),
                         infos[name].logical_bytes, t, c))
        rss_after_add = rss_mb()

        # --- (c) export ------------------------------------------------------------------------
        exports = work / "exports"
        exported = {}
        for name in ("base", "ft1"):
            log(f"store.export {name}")
            exported[name], t, c = timed(
                lambda: store.export(name, exports / name, progress=False))
            rows.append((f"export {name}", infos[name].logical_bytes, t, c))
        rss_after_export = rss_mb()
        log("copytree base again (drift check)")
        t_copy, t_sync, c = copy_model("base", work / "copies" / "base")
        rows.append(("copy base again, after the exports", raw["base"], t_copy + t_sync, c))
        shutil.rmtree(work / "copies")
        for name, out in exported.items():
            log(f"checking export of {name} with dir_digests")
            assert dir_digests(out) == dir_digests(paths[name]), f"export of {name} differs"
        exact = "bit-exact (dir_digests equal) for: " + ", ".join(exported)

    blobs_dir = store_root / "blobs"
    blob_files = sum(1 for p in blobs_dir.rglob("*") if p.is_file())
    blobs_bytes, blobs_alloc = dir_bytes(blobs_dir), dir_blocks(blobs_dir)
    catalog = sum(p.stat().st_size for p in store_root.glob("catalog.sqlite*"))
    stored_sum = sum(i.stored_bytes for i in infos.values())

    # --- report --------------------------------------------------------------------------------
    print("\n## Throughput (MB = 10^6 bytes; page cache warm; 'vs copy' is relative to copy "
          f"all 4 (copytree + os.sync), {copy_mbs:.0f} MB/s)")
    print(f"{'phase':36s} {'bytes':>14s} {'seconds':>8s} {'CPU s':>6s} {'MB/s':>8s} "
          f"{'vs copy':>8s}")
    for phase, nbytes, secs, cpu in rows:
        mbs = nbytes / secs / MB
        cpu_text = "-" if cpu != cpu else f"{cpu:.2f}"
        print(f"{phase:36s} {nbytes:>14,d} {secs:8.2f} {cpu_text:>6s} {mbs:8.1f} "
              f"{mbs / copy_mbs:7.2f}x")
    print(f"exports: {exact}")

    print("\n## Size")
    print(f"{'model':6s} {'changed tensors':>16s} {'changed bytes':>14s} {'logical_bytes':>14s} "
          f"{'stored_bytes':>14s} {'stored/logical':>14s} {'saving':>7s}")
    for name in names:
        i = infos[name]
        print(f"{name:6s} {changed[name]:>7d} of {len(specs):<6d} "
              f"{changed_bytes[name] / raw[name]:13.1%} {i.logical_bytes:>14,d} "
              f"{i.stored_bytes:>14,d} {i.stored_bytes / i.logical_bytes:14.3f} {i.saving:7.1%}")
    print(f"raw bytes of the 4 model dirs:       {raw_total:>14,d}  ({human(raw_total)})")
    print(f"sum of ModelInfo.stored_bytes:       {stored_sum:>14,d}  ({human(stored_sum)})")
    print(f"store/blobs on disk ({blob_files} files):   {blobs_bytes:>14,d}  "
          f"({human(blobs_bytes)}; {human(blobs_alloc)} allocated)")
    print(f"catalog.sqlite (+wal):               {catalog:>14,d}")
    print(f"ratio store/raw: {blobs_bytes / raw_total:.3f} (blobs), "
          f"{(blobs_bytes + catalog) / raw_total:.3f} (blobs + catalog); "
          f"{raw_total / blobs_bytes:.2f}x smaller")

    encoding_comparison(paths)
    print(f"\npeak RSS: at start (python + torch + numpy imported) {rss_start:.0f} MB, after add "
          f"{rss_after_add:.0f} MB, after export {rss_after_export:.0f} MB "
          "(before the dir_digests check, which reads whole files)")


def encoding_comparison(paths: dict[str, Path]) -> None:
    """Codec as used vs plain zstd / byte planes / XOR, on 3 tensors of base and fine-tune 1."""
    base_ck, ft_ck = open_checkpoint(paths["base"]), open_checkpoint(paths["ft1"])
    layer = 1  # fine-tune 1 perturbs the odd layers and embed_tokens
    sample = [f"model.layers.{layer}.self_attn.q_proj.weight",
              f"model.layers.{layer}.mlp.down_proj.weight", "model.embed_tokens.weight"]
    print("\n## Encoding comparison (compressed size / raw size; zstd level 1 everywhere)")
    print("codec = encode_lossless as the store uses it: base without ref ('exp': exponent byte "
          "planes + sign/mantissa planes), ft1 with ref=base ('delta': zig-zag integer difference "
          "of bit patterns, byte planes); alternatives computed inline with numpy + zstandard")
    head = (f"{'tensor':44s} {'model':5s} {'codec':>12s} {'codec,no ref':>12s} {'zstd(raw)':>10s} "
            f"{'planes+zstd':>11s} {'xor+planes+zstd':>15s}")
    print(head)
    speed = {}
    for tname in sample:
        b_raw, f_raw = base_ck.read_bytes(tname), ft_ck.read_bytes(tname)
        n = len(b_raw)
        b16, f16 = np.frombuffer(b_raw, np.uint16), np.frombuffer(f_raw, np.uint16)
        b_sha, f_sha = sha256(b_raw), sha256(f_raw)
        b_blob = encode_lossless(b_raw, "BF16", b_sha)
        f_blob = encode_lossless(f_raw, "BF16", f_sha, ref=("0" * 64, b_raw))
        f_blob_noref = encode_lossless(f_raw, "BF16", f_sha)
        for blob, want, ref in ((b_blob, b_raw, None), (f_blob, f_raw, b_raw)):
            header, payload = unpack_blob(blob)
            assert decode_blob(header, payload, ref) == want, f"{tname}: codec not lossless"
        b_tr = unpack_blob(b_blob)[0].params["transform"]
        f_tr = unpack_blob(f_blob)[0].params["transform"]
        xor = zstd1(byte_planes(b16 ^ f16))
        same = np.count_nonzero(b16 == f16) / b16.size
        shape = "x".join(map(str, base_ck.tensors[tname].spec.shape))
        short = tname.replace("model.", "")
        print(f"{short + ' ' + shape:44s} {'base':5s} {len(b_blob) / n:6.3f} {b_tr:>5s} "
              f"{len(b_blob) / n:12.3f} {zstd1(b_raw) / n:10.3f} "
              f"{zstd1(byte_planes(b16)) / n:11.3f} {'-':>15s}")
        print(f"{'  (' + f'{same:.1%} of ft1 values equal to base)':44s} {'ft1':5s} "
              f"{len(f_blob) / n:6.3f} {f_tr:>5s} {len(f_blob_noref) / n:12.3f} "
              f"{zstd1(f_raw) / n:10.3f} {zstd1(byte_planes(f16)) / n:11.3f} {xor / n:15.3f}")
        if tname == "model.embed_tokens.weight":
            header, payload = unpack_blob(f_blob)
            speed_n = n
            speed = {
                "sha256": best_of(lambda: sha256(b_raw)),
                "zstd-1 of raw": best_of(lambda: zstd1(b_raw)),
                "encode exp (base)": best_of(lambda: encode_lossless(b_raw, "BF16", b_sha)),
                "encode delta (ft1)": best_of(
                    lambda: encode_lossless(f_raw, "BF16", f_sha, ref=("0" * 64, b_raw))),
                "decode delta (ft1)": best_of(lambda: decode_blob(header, payload, b_raw))}
    print(f"single-thread speed on embed_tokens ({human(speed_n)}, best of 3): " + ", ".join(
        f"{k} {speed_n / v / MB:.0f} MB/s" for k, v in speed.items()))


if __name__ == "__main__":
    main()
