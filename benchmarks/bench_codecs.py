#!/usr/bin/env python
"""Benchmark of mergehub's codecs on really fine-tuned tiny transformers (issue 4).

Measures, for full fine-tunes and for LoRA adapters of one tiny Llama, the compression ratio of
each codec and the task accuracy of the decompressed model relative to the uncompressed
fine-tune; the lossless codec's size on the base and on the fine-tunes; TALL masks for the 6
fine-tunes together (if ``Store.compress_tall`` exists); stored bytes and reconstruction
error per basis size m of reversible merging (RMM); and encode/decode throughput of every
codec on one large synthetic tensor.

What it builds (CPU only, no downloads, everything under a temp dir deleted at the end):

* **Tasks.** Sequences ``[BOS, marker, x1..x8, SEP, y1..ym]`` over 16 data symbols, one marker
  token per task; the loss and the accuracy are on the completion ``y`` only. Pre-training
  tasks (the base learns these): copy, reverse, add 1 (mod 16), rotate left by 1. Fine-tuning
  tasks (held out of pre-training; their markers are new to the base, so the base scores ~0
  exact match on them): ``add3`` (x+3 mod 16), ``sort`` (ascending), ``repeat`` (each symbol
  twice), ``swap`` (swap adjacent pairs), ``rotr2`` (rotate right by 2), ``prefmax`` (running
  maximum). A modular running sum was tried and dropped: neither a full nor a LoRA fine-tune
  learned it in a few hundred CPU steps.
* **Accuracy** is teacher-forced: the argmax of the logits at every completion position given
  the true prefix. ``exact`` = fraction of held-out examples whose completion tokens are all
  right, which equals greedy-decoding exact match (greedy reproduces the target iff every
  argmax along the true prefix is right); ``tok`` = per-token accuracy. Splits: a validation
  set (used only to choose ComPEFT's alpha) and a test set, drawn with their own seeds.
* **Base.** Llama (hidden 128, intermediate 256, 4 layers, 4 heads, vocab 64, untied
  embeddings; 672,896 parameters) pre-trained in float32 with AdamW on the pre-training mixture,
  saved with ``save_pretrained`` in bf16.
* **Fine-tunes.** Per task, starting from the stored bf16 base (upcast to float32): a full
  fine-tune (AdamW, every parameter), saved in bf16; and a LoRA fine-tune (peft, r=8,
  lora_alpha=16, q/k/v/o/gate/up/down), the adapter saved in bf16 with
  ``PeftModel.save_pretrained``. For LoRA compression the adapter is merged into the base
  (``merge_and_unload`` in float32, saved in bf16) and that HF dir is stored with ``base="base"``
  and compressed like a full fine-tune ("LoRA-merged"). Every model is evaluated as stored:
  bf16 weights, upcast to float32 for the forward pass.
* **Store.** ``Store.add`` the base, the full fine-tunes, the adapters and the merged LoRAs
  (all with ``base="base"``), then ``Store.compress`` each full fine-tune and each merged LoRA
  with compeft (density 0.05 and 0.1, alpha in 0.5/1/2/4/8: the row ``a*`` is the alpha with
  the best validation exact match per task), bit1 (the default, BitDelta's: one scale per
  matrix on the attention and MLP projections, the other tensors lossless; and ``granularity:
  row, scope: all``: a scale per row, every changed tensor) and lowrank (rank 8, 16);
  ``Store.export`` every compressed entry and evaluate the exported dir. Reference rows
  ``ref: top-k`` (not a codec, not stored): the top 5/10/30% of |τ| per tensor at their exact
  values, to tell sparsification apart from ComPEFT's ternary quantization.
* **Sizes.** ``dense`` = the dense bf16 task vector = 2 bytes per element of the tensors that
  differ from the base. ``stored`` = ``ModelInfo.stored_bytes`` of the entry (blobs it has
  that the base has not, blob headers included). ``x dense`` = dense / stored; ``x lossless`` =
  stored bytes of the lossless fine-tune / stored bytes of the compressed entry. ``hdr`` = the
  share of the stored bytes that are blob headers (read from the blob files), which weighs on
  a model this small (~40 tensors of at most 32,768 elements) and not on a 7B one.
* **Relative accuracy** = exact match of the decompressed model / exact match of the
  uncompressed fine-tune (test set); ``gain`` = (compressed - base) / (fine-tune - base),
  the share of what fine-tuning added that survives.
* **TALL** (``Store.compress_tall``, skipped with a note if absent): the 6 full fine-tunes at
  lambda 0.4 (and 0.2, 0.6); the bytes are those of the union of the blobs of the 6 entries
  (τMTL counted once), compared with 6 dense bf16 deltas.
* **RMM** (reversible merging, ``merge_method: rmm``): for m = 1..6, the 6 LoRA adapters
  (``basis: factors``, the default, and ``basis: dense``), the 6 merged LoRAs and the 6 full
  fine-tunes (dense inputs, for contrast) merged into a store entry; its stored bytes, the
  basis bytes and relative reconstruction error ||W_rec - W_t|| / ||W_t - W_0|| of every task
  that ``rmm.json`` reports, and each task reverted (``mergehub.merge.rmm.revert``), its error
  measured on the bf16 output and its accuracy.
* **Throughput** (at the end, after everything else): one 4096x4096 bf16 "base" N(0, 0.02) and
  "fine-tune" = bf16(base + N(0, 1) * 0.02 * rel), rel = 0.05; MB/s over the tensor's raw bf16
  bytes (MB = 10^6 bytes), best of 3 (lowrank: 1, its full SVD of 4096x4096 takes ~13 s).
  ``encode_lossy`` is the store's path: it also decodes once and hashes, to record the sha256
  of the decoded bytes; ``codec encode`` is the codec's own encode; decode is ``decode_blob``.

Run (about 10 minutes on 2 CPU cores)::

    python benchmarks/bench_codecs.py > /tmp/bench_codecs.log 2> /tmp/bench_codecs.err
    python benchmarks/bench_codecs.py --smoke      # a minute: few steps, small eval sets
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mergehub import Store
from mergehub.adapters.data import (
    ALL_TASKS, PRETRAIN_TASKS, TASKS, accuracy, eval_split, make_batch, mixture)
from mergehub.storage.blob_format import sha256, unpack_blob
from mergehub.storage.codec import encode_lossless
from mergehub.storage.lossy_blobs import decode_blob, encode_lossy
from mergehub.storage.codecs import LOSSY

# --- tasks (the built-in synthetic tasks of mergehub.adapters.data) ---------------------------

CONFIG = dict(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
              tie_word_embeddings=False)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class EvalSets:
    """Fixed validation and test examples per task (own seeds, never used for training)."""

    def __init__(self, n_val: int, n_test: int):
        self.data = {}
        for task in ALL_TASKS:
            self.data[task, "val"] = eval_split(task, n_val, "val")
            self.data[task, "test"] = eval_split(task, n_test, "test")


def train(model: torch.nn.Module, sampler, steps: int, lr: float) -> float:
    """AdamW, linear warm-up over 20 steps then linear decay to 5%; returns the mean loss of the
    last 10 steps."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    losses = []
    for _ in range(steps):
        ids, labels = sampler()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(float(loss))
    return float(np.mean(losses[-10:]))


