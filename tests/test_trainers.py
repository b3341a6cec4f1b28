"""Trainers (issue 6): every method lowers the loss and lands in the store as an entry that
merge and export consume; sparse fine-tuning, 1-bit adapters and IncreLoRA keep their
invariants; an interrupted run resumes onto the uninterrupted run's loss curve."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import mergehub
from mergehub.adapters import onebit, sparse
from mergehub.adapters.config import ConfigError, load_config
from mergehub.adapters.data import BOS, SEP, SyntheticDataset
from mergehub.adapters.lora import IncreLoRA
from mergehub.adapters.trainer import evaluate, train
from mergehub.hub.demo import dir_digests

#: per method: learning rate and extra config that make it learn in ~30 CPU steps
SETUPS = {
    "full": (1e-3, {}),
    "lora": (1e-2, {"peft": {"r": 4, "lora_alpha": 8}}),
    "ia3": (5e-2, {"peft": {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                            "feedforward_modules": ["down_proj"]}}),
    "dora": (1e-2, {"peft": {"r": 4, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}}),
    "incrlora": (1e-2, {"method_params": {"init_r": 1, "budget": 20, "grow_every": 4, "warmup": 4}}),
    "sparse": (1e-2, {"method_params": {"density": 0.05, "fisher_batches": 2}}),
    "onebit": (1e-2, {"peft": {"r": 4, "lora_alpha": 8}}),
    "mezo": (1e-3, {}),
    "sparse_mezo": (2e-3, {"method_params": {"density": 0.5}}),
    "mezo-adapter": (2e-2, {"method_params": {"over": "adapter", "eps": 1e-2},
                            "peft": {"r": 4, "lora_alpha": 8}}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two (and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(base, tmp_path, setup: str, **extra):
    lr, more = SETUPS[setup]
    method = {"ia3": "lora", "dora": "lora", "mezo-adapter": "mezo"}.get(setup, setup)
    cfg = {"base": str(base), "data": {"task": "copy", "eval_examples": 32}, "method": method,
           "steps": 30, "batch_size": 16, "lr": lr, "seed": 0,
           "run_dir": str(tmp_path / f"run-{setup}"), **more}
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    """Every method trained once into one store (and an output dir)."""
    root = tmp_path_factory.mktemp("trained")
    store = mergehub.Store.init(root / "store")
    store.add(models["base-bf16"], "base", progress=False)
    out = {}
    for setup in SETUPS:
        out[setup] = train(config("base", root, setup,
                                  output={"store": setup, "dir": str(root / "out" / setup)}),
                           store=store, progress=False)
    yield store, out, root
    store.close()


def results_dir(trained, setup):
    """The weights file a full-model method wrote to its output dir."""
    return trained[2] / "out" / setup / "model.safetensors"


@pytest.mark.parametrize("setup", list(SETUPS))
def test_each_method_lowers_the_loss_and_is_stored(trained, setup):
    store, results, root = trained
    r = results[setup]
    first, last = sum(r.losses[:5]) / 5, sum(r.losses[-5:]) / 5
    assert last < first - 0.02, (setup, r.losses)
    info = store.show(setup)
    assert info.base == "base"
    assert info.metrics["step"] == 30 and info.metrics["loss"] == pytest.approx(sum(r.losses[-10:]) / 10)
    assert [h["step"] for h in info.metrics["history"]] == [3 * i for i in range(1, 11)]
    assert info.provenance["trainer"]["method"] == load_config(
        config("base", root, setup, output={"store": "x"})).method
    # plain LoRA-family results are adapters; DoRA / IA3 are merged into the base (hub merge
    # cannot read them as deltas); the rest are fine-tunes (deltas of the base)
    adapter = setup in ("lora", "incrlora", "onebit", "mezo-adapter")
    assert info.kind == ("adapter" if adapter else "finetune")
    # export gives back the output dir bit for bit
    exported = store.export(setup, root / "export" / setup, progress=False)
    assert dir_digests(exported) == dir_digests(root / "out" / setup)


def test_stored_results_merge(trained, tmp_path):
    """Store entries of every method are merge inputs; metric_weighted reads their metrics."""
    store, results, _ = trained
    names = list(SETUPS)
    recipe = tmp_path / "ta.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                      + "".join(f"  - model: {n}\n    parameters: {{weight: 0.1}}\n" for n in names))
    mergehub.merge(recipe, store=store, to_store="all-methods", progress=False, echo=lambda t: None)
    assert store.show("all-methods").kind == "merged"
    recipe = tmp_path / "mwa.yaml"
    recipe.write_text("merge_method: metric_weighted\nbase_model: base\nmodels:\n"
                      "  - model: full\n  - model: sparse\nparameters: {metric: loss, penalty: 1}\n")
    mergehub.merge(recipe, tmp_path / "mwa", store=store, progress=False, echo=lambda t: None)
    from mergehub.merge.methods.metric_weighted import mwa_weights

    losses = [store.show(n).metrics["loss"] for n in ("full", "sparse")]
    w = mwa_weights(losses, "loss", 1.0)
    merged = load_file(tmp_path / "mwa" / "model.safetensors")
    full = load_file(results_dir(trained, "full"))
    sp = load_file(results_dir(trained, "sparse"))
    name = "model.layers.0.mlp.up_proj.weight"
    expect = (w[0] * full[name].float() + w[1] * sp[name].float()).to(torch.bfloat16)
    assert (merged[name].float() - expect.float()).abs().max() <= 2 ** -7 * expect.float().abs().max()


def test_sparse_changes_only_masked_entries(trained, models):
    """Outside the mask the saved weights are bit-identical to the base; inside, at most
    density * numel entries per tensor changed."""
    base = load_file(models["base-bf16"] / "model.safetensors")
    tuned = load_file(results_dir(trained, "sparse"))
    changed_total = 0
    for name, b in base.items():
        t = tuned[name]
        changed = int((b.view(torch.int16) != t.view(torch.int16)).sum())
        if b.dim() < 2:
            assert changed == 0, name  # norms are not selected by default
        assert changed <= max(1, round(0.05 * b.numel())), name
        changed_total += changed
    assert changed_total > 0
    assert trained[1]["sparse"].facts["sparse_entries"] >= changed_total


def test_sparse_mask_holds_under_weight_decay():
    """Only the masked values are parameters: AdamW's weight decay cannot touch the rest."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    w0 = lin.weight.detach().clone()
    batches = [{"x": torch.randn(4, 16)} for _ in range(2)]

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return type("Out", (), {"loss": self.lin(x).pow(2).mean()})()

    model = Wrap()
    params = sparse.select(model, r"weight$", None)
    masks = sparse.fisher_masks(model, params, batches, density=0.1)
    assert masks["lin.weight"].numel() == round(0.1 * 128)
    values = sparse.attach(model, masks)
    opt = torch.optim.AdamW(list(values.values()), lr=0.1, weight_decay=0.5)
    for b in batches * 3:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    sparse.detach(model)
    w = lin.weight.detach().reshape(-1)
    inside = torch.zeros(w.numel(), dtype=torch.bool)
    inside[masks["lin.weight"]] = True
    assert torch.equal(w[~inside].view(torch.int32), w0.reshape(-1)[~inside].view(torch.int32))
    assert (w[inside] != w0.reshape(-1)[inside]).all()


