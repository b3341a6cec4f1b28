#!/usr/bin/env python
"""Accuracy of every ``hub train`` method on the synthetic tasks in a fixed step budget (issue 6).

What it runs (CPU, no downloads, everything under a temp dir deleted at the end), all through
``mergehub.adapters.trainer.train`` (the code behind ``hub train``):

* **Base.** The tiny Llama of ``bench_codecs.py`` (hidden 128, 4 layers, vocab 64; 672,896
  parameters), randomly initialized (seed 0) and pre-trained in float32 with method ``full``
  on the mixture of the pre-training tasks (copy, reverse, add1, rotl1): ``--pretrain-steps``
  steps, batch 96, AdamW lr 2e-3, 20 warm-up steps then linear decay. Kept in float32.
* **Fine-tunes.** For each task of ``--tasks`` (new to the base: its marker token was never
  seen) and each method, ``--steps`` steps at batch ``--batch`` from that base, seed 0,
  constant learning rate after 10 warm-up steps (MeZO: no warm-up), the rate per method in
  :data:`SETUPS` (sparse and MeZO rates picked from a small sweep on add3, see RESULTS.md; the
  others are the rates of ``bench_codecs.py`` or peft's usual ones). MeZO methods also run
  with ``--mezo-factor`` times the step budget (they do two forward passes per step and no
  backward pass, so a step costs about 2/3 of a backprop step).
* **Accuracy** is teacher-forced on ``--n-test`` held-out examples per task (the test split
  of ``bench_codecs.py``): ``exact`` = all completion tokens right (= greedy exact match),
  ``tok`` = per-token accuracy, measured by the trainer on the model it trained (quantized
  forward for ``onebit``). Every result is also stored (``output.store``) against the base:
  ``stored`` is ``ModelInfo.stored_bytes`` (the entry's blobs beyond the base's).

Run (about 15 minutes on 2 idle CPU cores)::

    python benchmarks/bench_trainer_accuracy.py > /tmp/bench_acc.log 2> /tmp/bench_acc.err
    python benchmarks/bench_trainer_accuracy.py --smoke      # a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_codecs import CONFIG, LORA_TARGETS, log, new_model  # noqa: E402

from mergehub import MergehubError, Store  # noqa: E402
from mergehub.adapters.data import PRETRAIN_TASKS, SyntheticDataset  # noqa: E402
from mergehub.adapters.trainer import evaluate, train  # noqa: E402

LORA = {"r": 8, "lora_alpha": 16, "target_modules": LORA_TARGETS}
#: label -> (method, learning rate, extra config keys)
SETUPS: dict[str, tuple[str, float, dict]] = {
    "full": ("full", 1e-3, {}),
    "lora r8": ("lora", 3e-3, {"peft": LORA}),
    "dora r8": ("lora", 3e-3, {"peft": {**LORA, "use_dora": True}}),
    "ia3": ("lora", 1e-2, {"peft": {"peft_type": "IA3", "target_modules":
                                    ["k_proj", "v_proj", "down_proj"],
                                    "feedforward_modules": ["down_proj"]}}),
    "incrlora r2->budget 224": ("incrlora", 3e-3, {
        "peft": {"lora_alpha": 4, "target_modules": LORA_TARGETS},
        "method_params": {"init_r": 2, "budget": 224, "grow_every": 10, "grow_modules": 8,
                          "warmup": 10}}),
    "sparse 1%": ("sparse", 1e-2, {"method_params": {"density": 0.01}}),
    "onebit lora r8": ("onebit", 3e-3, {"peft": LORA}),
    "mezo": ("mezo", 3e-4, {}),
    "sparse_mezo q=0.25": ("sparse_mezo", 1e-3, {"method_params": {"density": 0.25}}),
    "mezo lora r8": ("mezo", 1e-2, {"peft": LORA, "method_params": {"over": "adapter",
                                                                     "eps": 1e-2}}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="few steps, few methods (~1 min)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--mezo-factor", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--tasks", default="add3,swap,rotr2")
    ap.add_argument("--methods", default=None, help="comma-separated labels of SETUPS")
    ap.add_argument("--lr", type=float, default=None, help="override every method's lr")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads (default: one per CPU); on a busy machine "
                         "pass 1: a descheduled thread stalls every barrier (20 training steps "
                         "took 7-12 s with 1 thread, 113-204 s with 2, on 2 busy CPUs)")
    ap.add_argument("--work", default=None,
                    help="work dir, kept (default: a temp dir, deleted); a pre-trained base "
                         "and the runs already stored in it are reused (an interrupted "
                         "benchmark continues)")
    args = ap.parse_args()
    labels = args.methods.split(",") if args.methods else list(SETUPS)
    if args.smoke:
        args.pretrain_steps, args.steps, args.mezo_factor, args.n_test = 30, 20, 2, 100
        labels = ["full", "lora r8", "sparse 1%", "onebit lora r8", "mezo"]
    tasks = args.tasks.split(",")

    warnings.filterwarnings("ignore")
    import peft
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    t_start = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-acc-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if not (work / "base").is_dir():
        new_model().save_pretrained(work / "init")
    print(f"mergehub trainer accuracy benchmark: tiny Llama {json.dumps(CONFIG)}; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{os.cpu_count()} CPUs, {args.threads} torch thread(s); "
          f"{'SMOKE RUN; ' if args.smoke else ''}work dir {work}")

    if args.lr is not None and (work / "store").exists():
        shutil.rmtree(work / "store")  # entries are named without the rate: do not reuse
    store = Store.init(work / "store")
    if not (work / "base").is_dir():  # pre-train (a --work dir that has one keeps it)
        t0 = time.time()
        pre = train({"base": str(work / "init"),
                     "data": {"task": list(PRETRAIN_TASKS), "eval_examples": args.n_test},
                     "method": "full", "steps": args.pretrain_steps, "batch_size": 96,
                     "lr": 2e-3, "warmup_steps": 20, "schedule": "linear",
                     "output": {"dir": str(work / "base")}, "run_dir": str(work / "run")},
                    progress=False)
        print(f"base: pre-trained {args.pretrain_steps} steps in {time.time() - t0:.0f} s, final "
              f"loss {pre.metrics['loss']:.4f}, exact match on its pre-training mixture "
              f"{pre.metrics['eval_exact_match']:.1%}")
    base_model = AutoModelForCausalLM.from_pretrained(work / "base")
    base_eval = {t: evaluate(base_model, SyntheticDataset([t], args.n_test)) for t in tasks}
    print(f"fine-tuning: {args.steps} steps, batch {args.batch}, seed 0, 10 warm-up steps then "
          f"constant lr (MeZO: constant); MeZO methods also at {args.mezo_factor}x steps; "
          f"teacher-forced accuracy on {args.n_test} test examples per task")

    rows = []
    runs = [(lb, args.steps) for lb in labels]
    runs += [(lb, args.steps * args.mezo_factor) for lb in labels if "mezo" in SETUPS[lb][0]]
    for label, steps in runs:
        method, lr, extra = SETUPS[label]
        row = {"label": label if steps == args.steps else f"{label} ({steps} steps)", "acc": {}}
        for task in tasks:
            name = f"{label.replace(' ', '_').replace('%', 'pct').replace('>', '')}.{task}.{steps}"
            if name in store:  # done by an earlier (interrupted) run in this --work dir
                info = store.show(name)
                row["acc"][task] = (info.metrics["eval_exact_match"],
                                    info.metrics["eval_token_accuracy"],
                                    info.provenance["trainer"]["seconds"], info.stored_bytes,
                                    info.kind)
                continue
            t0 = time.time()
            try:
                r = train({"base": str(work / "base"),
                           "data": {"task": task, "eval_examples": args.n_test},
                           "method": method, "steps": steps, "batch_size": args.batch,
                           "lr": args.lr or lr, "warmup_steps": 0 if "mezo" in method else 10,
                           "output": {"store": name, "base": "base"},
                           "run_dir": str(work / "run"), **extra}, store=store, progress=False)
            except MergehubError as e:  # a diverged run (non-finite loss) is a result too
                log(f"{row['label']} {task}: failed: {e}")
                row["acc"][task] = (float("nan"), float("nan"), time.time() - t0, 0, "failed")
                continue
            seconds = time.time() - t0
            info = r.entry
            row["acc"][task] = (r.metrics["eval_exact_match"], r.metrics["eval_token_accuracy"],
                                seconds, info.stored_bytes, info.kind)
            log(f"{row['label']} {task}: exact {r.metrics['eval_exact_match']:.3f} "
                f"tok {r.metrics['eval_token_accuracy']:.3f} loss {r.metrics['loss']:.3f} "
                f"{seconds:.0f} s")
        rows.append(row)

    full = next((r for r in rows if r["label"] == "full"), None)
    print()
    print("## Accuracy after the step budget (test set; exact = teacher-forced exact match, tok = token "
          "accuracy; rel = exact / full fine-tuning's exact; stored = bytes the store entry adds "
          "beyond the base; s = wall seconds per run incl. eval and store add)")
    head = f"{'method':34}" + "".join(f" {t + ' exact':>11} {'tok':>6}" for t in tasks)
    print(head + f" {'mean exact':>10} {'rel':>6} {'stored':>10} {'kind':>8} {'s/run':>6}")
    print(f"{'base (no fine-tuning)':34}" + "".join(
        f" {base_eval[t]['eval_exact_match']:>11.1%} {base_eval[t]['eval_token_accuracy']:>6.1%}"
        for t in tasks))
    for r in rows:
        exact = [r["acc"][t][0] for t in tasks]
        mean = sum(exact) / len(exact)
        ref = sum(full["acc"][t][0] for t in tasks) / len(tasks) if full else float("nan")
        stored = sum(r["acc"][t][3] for t in tasks) / len(tasks)
        secs = sum(r["acc"][t][2] for t in tasks) / len(tasks)
        print(f"{r['label']:34}" + "".join(f" {r['acc'][t][0]:>11.1%} {r['acc'][t][1]:>6.1%}"
                                             for t in tasks)
              + f" {mean:>10.1%} {mean / ref if ref else float('nan'):>6.2f} "
                f"{stored / 1e3:>8.1f}kB {r['acc'][tasks[0]][4]:>8} {secs:>6.1f}")
    print(f"\ntotal wall time {time.time() - t_start:.0f} s")
    store.close()
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