# --- models on disk ---------------------------------------------------------------------------

def new_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The bf16 tensors of a saved HF dir, upcast to float32."""
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(path / "model.safetensors").items()}


class Evaluator:
    """Evaluates saved models with one reusable float32 model (weights as stored, upcast)."""

    def __init__(self, sets: EvalSets):
        self.sets = sets
        self.model = new_model()
        self.base_dir: Path | None = None

    def hf_dir(self, path: Path, task: str, splits=("test",)) -> dict[str, tuple[float, float]]:
        self.model.load_state_dict(load_state(path))
        return {s: accuracy(self.model, *self.sets.data[task, s]) for s in splits}

    def adapter_dir(self, base_dir: Path, adapter: Path, task: str) -> dict[str, tuple[float, float]]:
        from peft import PeftModel

        model = new_model()
        model.load_state_dict(load_state(base_dir))
        peft_model = PeftModel.from_pretrained(model, str(adapter))
        return {"test": accuracy(peft_model, *self.sets.data[task, "test"])}


def delta_stats(base_dir: Path, ft_dir: Path) -> dict[str, float]:
    """Bytes of the dense bf16 task vector (tensors that differ from the base) and its size."""
    from safetensors.torch import load_file

    base, ft = load_file(base_dir / "model.safetensors"), load_file(ft_dir / "model.safetensors")
    changed = dense = elements = same_values = 0
    tau_sq = base_sq = 0.0
    for name, b in base.items():
        f = ft[name]
        if torch.equal(b, f):
            continue
        changed += 1
        dense += f.numel() * f.element_size()
        elements += f.numel()
        same_values += int((b == f).sum())
        tau_sq += float(((f.float() - b.float()) ** 2).sum())
        base_sq += float((b.float() ** 2).sum())
    return {"changed_tensors": changed, "tensors": len(base), "dense_bytes": dense,
            "rel_norm": math.sqrt(tau_sq / base_sq) if base_sq else 0.0,
            "unchanged_values": same_values / elements if elements else 1.0}


REF_DENSITIES = (0.05, 0.1, 0.3)


def topk_state(base_dir: Path, ft_dir: Path, density: float) -> dict[str, torch.Tensor]:
    """Reference point, not a mergehub codec: per tensor, keep the ``density`` fraction of the
    entries of tau with the largest |tau| at their exact values (the rest back to the base),
    rounded to bf16 like a stored checkpoint, upcast to float32."""
    base, ft = load_state(base_dir), load_state(ft_dir)
    out = {}
    for name, b in base.items():
        tau = (ft[name] - b).reshape(-1)
        k = max(1, int(density * tau.numel()))
        keep = torch.zeros_like(tau)
        idx = tau.abs().topk(k).indices
        keep[idx] = tau[idx]
        out[name] = (b + keep.reshape(b.shape)).to(torch.bfloat16).float()
    return out


def blob_breakdown(store: Store, names: list[str]) -> dict[str, int]:
    """Bytes of the union of the blobs that the entries ``names`` reference (with the blobs
    those need, TALL's τMTL) and their base does not, with the blob headers' share and the
    bytes per codec. Reads the catalog (read-only) and the blob files' first bytes."""
    db = sqlite3.connect(f"file:{store.root / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        has_needs = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'blob_needs'").fetchone()
        mine: set[str] = set()
        base_ids = set()
        for name in names:
            model_id, base_id = db.execute("SELECT id, base_id FROM models WHERE name = ?",
                                           (name,)).fetchone()
            base_ids.add(base_id)
            blobs = {r[0] for r in db.execute(
                "SELECT blob FROM tensors WHERE model_id = ? UNION "
                "SELECT blob FROM files WHERE model_id = ?", (model_id, model_id))}
            if has_needs:
                blobs |= {r[0] for r in db.execute(
                    "SELECT n.needs FROM blob_needs n JOIN tensors t ON t.blob = n.blob "
                    "WHERE t.model_id = ?", (model_id,))}
            mine |= blobs
        base: set[str] = set()
        for base_id in base_ids:
            base |= {r[0] for r in db.execute(
                "SELECT blob FROM tensors WHERE model_id = ? UNION "
                "SELECT blob FROM files WHERE model_id = ?", (base_id, base_id))}
        out = {"bytes": 0, "header_bytes": 0}
        for blob in mine - base:
            codec, size = db.execute("SELECT codec, size FROM blobs WHERE id = ?", (blob,)).fetchone()
            with open(store.root / "blobs" / blob[:2] / blob[2:], "rb") as f:
                head = f.read(8)
            out["bytes"] += size
            out["header_bytes"] += 8 + int.from_bytes(head[4:8], "little")
            out[f"codec:{codec}"] = out.get(f"codec:{codec}", 0) + size
        return out
    finally:
        db.close()


# --- formatting -------------------------------------------------------------------------------

def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fmt_bytes(n: float) -> str:
    return f"{n / 1e3:,.1f} kB"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the benchmark ----------------------------------------------------------------------------

def variants(smoke: bool) -> list[tuple[str, str, dict]]:
    """(label, codec, params) of every compressed entry made per fine-tune."""
    out = []
    for d in (0.05, 0.1):
        for a in ((1.0, 4.0) if smoke else (0.5, 1.0, 2.0, 4.0, 8.0)):
            out.append((f"compeft d={d} a={a:g}", "compeft", {"density": d, "alpha": a}))
    out.append(("bit1 (BitDelta)", "bit1", {}))  # a scale per matrix, projections only
    out.append(("bit1 row, all", "bit1", {"granularity": "row", "scope": "all"}))
    out += [(f"lowrank r={r}", "lowrank", {"rank": r}) for r in (8, 16)]
    return out


def compress_and_eval(store: Store, ev: Evaluator, work: Path, name: str, task: str,
                      base_acc: float, ft_acc: float, ft_stored: int, dense: int,
                      smoke: bool) -> dict[str, dict]:
    rows = {}
    for label, codec, params in variants(smoke):
        as_name = f"{name}.{codec}." + (".".join(f"{k}{v}" for k, v in params.items()) or "default")
        t0 = time.perf_counter()
        info = store.compress(name, codec, params, as_name=as_name, progress=False)
        t_compress = time.perf_counter() - t0
        out = work / "export" / as_name
        store.export(as_name, out, progress=False)
        acc = ev.hf_dir(out, task, splits=("val", "test"))
        shutil.rmtree(out)
        hdr = blob_breakdown(store, [as_name])["header_bytes"]
        exact = acc["test"][0]
        rows[label] = {"codec": codec, "params": params, "stored": info.stored_bytes,
                       "x_dense": dense / info.stored_bytes, "x_lossless": ft_stored / info.stored_bytes,
                       "header_share": hdr / info.stored_bytes, "val": acc["val"], "test": acc["test"],
                       "rel": div(exact, ft_acc), "gain": div(exact - base_acc, ft_acc - base_acc),
                       "compress_s": t_compress}
    for d in REF_DENSITIES:  # reference, not a codec: top-k of |tau| with their exact values
        t0 = time.perf_counter()
        ev.model.load_state_dict(topk_state(ev.base_dir, work / name, d))
        acc = {s: accuracy(ev.model, *ev.sets.data[task, s]) for s in ("val", "test")}
        exact = acc["test"][0]
        rows[f"ref: top-k d={d} exact"] = {
            "codec": "reference", "params": {"density": d}, "stored": float("nan"),
            "x_dense": float("nan"), "x_lossless": float("nan"), "header_share": float("nan"),
            "val": acc["val"], "test": acc["test"], "rel": div(exact, ft_acc),
            "gain": div(exact - base_acc, ft_acc - base_acc), "compress_s": time.perf_counter() - t0}
    for d in (0.05, 0.1):  # alpha chosen on the validation split, per task
        cands = [(r["val"][0], r["val"][1], -abs(math.log(r["params"]["alpha"])), label)
                 for label, r in rows.items() if r["codec"] == "compeft" and r["params"]["density"] == d]
        best = max(cands)[3]
        rows[f"compeft d={d} a*"] = {**rows[best], "chosen": rows[best]["params"]["alpha"]}
    return rows


def call_compress_tall(store: Store, names: list[str], lam: float, suffix: str):
    """``Store.compress_tall`` with whichever spelling of its arguments it has."""
    sig = inspect.signature(store.compress_tall).parameters
    kwargs = {"progress": False}
    if "lambdas" in sig:
        kwargs["lambdas"] = lam
    else:
        kwargs["params"] = {"lambda": lam}
    kwargs["as_suffix" if "as_suffix" in sig else "suffix"] = suffix
    return store.compress_tall(names, **kwargs)


def rel_error(base_dir: Path, ref_dir: Path, got_dir: Path) -> float:
    """||W_got - W_ref|| / ||W_ref - W_0|| over every tensor (Frobenius, float64)."""
    base, ref, got = load_state(base_dir), load_state(ref_dir), load_state(got_dir)
    err = sum(float(((got[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    norm = sum(float(((ref[k].double() - base[k].double()) ** 2).sum()) for k in ref)
    return math.sqrt(err / norm) if norm else float("nan")


def rmm_rows(store: Store, ev: Evaluator, work: Path, label: str, names: list[str],
             basis: str, refs: list[Path], ref_exact: list[float]) -> list[dict]:
    """For m = 1..T: ``mergehub.merge`` of the T store entries ``names`` with ``merge_method:
    rmm`` (``basis`` for LoRA inputs) into a store entry; its ``stored_bytes``, the basis bytes
    and per-task relative errors that ``rmm.json`` reports, and per task (``revert`` to the
    task, evaluated on its test set) the error measured on the reverted bf16 model against the
    task's bf16 checkpoint ``refs[t]`` and its exact match over ``ref_exact[t]``."""
    import mergehub
    from mergehub.merge.rmm import revert

    rows = []
    for m in range(1, len(names) + 1):
        recipe = ("merge_method: rmm\nbase_model: base\nmodels:\n"
                  + "".join(f"  - model: {n}\n" for n in names)
                  + f"parameters: {{m: {m}, basis: {basis}}}\n")
        as_name = f"rmm-{label}-m{m}"
        t0 = time.perf_counter()
        report = mergehub.merge(recipe, store=store, to_store=as_name, progress=False).report
        seconds = time.perf_counter() - t0
        tasks = []
        for i, (task, ref_dir) in enumerate(zip(TASKS, refs)):
            out = revert(store, as_name, i, work / "export" / f"{as_name}-{i}", progress=False)
            exact = ev.hf_dir(out, task)["test"][0]
            tasks.append({"error": report["relative_error_by_m"][report["tasks"][i]][m - 1],
                          "measured": rel_error(ev.base_dir, ref_dir, out),
                          "exact": exact, "rel": div(exact, ref_exact[i])})
            shutil.rmtree(out)
        rows.append({"m": m, "stored": store.show(as_name).stored_bytes,
                     "basis_bytes": report["stored_bytes_by_m"][m - 1],
                     "factored": report["factored_tensors"], "tensors": report["tensors"],
                     "tasks": tasks, "seconds": seconds})
        log(f"rmm {label} m={m}")
    return rows


def print_rmm(rmm: dict[str, list[dict]], res: dict[str, dict]) -> None:
    """The RMM tables: one per input set of :func:`rmm_rows`, a row per m."""
    print()
    print("## Reversible merging (RMM) of the 6 tasks: stored bytes and reconstruction error per m")
    print("stored = ModelInfo.stored_bytes of the rmm store entry (float32 basis and "
          "coefficients, lossless codec); basis f32 = the bytes rmm.json reports for the basis "
          "(4 B per float); err = ||W_rec - W_t|| / ||W_t - W_0|| over every tensor as rmm.json "
          "reports it (float64, before rounding); meas = the same measured on the reverted bf16 "
          "model against the task's bf16 checkpoint (so it has a floor of bf16 rounding); rel = "
          "exact(reverted) / exact(task), mean and min over the tasks the inputs learned (exact "
          "> 0); s = merge seconds; per-task columns: err / rel")
    lora6 = sum(res[t]["lora_info"].stored_bytes for t in TASKS)
    for key, title, inputs in (
            ("lora-factors", "6 LoRA adapters, basis: factors (the default, the paper's)",
             f"the 6 adapters store {fmt_bytes(lora6)}"),
            ("lora-dense",
             "6 LoRA adapters, basis: dense (the dense deltas' optimum, kept as factors)",
             f"the 6 adapters store {fmt_bytes(lora6)}"),
            ("merged",
             "6 LoRA-merged fine-tunes (dense inputs: the same deltas as dense bf16 tensors)",
             dense_and_lossless(res, "merged_delta", "merged_info")),
            ("ft", "6 full fine-tunes (dense inputs)",
             dense_and_lossless(res, "delta", "ft_info"))):
        rows = rmm[key]
        print(f"{title}; {inputs}; {rows[0]['tensors']} tensors with a basis, "
              f"{rows[0]['factored']} of them as factors")
        print(f"{'m':>2} {'stored':>11} {'basis f32':>11} {'err mean':>8} {'err max':>8} "
              f"{'meas mean':>9} {'rel mean':>8} {'rel min':>8} {'s':>5} "
              + " ".join(f"{t:>13}" for t in TASKS))
        for row in rows:
            tk = row["tasks"]
            rel = [x["rel"] for x in tk if not math.isnan(x["rel"])] or [float("nan")]
            print(f"{row['m']:>2} {fmt_bytes(row['stored']):>11} "
                  f"{fmt_bytes(row['basis_bytes']):>11} {np.mean([x['error'] for x in tk]):>8.4f} "
                  f"{max(x['error'] for x in tk):>8.4f} "
                  f"{np.mean([x['measured'] for x in tk]):>9.4f} "
                  f"{pct(np.mean(rel)):>8} {pct(min(rel)):>8} {row['seconds']:>5.1f} "
                  + " ".join(f"{x['error']:.3f}/{pct(x['rel']):>6}" for x in tk))


def dense_and_lossless(res: dict[str, dict], delta: str, info: str) -> str:
    """The 6 inputs' dense bf16 deltas and lossless stored bytes, for a table's title."""
    return (f"6 dense bf16 deltas {fmt_bytes(sum(res[t][delta]['dense_bytes'] for t in TASKS))}, "
            f"lossless {fmt_bytes(sum(res[t][info].stored_bytes for t in TASKS))}")


def best_time(fn, reps: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def throughput(size: int, rel: float, reps: int) -> list[tuple[str, float, float, float, str]]:
    """(codec, bare-encode MB/s, encode_lossy MB/s, decode MB/s, note) on one size x size tensor."""
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(size, size, generator=gen) * 0.02).to(torch.bfloat16)
    ft = (base.float() + torch.randn(size, size, generator=gen) * 0.02 * rel).to(torch.bfloat16)
    raw_of = lambda t: t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # noqa: E731
    base_raw, ft_raw = raw_of(base), raw_of(ft)
    mb = len(ft_raw) / 1e6
    base_id = sha256(encode_lossless(base_raw, "BF16", sha256(base_raw)))
    results = []

    t_enc, blob = best_time(lambda: encode_lossless(base_raw, "BF16", sha256(base_raw)), reps)
    header, payload = unpack_blob(blob)
    t_dec, out = best_time(lambda: decode_blob(header, payload, None), reps)
    assert out == base_raw
    results.append(("lossless (no ref, base)", float("nan"), mb / t_enc, mb / t_dec,
                    f"size {len(blob) / len(base_raw):.3f} of raw"))
    t_enc, blob = best_time(lambda: encode_lossless(ft_raw, "BF16", sha256(ft_raw), (base_id, base_raw)), reps)
    header, payload = unpack_blob(blob)
    t_dec, out = best_time(lambda: decode_blob(header, payload, base_raw), reps)
    assert out == ft_raw
    results.append(("lossless (delta vs base)", float("nan"), mb / t_enc, mb / t_dec,
                    f"size {len(blob) / len(ft_raw):.3f} of raw"))
    for codec, params, r in (("compeft", {"density": 0.1, "alpha": 1.0}, reps),
                             ("compeft", {"density": 0.05, "alpha": 1.0}, reps),
                             ("bit1", {"granularity": "matrix"}, reps),
                             ("bit1", {"granularity": "row"}, reps),
                             ("lowrank", {"rank": 16, "energy": 1.0}, 1)):
        log(f"throughput {codec} {params}")
        t_bare, _ = best_time(lambda: LOSSY[codec].encode(ft, base, params), r)
        t_enc, blob = best_time(lambda: encode_lossy(ft_raw, "BF16", (size, size), codec, params,
                                                     (base_id, base_raw)), r)
        header, payload = unpack_blob(blob)
        t_dec, _ = best_time(lambda: decode_blob(header, payload, base_raw), r)
        label = f"{codec} " + " ".join(f"{k}={v}" for k, v in params.items() if k != "energy")
        results.append((label, mb / t_bare, mb / t_enc, mb / t_dec,
                        f"size {len(blob) / len(ft_raw):.4f} of raw" + ("" if r == reps else f"; best of {r}")))
    try:  # TALL: one task's mask against a τMTL of 6 tasks
        from mergehub.storage.lossy_blobs import encode_task_blob
        from mergehub.storage.codecs.tall import mask

        tau = ft.float() - base.float()
        mtl = tau + torch.randn(size, size, generator=gen) * 0.02 * rel * math.sqrt(5)
        mtl_raw = raw_of(mtl)
        mtl_id = sha256(encode_lossless(mtl_raw, "F32", sha256(mtl_raw)))
        p = {"lambda": 0.4, "alpha": 1.0}
        t_enc, blob = best_time(lambda: encode_task_blob(
            "tall", {"mask": mask(tau, mtl, p["lambda"])}, p, (size, size), "BF16",
            (base_id, base_raw), {"mtl": (mtl_id, mtl)}), reps)
        header, payload = unpack_blob(blob)
        t_dec, _ = best_time(lambda: decode_blob(header, payload, base_raw, {"mtl": mtl_raw}), reps)
        results.append(("tall lambda=0.4 (1 task's mask)", float("nan"), mb / t_enc, mb / t_dec,
                        f"mask {len(blob) / len(ft_raw):.4f} of raw (τMTL not counted)"))
    except Exception as e:  # noqa: BLE001  (the API is new: report, do not fail)
        results.append(("tall", float("nan"), float("nan"), float("nan"), f"not measured: {e!r}"[:100]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="few steps, small eval sets (~1 min)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--ft-steps", type=int, default=200)
    ap.add_argument("--lora-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3, help="full fine-tune learning rate")
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--tall-lambdas", default="0.4,0.2,0.6")
    ap.add_argument("--tp-size", type=int, default=4096, help="throughput tensor is SIZE x SIZE")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads (default: one per CPU); on a busy machine "
                         "pass 1: a descheduled thread stalls every barrier (20 training steps "
                         "took 7-12 s with 1 thread, 113-204 s with 2, on 2 busy CPUs)")
    ap.add_argument("--work", default=None, help="work dir (default: a temp dir, deleted)")
    args = ap.parse_args()
    if args.smoke:
        args.pretrain_steps, args.ft_steps, args.lora_steps = 30, 20, 20
        args.n_val, args.n_test, args.tp_size, args.tall_lambdas = 100, 200, 1024, "0.4"

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from peft import LoraConfig, PeftModel, get_peft_model
    import peft
    import transformers

    torch.set_num_threads(args.threads)
    t_start = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-codecs-"))
    work.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in new_model().parameters())
    print(f"mergehub codec benchmark: tiny Llama {json.dumps(CONFIG)}, {n_params:,} params; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{os.cpu_count()} CPUs, {args.threads} torch thread(s); "
          f"{'SMOKE RUN; ' if args.smoke else ''}work dir {work}")
    print(f"training: pre-train {args.pretrain_steps} steps (batch {args.batch * 3 // 2}, lr 2e-3) on "
          f"{'/'.join(PRETRAIN_TASKS)}; per task: full fine-tune {args.ft_steps} steps (lr {args.lr:g}), "
          f"LoRA r=8 alpha=16 on {'/'.join(p.split('_')[0] for p in LORA_TARGETS)} {args.lora_steps} "
          f"steps (lr {args.lora_lr:g}), batch {args.batch}, AdamW, fp32; checkpoints in bf16. "
          f"Eval: teacher-forced, {args.n_val} val / {args.n_test} test examples per task")

    sets = EvalSets(args.n_val, args.n_test)
    ev = Evaluator(sets)
    gen = torch.Generator().manual_seed(0)

    # 1. the base
    torch.manual_seed(0)
    model = new_model()
    t0 = time.time()
    loss = train(model, lambda: mixture(list(PRETRAIN_TASKS), args.batch * 3 // 2, gen),
                 args.pretrain_steps, 2e-3)
    base_dir = work / "base"
    model.to(torch.bfloat16).save_pretrained(base_dir)
    pre_acc = {t: ev.hf_dir(base_dir, t)["test"] for t in PRETRAIN_TASKS}
    base_acc = {t: ev.hf_dir(base_dir, t)["test"] for t in TASKS}
    print(f"base: pre-trained in {time.time() - t0:.0f} s, final loss {loss:.4f}; exact match on its "
          f"pre-training tasks: " + ", ".join(f"{t} {pct(a[0])}" for t, a in pre_acc.items()))
    log("base done")

    # 2. fine-tunes
    base_state = load_state(base_dir)
    ev.base_dir = base_dir
    res: dict[str, dict] = {t: {} for t in TASKS}
    t_ft = t_lora = 0.0
    for task in TASKS:
        sampler = lambda: make_batch(task, args.batch, gen)  # noqa: E731
        model = new_model()
        model.load_state_dict(base_state)
        t0 = time.time()
        res[task]["ft_loss"] = train(model, sampler, args.ft_steps, args.lr)
        t_ft += time.time() - t0
        model.to(torch.bfloat16).save_pretrained(work / f"ft-{task}")
        res[task]["ft"] = ev.hf_dir(work / f"ft-{task}", task, ("val", "test"))
        res[task]["delta"] = delta_stats(base_dir, work / f"ft-{task}")

        model = new_model()
        model.load_state_dict(base_state)
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=LORA_TARGETS))
        t0 = time.time()
        res[task]["lora_loss"] = train(peft_model, sampler, args.lora_steps, args.lora_lr)
        t_lora += time.time() - t0
        peft_model.to(torch.bfloat16).save_pretrained(work / f"lora-{task}")
        res[task]["lora"] = ev.adapter_dir(base_dir, work / f"lora-{task}", task)
        model = new_model()
        model.load_state_dict(base_state)
        merged = PeftModel.from_pretrained(model, str(work / f"lora-{task}")).merge_and_unload()
        merged.to(torch.bfloat16).save_pretrained(work / f"merged-{task}")
        res[task]["merged"] = ev.hf_dir(work / f"merged-{task}", task, ("val", "test"))
        res[task]["merged_delta"] = delta_stats(base_dir, work / f"merged-{task}")
        log(f"fine-tuned {task}: full {res[task]['ft']['test']}, lora {res[task]['lora']['test']}, "
            f"merged {res[task]['merged']['test']}")
    print(f"fine-tuning: {t_ft:.0f} s for {len(TASKS)} full, {t_lora:.0f} s for {len(TASKS)} LoRA")

    # 3. store everything
    store = Store.init(work / "store")
    t0 = time.perf_counter()
    base_info = store.add(base_dir, "base", progress=False)
    t_add_base = time.perf_counter() - t0
    for task in TASKS:
        res[task]["ft_info"] = store.add(work / f"ft-{task}", f"ft-{task}", base="base", progress=False)
        res[task]["lora_info"] = store.add(work / f"lora-{task}", f"lora-{task}", base="base", progress=False)
        res[task]["merged_info"] = store.add(work / f"merged-{task}", f"merged-{task}", base="base",
                                             progress=False)
    # what compress does with a PEFT adapter entry (its tensors have no same-named base tensor)
    try:
        info = store.compress(f"lora-{next(iter(TASKS))}", "compeft", {"density": 0.1},
                              as_name="lora-adapter-compeft-probe", progress=False)
        adapter_probe = (f"store.compress(<adapter>, compeft d=0.1) -> entry with stored_bytes "
                         f"{info.stored_bytes:,} vs the adapter's {res[next(iter(TASKS))]['lora_info'].stored_bytes:,}; "
                         f"codecs {sorted(info.codecs)}")
    except Exception as e:  # noqa: BLE001
        adapter_probe = f"store.compress(<adapter>, compeft) raised {type(e).__name__}: {e}"
    log("stored")

    # 4. lossy codecs on the full fine-tunes and on the merged LoRAs
    t_codecs = time.time()
    for task in TASKS:
        r = res[task]
        for kind, name in (("ft", f"ft-{task}"), ("merged", f"merged-{task}")):
            stats = r["delta"] if kind == "ft" else r["merged_delta"]
            r[f"{kind}_codecs"] = compress_and_eval(
                store, ev, work, name, task, base_acc[task][0], r[kind]["test"][0],
                r[f"{kind}_info"].stored_bytes, stats["dense_bytes"], args.smoke)
        log(f"compressed {task}")
    t_codecs = time.time() - t_codecs

    # 5. TALL
    tall_rows, tall_note = [], None
    if not hasattr(Store, "compress_tall"):
        tall_note = "TALL: skipped, this mergehub's Store has no compress_tall"
    else:
        names = [f"ft-{t}" for t in TASKS]
        dense6 = sum(res[t]["delta"]["dense_bytes"] for t in TASKS)
        lossless6 = sum(res[t]["ft_info"].stored_bytes for t in TASKS)
        for lam in [float(x) for x in args.tall_lambdas.split(",")]:
            suffix = f"-tall{lam:g}"
            try:
                t0 = time.perf_counter()
                infos = call_compress_tall(store, names, lam, suffix)
                t_tall = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                tall_note = f"TALL lambda {lam:g}: compress_tall raised {type(e).__name__}: {e}"
                break
            out_names = [i.name for i in infos]
            parts = blob_breakdown(store, out_names)
            accs = {}
            for task, name in zip(TASKS, out_names):
                out = work / "export" / name
                store.export(name, out, progress=False)
                accs[task] = ev.hf_dir(out, task)["test"]
                shutil.rmtree(out)
            tall_rows.append({"lambda": lam, "bytes": parts["bytes"], "parts": parts,
                              "sum_stored": sum(i.stored_bytes for i in infos), "dense6": dense6,
                              "lossless6": lossless6, "accs": accs, "seconds": t_tall})
            log(f"tall {lam}")

    # 6. reversible merging (RMM) of the 6 tasks: stored bytes and reconstruction error per m
    lora_names = [f"lora-{t}" for t in TASKS]
    merged_refs = [work / f"merged-{t}" for t in TASKS]
    merged_exact = [res[t]["merged"]["test"][0] for t in TASKS]
    rmm = {key: rmm_rows(store, ev, work, key, names, basis, refs, exact)
           for key, names, basis, refs, exact in (
               ("lora-factors", lora_names, "factors", merged_refs, merged_exact),
               ("lora-dense", lora_names, "dense", merged_refs, merged_exact),
               ("merged", [f"merged-{t}" for t in TASKS], "factors", merged_refs, merged_exact),
               ("ft", [f"ft-{t}" for t in TASKS], "factors", [work / f"ft-{t}" for t in TASKS],
                [res[t]["ft"]["test"][0] for t in TASKS]))}

    # 7. lossless sizes
    raw_base = base_info.logical_bytes
    lossless_base = base_info.stored_bytes

    # ------------------------------------------------------------------------- report
    print()
    print("## Fine-tunes (test set; exact = teacher-forced exact match = greedy exact match; tok = token accuracy)")
    print("dense = bf16 task vector (2 B x elements of the tensors that differ from the base); "
          "lossless = stored bytes of the add with base=\"base\"; |tau|/|theta0| over the changed tensors")
    print(f"{'task':8} {'base exact':>10} {'FT exact':>9} {'FT tok':>7} {'LoRA exact':>10} {'merged':>7} "
          f"{'FT dense':>10} {'FT lossless':>11} {'|tau|/|th0|':>11} {'same bf16':>9} {'LoRA adapter':>12} {'merged lossless':>15}")
    for task in TASKS:
        r = res[task]
        print(f"{task:8} {pct(base_acc[task][0]):>10} {pct(r['ft']['test'][0]):>9} {pct(r['ft']['test'][1]):>7} "
              f"{pct(r['lora']['test'][0]):>10} {pct(r['merged']['test'][0]):>7} "
              f"{fmt_bytes(r['delta']['dense_bytes']):>10} "
              f"{r['ft_info'].stored_bytes / r['delta']['dense_bytes']:>10.3f}x "
              f"{r['delta']['rel_norm']:>11.4f} {pct(r['delta']['unchanged_values']):>9} "
              f"{fmt_bytes(r['lora_info'].stored_bytes):>12} "
              f"{r['merged_info'].stored_bytes / r['merged_delta']['dense_bytes']:>14.3f}x")
    r0 = res[next(iter(TASKS))]
    print(f"full fine-tunes change {r0['delta']['changed_tensors']}/{r0['delta']['tensors']} tensors "
          f"({fmt_bytes(r0['delta']['dense_bytes'])} dense); merged LoRAs change "
          f"{r0['merged_delta']['changed_tensors']}/{r0['merged_delta']['tensors']} "
          f"({fmt_bytes(r0['merged_delta']['dense_bytes'])} dense). 'FT lossless' and 'merged lossless' "
          f"are stored/dense (lower is better); a LoRA adapter (bf16, r=8, 7 modules x 4 layers) is "
          f"{r0['lora_info'].stored_bytes / r0['merged_delta']['dense_bytes']:.3f} of its merged dense delta")
    print(f"merged = LoRA merged into the base in fp32 then saved in bf16 (the entry the LoRA codecs compress)")
    print(adapter_probe)

    for kind, title in (("ft", "full fine-tunes"), ("merged", "LoRA adapters merged into the base (LoRA-merged)")):
        print()
        print(f"## Codecs on the {title}: size and accuracy relative to the uncompressed model (test set)")
        print("x dense = dense bf16 delta / stored bytes; x lossl = lossless delta / stored bytes; hdr = blob "
              "headers' share of the stored bytes; rel = exact(compressed) / exact(uncompressed); gain = "
              "(compressed - base) / (uncompressed - base); per-task columns: rel exact (a*: chosen alpha)")
        labels = list(res[next(iter(TASKS))][f"{kind}_codecs"])
        labels = ([lb for lb in labels if lb.startswith("compeft")]
                  + [lb for lb in labels if not lb.startswith(("compeft", "ref"))]
                  + [lb for lb in labels if lb.startswith("ref")])
        head = f"{'codec':24} {'x dense':>8} {'x lossl':>8} {'hdr':>5} {'mean rel':>8} {'min rel':>8} {'tok rel':>8} {'gain':>6} {'>=99%':>5}"
        print(head + " " + " ".join(f"{t:>13}" for t in TASKS))
        for label in labels:
            rows = [res[t][f"{kind}_codecs"][label] for t in TASKS]
            ref_tok = [res[t][kind]["test"][1] for t in TASKS]
            rel = [r["rel"] for r in rows]
            tok_rel = [div(r["test"][1], rt) for r, rt in zip(rows, ref_tok)]
            cells = [f"{pct(r['rel'])}" + (f" a{r['chosen']:g}" if "chosen" in r else "") for r in rows]
            xd, xl = np.mean([r['x_dense'] for r in rows]), np.mean([r['x_lossless'] for r in rows])
            print(f"{label:24} {'-' if math.isnan(xd) else f'{xd:.2f}x':>8} "
                  f"{'-' if math.isnan(xl) else f'{xl:.2f}x':>8} "
                  f"{pct(np.mean([r['header_share'] for r in rows])):>5} "
                  f"{pct(np.mean(rel)):>8} {pct(min(rel)):>8} {pct(np.mean(tok_rel)):>8} "
                  f"{pct(np.mean([r['gain'] for r in rows])):>6} "
                  f"{sum(x >= 0.99 for x in rel):>3}/{len(rel)} " + " ".join(f"{c:>13}" for c in cells))
        print(f"(x dense and hdr are means over the {len(TASKS)} tasks; store.compress time per entry "
              f"{np.mean([res[t][f'{kind}_codecs'][lb]['compress_s'] for t in TASKS for lb in labels if not lb.startswith('ref')]):.2f} s mean; "
              f"'ref: top-k' rows are not stored: the top-k entries of tau at their exact values, to "
              f"separate sparsification from ComPEFT's ternary quantization)")

    print()
    print("## TALL masks on the 6 full fine-tunes (Store.compress_tall; bytes = union of the 6 entries' blobs, τMTL once)")
    if tall_note:
        print(tall_note)
    for row in tall_rows:
        parts = ", ".join(f"{k.split(':')[1]} {fmt_bytes(v)}" for k, v in row["parts"].items() if k.startswith("codec:"))
        rels = {t: div(row["accs"][t][0], res[t]["ft"]["test"][0]) for t in TASKS}
        print(f"lambda {row['lambda']:g}: {fmt_bytes(row['bytes'])} ({parts}; headers "
              f"{pct(row['parts']['header_bytes'] / row['bytes'])}) = {row['bytes'] / row['dense6']:.3f} of 6 dense "
              f"bf16 deltas ({fmt_bytes(row['dense6'])}), {row['bytes'] / row['lossless6']:.3f} of 6 lossless deltas "
              f"({fmt_bytes(row['lossless6'])}); sum of the entries' stored_bytes {fmt_bytes(row['sum_stored'])}; "
              f"{row['seconds']:.1f} s")
        print("  rel exact: " + ", ".join(f"{t} {pct(v)} ({pct(row['accs'][t][0])})" for t, v in rels.items())
              + f"; mean {pct(np.mean(list(rels.values())))}, min {pct(min(rels.values()))}")

    print_rmm(rmm, res)

    print()
    print("## Lossless")
    print(f"base: {lossless_base:,} stored / {raw_base:,} raw bytes = {lossless_base / raw_base:.3f} "
          f"(add took {t_add_base:.2f} s)")
    ft_ratio = [res[t]["ft_info"].stored_bytes / res[t]["delta"]["dense_bytes"] for t in TASKS]
    m_ratio = [res[t]["merged_info"].stored_bytes / res[t]["merged_delta"]["dense_bytes"] for t in TASKS]
    print(f"full fine-tunes (delta vs base): stored / dense = {np.mean(ft_ratio):.3f} mean "
          f"({min(ft_ratio):.3f}..{max(ft_ratio):.3f}); merged LoRAs: {np.mean(m_ratio):.3f} mean "
          f"({min(m_ratio):.3f}..{max(m_ratio):.3f})")

    # 8. throughput, last
    load = os.getloadavg()
    log("throughput")
    reps = 3
    tp = throughput(args.tp_size, 0.05, reps)
    load_after = os.getloadavg()
    print()
    print(f"## Throughput on one {args.tp_size}x{args.tp_size} bf16 tensor ({args.tp_size ** 2 * 2 / 1e6:.1f} MB raw; "
          f"fine-tune = base + 5% of its std as noise; MB/s of raw bf16 bytes, best of {reps}; "
          f"load average before {load[0]:.2f}, after {load_after[0]:.2f}, {os.cpu_count()} CPUs)")
    print(f"{'codec':34} {'codec encode':>12} {'encode (store)':>14} {'decode':>9}  note")
    for label, bare, enc, dec, note in tp:
        fmt = lambda x: "-" if math.isnan(x) else f"{x:.1f}"  # noqa: E731
        print(f"{label:34} {fmt(bare):>12} {fmt(enc):>14} {fmt(dec):>9}  {note}")

    # targets
    print()
    print("## Targets")
    for d in (0.05, 0.1):
        for key in (f"compeft d={d} a=1", f"compeft d={d} a*"):
            rows = [res[t]["ft_codecs"][key] for t in TASKS]
            ratio, rel = np.mean([r["x_dense"] for r in rows]), min(r["rel"] for r in rows)
            met = "met" if ratio >= 8 and rel >= 0.99 else "NOT met"
            print(f"ComPEFT >= 8x at >= 99% (full fine-tunes, {key}): {ratio:.2f}x dense bf16 "
                  f"(min {min(r['x_dense'] for r in rows):.2f}x), worst task {pct(rel)}, mean "
                  f"{pct(np.mean([r['rel'] for r in rows]))}: {met}")
            rows = [res[t]["merged_codecs"][key] for t in TASKS]
            ratio, rel = np.mean([r["x_dense"] for r in rows]), min(r["rel"] for r in rows)
            met = "met" if ratio >= 8 and rel >= 0.99 else "NOT met"
            print(f"ComPEFT >= 8x at >= 99% (LoRA-merged, {key}): {ratio:.2f}x dense bf16, worst task "
                  f"{pct(rel)}, mean {pct(np.mean([r['rel'] for r in rows]))}: {met}")
    for row in tall_rows:
        frac = row["bytes"] / row["dense6"]
        rel = min(div(row["accs"][t][0], res[t]["ft"]["test"][0]) for t in TASKS)
        print(f"TALL 6 tasks <= 1/4 of 6 dense deltas at >= 99% (lambda {row['lambda']:g}): "
              f"{frac:.3f} of the bytes ({'met' if frac <= 0.25 else 'NOT met'}), worst task {pct(rel)} "
              f"({'met' if rel >= 0.99 else 'NOT met'})")
    if not tall_rows:
        print(f"TALL: not measured ({tall_note})")
    print(f"lossless bf16 <= 72% of raw (base): {lossless_base / raw_base:.3f} "
          f"({'met' if lossless_base / raw_base <= 0.72 else 'NOT met'})")
    print(f"\ncompress + export + evaluate of all {2 * len(TASKS) * len(variants(args.smoke))} lossy entries "
          f"(+ top-k references): "
          f"{t_codecs:.0f} s; total wall time {time.time() - t_start:.0f} s")
    store.close()
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