def test_onebit_two_values_per_group_and_packed_round_trip(trained):
    root = trained[2] / "out" / "onebit"
    tensors = load_file(root / "adapter_model.safetensors")
    assert tensors
    for name, t in tensors.items():
        for row in t.float():
            assert row.unique().numel() <= 2, name
    assert any(row.unique().numel() == 2 for t in tensors.values() for row in t.float())
    unpacked = onebit.unpack(root / onebit.PACKED_FILE)
    assert unpacked.keys() == tensors.keys()
    for name, t in tensors.items():  # the adapter is saved in the base's bf16
        assert torch.equal(unpacked[name].to(t.dtype), t), name
    n = sum(t.numel() for t in tensors.values())
    assert (root / onebit.PACKED_FILE).stat().st_size < n / 8 + 4 * 2 * 4 * len(tensors) + 4096


def test_onebit_scale_is_l2_optimal_and_gradient_passes_straight_through():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=gen) * 0.3 + 0.1
    for mean in (True, False):
        wq, alpha, mu = onebit.quantize(w, "row", mean)
        signs = torch.where(w - mu[:, None] >= 0, 1.0, -1.0)
        for i in range(w.shape[0]):
            grid = alpha[i] * torch.linspace(0.5, 1.5, 201)
            errors = ((w[i] - (grid[:, None] * signs[i] + mu[i])) ** 2).sum(1)
            best = ((w[i] - wq[i]) ** 2).sum()
            assert best <= errors.min() + 1e-6
            assert wq[i].unique().numel() == 2
        assert torch.allclose(alpha, (w - mu[:, None]).abs().mean(1))
    latent = w.clone().requires_grad_(True)
    c = torch.randn(6, 40, generator=gen)
    (onebit.SignQuant("row", True)(latent) * c).sum().backward()
    assert torch.equal(latent.grad, c)
    wq_matrix = onebit.quantize(w, "matrix", True)[0]
    assert wq_matrix.unique().numel() == 2


