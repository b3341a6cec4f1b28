"""``hub train`` beyond causal LMs (issue 15, item 2): a BERT-style encoder (tiny config,
random init, saved bare as ``BertModel`` the way sentence encoders are) trained as a sequence
classifier, fully and with LoRA, and as a masked LM. The classification head lands in the
store entry, and the export loads with ``AutoModelForSequenceClassification``; bad configs and
data are refused before the first step with one line; a failure after training keeps the
trained result and names where."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

import mergehub
from mergehub.adapters import trainer
from mergehub.adapters.data import build_dataset
from mergehub.errors import StoreError
from mergehub.hub.cli import cli

POSITIVE, NEGATIVE = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "film", "was", "is",
         "plot", "cast", *POSITIVE, *NEGATIVE]
#: a LoRA over the attention's query/value and every dense layer (the pooler's too)
LORA = "peft: {r: 4, lora_alpha: 8, target_modules: [query, value, dense]}\n"
#: LoRA's rate for the classifier: 1e-2 oscillates (eval accuracy 0.31-1.0 over 40-120 steps
#: with transformers 5.25 / peft 0.21.2), 5e-3 reaches 1.0 at every step count from 40 to 120
LORA_LR = "5.0e-3"


pytestmark = pytest.mark.usefixtures("one_thread")


def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def tiny_bert(out: Path, cls=transformers.BertModel) -> Path:
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    cls(config).save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """One word each, its list the class ('good' -> pos): short enough that a random tiny
    encoder's first token sees the word clearly."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos = rng.random() < 0.5
        rows.append({"text": rng.choice(POSITIVE if pos else NEGATIVE),
                     "label": "pos" if pos else "neg"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store holding the bare tiny BERT as ``tiny-bert``, and train / eval JSONL files."""
    root = tmp_path_factory.mktemp("tasks")
    base = tiny_bert(root / "bert-dir")
    write_jsonl(root / "train.jsonl", sentiment_rows(64, 0))
    write_jsonl(root / "eval.jsonl", sentiment_rows(16, 1))
    store = root / "store"
    hub_ok(store, "add", base, "--name", "tiny-bert")
    return root, store, base


def hub(store: Path, *args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--store", str(store), *map(str, args)])
    if result.exit_code not in (0, 2):
        raise result.exception
    return result.exit_code, result.output


def hub_ok(store: Path, *args) -> str:
    code, out = hub(store, *args)
    assert code == 0, out
    return out


def cls_config(root: Path, name: str, method: str = "full", extra: str = "",
               data: str = "path: train.jsonl, eval_path: eval.jsonl",
               output: str | None = None) -> Path:
    path = root / f"{name}.yaml"
    peft, lr = (LORA, LORA_LR) if method == "lora" else ("", "1.0e-2")
    path.write_text(f"base: tiny-bert\ntask_type: seq_cls\ndata: {{{data}}}\nmethod: {method}\n"
                    f"{peft}steps: 40\nbatch_size: 16\nlr: {lr}\n"
                    f"{extra}output: {output or f'{{store: {name}, dir: out-{name}}}'}\n")
    return path


def eval_loss(model: torch.nn.Module, rows: list[dict]) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy over ``rows`` as transformers computes it, and the logits."""
    enc = tokenizer()([r["text"] for r in rows], return_tensors="pt", padding=True)
    labels = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    with torch.no_grad():
        out = model.eval()(**enc, labels=labels)
    return float(out.loss), out.logits


@pytest.mark.parametrize("method", ["full", "lora"])
def test_classifier_trains_lands_in_the_store_with_its_head_and_exports(setup, method):
    """Through the CLI: the classifier learns the task, the entry is a fine-tune of the bare
    encoder plus the head (classifier.weight/.bias; the encoder keeps the base's names), the
    export loads with AutoModelForSequenceClassification with nothing missing, the labels
    named, and computes the recorded eval loss and the output dir's logits exactly. LoRA
    leaves every tensor it does not target equal to the base."""
    root, store, base = setup
    name = f"cls-{method}"
    out = hub_ok(store, "train", cls_config(root, name, method))
    assert f"'{name}' (finetune of 'tiny-bert')" in out
    with mergehub.Store(store) as s:
        info = s.show(name)
        assert info.provenance["trainer"]["task_type"] == "seq_cls"
        stored = s.open(name)
        names = {spec.name for spec in stored.specs()}
        base_names = {spec.name for spec in s.open("tiny-bert").specs()}
        assert names - base_names == {"classifier.weight", "classifier.bias"}
        if method == "lora":
            untouched = [n for n in base_names if not any(
                t in n for t in (".query.", ".value.", ".dense."))]
            assert untouched and all(torch.equal(stored.load(n), s.open("tiny-bert").load(n))
                                     for n in untouched)
    assert info.metrics["eval_accuracy"] == 1.0 and info.metrics["eval_loss"] < 0.5  # ln 2 at 0
    hub_ok(store, "export", name, "-o", root / f"exported-{name}")
    model, loading = transformers.AutoModelForSequenceClassification.from_pretrained(
        root / f"exported-{name}", output_loading_info=True)
    assert not any(loading.values()), loading
    assert model.config.id2label == {0: "neg", 1: "pos"}
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    loss, logits = eval_loss(model, rows)
    assert loss == pytest.approx(info.metrics["eval_loss"], rel=1e-4)
    dir_model = transformers.AutoModelForSequenceClassification.from_pretrained(
        root / f"out-{name}")
    assert torch.equal(logits, eval_loss(dir_model, rows)[1])


def test_classifier_lora_kept_as_an_adapter_carries_its_head(setup):
    """output.as: adapter keeps peft's adapter dir (LoRA factors plus the head as
    modules_to_save): stored as an adapter of the bare encoder, exported tensor for tensor,
    loadable by peft onto AutoModelForSequenceClassification with the trained head; hub merge
    refuses it in one line (the head is no LoRA delta)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    root, store, base = setup
    cfg = cls_config(root, "cls-adapter", "lora", output="{store: cls-adapter, "
                     "dir: out-cls-adapter, as: adapter}")
    assert "'cls-adapter' (adapter of 'tiny-bert')" in hub_ok(store, "train", cfg)
    hub_ok(store, "export", "cls-adapter", "-o", root / "exported-adapter")
    got = load_file(root / "exported-adapter" / "adapter_model.safetensors")
    want = load_file(root / "out-cls-adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    head = [n for n in got if "lora_" not in n]
    assert sorted(head) == ["base_model.model.classifier.bias",
                            "base_model.model.classifier.weight"]
    model = PeftModel.from_pretrained(
        transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2),
        root / "exported-adapter")
    assert torch.equal(model.base_model.model.classifier.weight,
                       got["base_model.model.classifier.weight"])
    (root / "merge.yaml").write_text("merge_method: task_arithmetic\nbase_model: tiny-bert\n"
                                     "models:\n  - model: cls-adapter\n")
    code, out = hub(store, "merge", root / "merge.yaml", "-o", root / "merged")
    assert code == 2 and out.count("\n") == 1 and "modules_to_save" in out, out


def test_sentence_pairs_get_segment_ids_and_labels_keep_the_given_order(setup, tmp_path):
    """``text_pair`` rows are encoded as the tokenizer encodes a pair (segment ids 1 on the
    second sentence); ``data.labels`` fixes the class order (integers read as their names)."""
    root, _, base = setup
    rows = [{"text": "the movie", "text_pair": "was good", "label": 1},
            {"text": "the film was", "text_pair": "bad", "label": 0}]
    path = str(write_jsonl(tmp_path / "p.jsonl", rows))
    data = build_dataset({"path": path, "eval_path": path, "labels": [1, 0]}, base, "seq_cls")
    assert data.labels == ["1", "0"]
    (batch,) = data.eval_batches()
    want = tokenizer()([r["text"] for r in rows], [r["text_pair"] for r in rows],
                       padding=True, return_tensors="pt")
    assert torch.equal(batch.input_ids, want["input_ids"])
    assert torch.equal(batch.token_type_ids, want["token_type_ids"])
    assert torch.equal(batch.attention_mask, want["attention_mask"])
    assert batch.labels.tolist() == [0, 1]


BAD = {
    "task type": ("task_type: seq_clss\n", "task_type must be one of", "did you mean"),
    "missing data": ("data: {path: nowhere.jsonl}\n", "nowhere.jsonl: cannot read", ""),
    "wrong label field": ("data: {path: sentiment.jsonl}\n",
                          "sentiment.jsonl:1: a classification row needs 'text' and 'label'", ""),
    "label outside data.labels": ("data: {path: train.jsonl, labels: [pos, neutral]}\n",
                                  "label 'neg' is not one of the classes", ""),
    "one class": ("data: {path: one.jsonl}\n", "at least two classes", ""),
    "labels on a causal LM": ("task_type: causal_lm\ndata: {path: train.jsonl, labels: [a, b]}\n",
                              "data labels applies to task_type seq_cls", ""),
    "synthetic task": ("data: {task: add1}\n", "needs data path", ""),
    "MLM head by LoRA": ("task_type: masked_lm\ndata: {path: train.jsonl}\nmethod: lora\n",
                         "has no masked-LM head", ""),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_or_data_is_refused_before_any_step_in_one_line(setup, monkeypatch, case):
    root, store, _ = setup
    write_jsonl(root / "sentiment.jsonl", [{"text": "the movie was good", "sentiment": "pos"}])
    write_jsonl(root / "one.jsonl", [{"text": "the movie was good", "label": "pos"}] * 3)
    monkeypatch.setattr(trainer.Method, "step", lambda *a: pytest.fail("a step ran"))
    override, message, hint = BAD[case]
    lines = cls_config(root, "bad", data="path: train.jsonl").read_text().splitlines(True)
    keys = {line.split(":")[0] for line in override.splitlines()}
    text = "".join(line for line in lines if line.split(":")[0] not in keys) + override
    (root / "bad.yaml").write_text(text)
    code, out = hub(store, "train", root / "bad.yaml")
    assert code == 2 and out.startswith("error: ") and out.count("\n") == 1, out
    assert message in out and hint in out
    assert not (root / "out-bad").exists()


def test_a_store_failure_after_training_keeps_the_result_and_names_where(setup, monkeypatch):
    """store.add fails after training: the error names where the trained classifier is (the
    output dir, else RUN_DIR/result), that model is the trained one, and the store has no
    entry. Run again (with checkpoints), training resumes at its last step and stores exactly
    the kept result."""
    from safetensors.torch import load_file

    root, store, _ = setup
    real_add = mergehub.Store.add

    def failing_add(self, path, name, **kw):
        if name.startswith("kept"):
            raise StoreError("disk full (injected)")
        return real_add(self, path, name, **kw)

    monkeypatch.setattr(mergehub.Store, "add", failing_add)
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    run_dir = root / ".hub-train-kept-run"
    configs = {name: cls_config(root, name, output=output, extra=extra) for name, output, extra in (
        ("kept-dir", None, ""), ("kept-run", "{store: kept-run}", "checkpoint_every: 20\n"))}
    for name, kept in (("kept-dir", root / "out-kept-dir"), ("kept-run", run_dir / "result")):
        code, out = hub(store, "train", configs[name])
        assert code == 2 and "disk full (injected)" in out, out
        assert out.strip().endswith(f"the trained result is kept in {kept}")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(kept)
        assert eval_loss(model, rows)[0] < 0.1  # trained (a zero head gives ln 2)
        with mergehub.Store(store) as s:
            assert name not in s
    kept = load_file(run_dir / "result" / "model.safetensors")
    monkeypatch.undo()
    out = hub_ok(store, "train", configs["kept-run"])
    assert "resuming from" in out and "(step 40," in out
    hub_ok(store, "export", "kept-run", "-o", root / "exported-kept-run")
    got = load_file(root / "exported-kept-run" / "model.safetensors")
    assert got.keys() == kept.keys() and all(torch.equal(got[n], kept[n]) for n in kept)
    assert not run_dir.exists()  # spent once the result is stored


def test_masked_lm_trains_an_encoder_with_its_head(tmp_path):
    """task_type masked_lm: a BertForMaskedLM base (its decoder tied to the word embeddings)
    trained fully and with LoRA lowers the held-out masked-token loss (fully, well below the
    ln |V| of a uniform guess), lands as a fine-tune / adapter of its base, and the fine-tune
    exports as an AutoModelForMaskedLM with nothing missing."""
    base = tiny_bert(tmp_path / "mlm", transformers.BertForMaskedLM)
    rng = random.Random(2)
    rows = [{"text": f"the {rng.choice(['movie', 'film', 'plot'])} was "
                     f"{rng.choice(POSITIVE + NEGATIVE)}"} for _ in range(96)]
    write_jsonl(tmp_path / "t.jsonl", rows[:64])
    write_jsonl(tmp_path / "e.jsonl", rows[64:])
    store = tmp_path / "store"
    hub_ok(store, "add", base, "--name", "mlm-base")
    for method, kind in (("full", "finetune"), ("lora", "adapter")):
        (tmp_path / f"{method}.yaml").write_text(
            "base: mlm-base\ntask_type: masked_lm\ndata: {path: t.jsonl, eval_path: e.jsonl, "
            f"mlm_probability: 0.3}}\nmethod: {method}\n"
            f"{LORA if method == 'lora' else ''}steps: 40\nbatch_size: 16\nlr: 1.0e-2\n"
            f"checkpoint_every: 10\noutput: {{store: mlm-{method}}}\n")
        out = hub_ok(store, "train", tmp_path / f"{method}.yaml")
        assert f"'mlm-{method}' ({kind} of 'mlm-base')" in out
        with mergehub.Store(store) as s:
            losses = [h["eval_loss"] for h in s.show(f"mlm-{method}").metrics["history"]]
        assert losses[-1] < losses[0], losses
        if method == "full":
            assert losses[-1] < 0.6 * math.log(len(VOCAB)), losses
    hub_ok(store, "export", "mlm-full", "-o", tmp_path / "exported")
    _, loading = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp_path / "exported", output_loading_info=True)
    assert not any(loading.values()), loading


def test_mezo_s_loss_sums_are_the_loss_transformers_computes_for_every_task(setup, tmp_path):
    """MeZO's closure returns (loss sum, count) so that ranks can add them up (issue 17):
    sum / count equals the model's own ``.loss`` for a classifier (per row), a masked LM (per
    masked token) and a causal LM (per next token), -100 labels left out; and MeZO trains the
    classifier through hub train."""
    from mergehub.adapters.data import token_loss
    from mergehub.hub.demo import TINY_LLAMA

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(VOCAB), (4, 7), generator=gen)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=48, num_labels=3)
    causal = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    masked = ids.clone()
    masked[:, ::2] = -100
    for model, labels, shift in [
            (transformers.BertForSequenceClassification(config), torch.tensor([0, 2, 1, 2]), False),
            (transformers.BertForMaskedLM(config), masked, False),
            (causal, torch.where(ids > 8, ids, -100), True)]:
        with torch.no_grad():
            out = model.eval()(input_ids=ids, labels=labels)
        total, count = token_loss(out.logits, labels, shift)
        assert int(count) == int((labels[:, 1:] if shift else labels).ne(-100).sum())
        assert float(total) / int(count) == pytest.approx(float(out.loss), rel=1e-6)
    root, store, _ = setup
    out = hub_ok(store, "train", cls_config(root, "cls-mezo", "mezo",
                                            output="{dir: out-cls-mezo}"))
    assert "trained 40 steps" in out