def _peft_lora(base, r=1):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def test_incrlora_growth_keeps_the_output_and_respects_the_budget(models):
    torch.manual_seed(0)
    model = _peft_lora(models["base-bf16"])
    grower = IncreLoRA(model, init_r=1, budget=6, grow_every=1, grow_modules=3, warmup=0,
                       beta=0.5, init_std=0.5, seed=0)
    for layer in grower.layers.values():  # non-zero B, so the adapter already acts
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    ids = torch.tensor([[BOS, 20, 1, 2, 3, 4, 5, 6, 7, 8, SEP]])
    before = model(input_ids=ids).logits
    scaling = {n: layer.scaling["default"] for n, layer in grower.layers.items()}
    grower.scores = {n: float(i) for i, n in enumerate(grower.layers)}
    assert grower.total_rank() == 4
    grown = grower.maybe_grow(0)
    assert len(grown) == 2 and grower.total_rank() == 6  # capped by the budget, not by grow_modules
    after = model(input_ids=ids).logits
    assert torch.allclose(after, before, atol=1e-6, rtol=0)
    assert {n: layer.scaling["default"] for n, layer in grower.layers.items()} == scaling
    assert grower.maybe_grow(1) == [] and grower.total_rank() == 6


def test_incrlora_adapter_reloads_with_peft(trained, models):
    """The saved adapter (rank_pattern, alpha_pattern) gives the trained model's eval loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = trained[2] / "out" / "incrlora"
    side = json.loads((root / "incrlora_config.json").read_text())
    assert side["total_rank"] <= side["budget"] == 20
    assert side["total_rank"] > 4 * 1 * 2 or side["history"]  # it grew
    steps = [h["step"] for h in side["history"]]
    assert steps == sorted(steps)
    config = json.loads((root / "adapter_config.json").read_text())
    assert sum(config["rank_pattern"].values()) == side["total_rank"]
    model = AutoModelForCausalLM.from_pretrained(models["base-bf16"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, root)
    trained_eval = trained[1]["incrlora"].metrics["eval_loss"]
    # the adapter is saved in bf16: the reloaded model differs by bf16 rounding of A and B
    assert evaluate(peft_model, SyntheticDataset(["copy"], 32))["eval_loss"] == \
        pytest.approx(trained_eval, abs=2e-3)


@pytest.mark.parametrize("setup", ["lora", "incrlora", "sparse", "mezo"])
def test_resume_continues_the_same_loss_curve(models, tmp_path, setup):
    base = models["base-bf16"]
    extra = {"steps": 12, "checkpoint_every": 4}
    full = train(config(base, tmp_path / "a", setup, output={"dir": str(tmp_path / "a-out")},
                        **extra), progress=False)
    cfg = config(base, tmp_path / "b", setup, output={"dir": str(tmp_path / "b-out")}, **extra)
    stopped = train(cfg, progress=False, stop_after=7)
    assert stopped.interrupted and stopped.last_checkpoint.name == "checkpoint-0000004"
    assert stopped.losses == full.losses[:7]
    resumed = train(cfg, progress=False)
    assert resumed.resumed_from == 4
    assert resumed.losses == full.losses
    assert dir_digests(tmp_path / "a-out") == dir_digests(tmp_path / "b-out")
    assert not (tmp_path / "b" / f"run-{setup}").exists()  # checkpoints removed once done


def test_checkpoint_of_another_config_is_refused(models, tmp_path):
    cfg = config(models["base-bf16"], tmp_path, "lora", steps=8, checkpoint_every=4,
                 output={"dir": str(tmp_path / "out")})
    train(cfg, progress=False, stop_after=5)
    with pytest.raises(ConfigError, match="another config"):
        train({**cfg, "lr": 0.5}, progress=False)
    assert train({**cfg, "lr": 0.5}, progress=False, resume=False).steps == 8


def test_config_errors_name_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    cases = [
        ("base: b\ndata: {task: copy}\nmethod: lora\nstpes: 3\noutput: {dir: o}\n", ":4: unknown key 'stpes'", "steps"),
        ("base: b\ndata: {task: copy}\nmethod: sparse\nmethod_params:\n  densty: 0.1\noutput: {dir: o}\n",
         ":5: unknown key 'densty' in method_params of sparse", "density"),
        ("base: b\ndata: {task: copy}\nmethod: lorra\noutput: {dir: o}\n", ":3: unknown method 'lorra'", "lora"),
        ("base: b\ndata: {task: copy, path: x.jsonl}\nmethod: lora\noutput: {dir: o}\n", ":2: data needs exactly one", ""),
        ("base: b\ndata: {task: copy}\nmethod: full\nsteps: 0\noutput: {dir: o}\n", ":4: steps must be an integer >= 1", ""),
        ("base: b\ndata: {task: copy}\nmethod: full\npeft: {r: 4}\noutput: {dir: o}\n", ":4: method full does not train", ""),
        ("base: b\ndata: {task: copy}\nmethod: full\n", "output needs 'store'", ""),
        ("base: b\ndata: {task: copy}\nmethod: mezo\nmethod_params:\n  objective: acc\noutput: {dir: o}\n",
         ":5: objective must be 'loss' or 'token_error'", ""),
        ("base: b\ndata: {task: copy}\nmethod: sparse_mezo\nmethod_params:\n  eps: 0.01\n  sparsity: 0.25\n"
         "output: {dir: o}\n", ":6: sparse_mezo parameter 'sparsity' was renamed 'density'", "fraction"),
    ]
    for text, fragment, hint in cases:
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert f"{path}" in str(e.value) and fragment in str(e.value), str(e.value)
        assert hint in str(e.value)


def test_bad_peft_option_is_a_clear_error(models, tmp_path):
    cfg = config(models["base-bf16"], tmp_path, "lora", output={"dir": str(tmp_path / "o")},
                 peft={"r": 4, "lora_alpah": 8})
    with pytest.raises(ConfigError, match="lora_alpah"):
        train(cfg, progress=False)


def test_jsonl_prompt_completion_with_token_ids(models, tmp_path):
    """JSONL rows train on the completion only; without a tokenizer, token ids are accepted."""
    rows = [{"prompt_ids": [BOS, 20, i % 16], "completion_ids": [i % 16, (i + 1) % 16]}
            for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (tmp_path / "text.jsonl").write_text('{"text": "hello"}\n')
    cfg = {"base": str(models["base-bf16"]), "data": {"path": "train.jsonl", "eval_path": "eval.jsonl"},
           "method": "lora", "peft": {"r": 4}, "steps": 20, "batch_size": 8, "lr": 2e-2,
           "output": {"dir": "out"}}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    r = train(tmp_path / "c.yaml", progress=False)
    assert r.history[-1]["eval_loss"] < r.history[0]["eval_loss"]
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    cfg["data"] = {"path": "text.jsonl"}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    with pytest.raises(mergehub.MergehubError, match=r"text.jsonl:1: text needs a tokenizer"):
        train(tmp_path / "c.yaml", progress=False)


def test_hub_train_cli_store_merge_export(models, tmp_path):
    from click.testing import CliRunner

    from mergehub.hub.cli import cli

    runner = CliRunner()
    store = str(tmp_path / "store")

    def hub(*args, code=0):
        result = runner.invoke(cli, ["--store", store, *map(str, args)])
        assert result.exit_code == code, (result.output, result.exception)
        return result.output

    hub("add", models["base-bf16"], "--name", "base")
    cfg = tmp_path / "train.yaml"
    cfg.write_text("base: base\ndata: {task: add1, eval_examples: 16}\nmethod: lora\n"
                   "peft: {r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}\n"
                   "steps: 10\nbatch_size: 8\nlr: 1.0e-2\ncheckpoint_every: 4\n"
                   "output: {store: add1-lora}\n")
    out = hub("train", cfg, "--stop-after", 6)
    assert "stopped after step 6" in out and "checkpoint-0000004" in out
    out = hub("train", cfg)
    assert "trained 10 steps" in out and "'add1-lora' (adapter of 'base')" in out
    shown = json.loads(hub("show", "add1-lora", "--json"))
    assert shown["provenance"]["trainer"]["resumed_from_step"] == 4
    assert math.isfinite(shown["metrics"]["loss"])
    (tmp_path / "r.yaml").write_text("merge_method: task_arithmetic\nbase_model: base\n"
                                     "models:\n  - model: add1-lora\n")
    assert "merged" in hub("merge", tmp_path / "r.yaml", "-o", tmp_path / "merged")
    hub("export", "add1-lora", "-o", tmp_path / "exported")
    assert (tmp_path / "exported" / "adapter_model.safetensors").is_file()
    out = hub("train", cfg, code=2)
    assert out.startswith("error: ") and "already exists" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: base\ndata: {task: add1}\nmethod: lora\nbatch: 4\noutput: {store: x}\n")
    out = hub("train", bad, code=2)
    assert out.startswith(f"error: {bad}:4: unknown key 'batch'")
    assert "--stop-after" in hub("train", "--help")


def test_evaluate_matches_the_model_loss_and_accuracy(models):
    """evaluate()'s one-forward loss and scores equal transformers' loss and accuracy()."""
    from transformers import AutoModelForCausalLM

    from mergehub.adapters.data import accuracy

    model = AutoModelForCausalLM.from_pretrained(models["base-bf16"], dtype=torch.float32)
    data = SyntheticDataset(["reverse"], 40)
    (batch,) = data.eval_batches()
    got = evaluate(model, data)
    assert got["eval_loss"] == pytest.approx(float(model(**batch.kwargs()).loss), rel=1e-5)
    assert (got["eval_exact_match"], got["eval_token_accuracy"]) == accuracy(
        model, batch.input_ids, batch.labels)


def _tiny_opt(out, dropout: float):
    """A tiny OPT (seed 0, so the same weights for every ``dropout``) whose config sets dropout,
    attention dropout and layer drop to ``dropout``."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=64, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                       dropout=dropout, attention_dropout=dropout, layerdrop=dropout)
    OPTForCausalLM(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("method", ["mezo", "sparse_mezo"])
def test_mezo_evaluates_in_eval_mode(tmp_path, method):
    """MeZO's reference (large_models/trainer.py, zo_forward) evaluates L(θ±εz) in eval mode,
    "Dropout is turned off too": the same weights with dropout 0.0 and 0.5 in an OPT config
    train bit-identically (in train mode the two passes would see different masks)."""
    runs = []
    for p in (0.0, 0.5):
        out = tmp_path / f"out-{p}"
        r = train({"base": str(_tiny_opt(tmp_path / f"opt-{p}", p)), "data": {"task": "copy"},
                   "method": method, "steps": 3, "batch_size": 8, "lr": 1e-3, "seed": 0,
                   "run_dir": str(tmp_path / f"run-{p}"), "output": {"dir": str(out)}},
                  progress=False)
        runs.append((r.losses, load_file(out / "model.safetensors")))
    (losses0, w0), (losses5, w5) = runs
    assert losses0 == losses5
    assert w0.keys() == w5.keys() and all(torch.equal(w0[k], w5[k]) for k in w0)


def test_mezo_over_an_adapter_evaluates_without_lora_dropout(models, tmp_path):
    """The same holds for peft's lora_dropout with ``over: adapter``."""
    runs = []
    for p in (0.0, 0.5):
        out = tmp_path / f"out-{p}"
        cfg = config(models["base-bf16"], tmp_path / str(p), "mezo-adapter", steps=3,
                     output={"dir": str(out)})
        cfg["peft"] = {**cfg["peft"], "lora_dropout": p}
        r = train(cfg, progress=False)
        runs.append((r.losses, load_file(out / "adapter_model.safetensors")))
    (losses0, w0), (losses5, w5) = runs
    assert losses0 == losses5
    assert all(torch.equal(w0[k], w5[k]) for k in w0)
