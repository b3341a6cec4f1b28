"""End-to-end merges of real tiny checkpoints: recipes, inputs of every kind, errors, outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import merge_reference as ref
import mergehub
from mergehub.errors import BaseMismatchError, InputError, MergehubError
from mergehub.hub.cli import cli
from mergehub.merge.recipe import RecipeError, resolve_value
from mergehub.storage.checkpoint import open_checkpoint
from mergehub.storage.store import Store


def recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def load_all(path: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    return {n: ckpt.load(n) for n in ckpt.tensors}


def test_ties_end_to_end_matches_reference(models, tmp_path):
    r = recipe(tmp_path, f"""
merge_method: ties
base_model: {models['base-bf16']}
models:
  - model: {models['ft-mlp']}
    parameters: {{weight: 1.0, density: 0.3}}
  - model: {models['ft-attn']}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {models['ft-sharded']}
    parameters: {{weight: 2.0, density: 0.2}}
parameters: {{lambda: 0.9}}
dtype: float32
out_dtype: float32
""")
    result = mergehub.merge(r, out=tmp_path / "out", progress=False)
    assert result.tensors == 21
    out = load_all(tmp_path / "out")
    base = load_all(models["base-bf16"])
    fts = [load_all(models[k]) for k in ("ft-mlp", "ft-attn", "ft-sharded")]
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        b = base[name].float().reshape(-1).tolist()
        taus = [(f[name].float() - base[name].float()).reshape(-1).tolist() for f in fts]
        expected = ref.ties(b, taus, [1.0, 0.5, 2.0], [0.3, 0.5, 0.2], 0.9)
        assert torch.allclose(out[name].reshape(-1), torch.tensor(expected), atol=1e-6), name
    assert out[name].dtype == torch.float32
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_lora_delta_equals_peft_merge_and_unload(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["base-bf16"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, models["lora"]).merge_and_unload().state_dict()
    r = recipe(tmp_path, f"""
merge_method: task_arithmetic
base_model: {models['base-bf16']}
models: [{{model: {models['lora']}}}]
out_dtype: float32
""")
    mergehub.merge(r, out=tmp_path / "out", output_format="hf", progress=False)
    out = load_all(tmp_path / "out")
    changed = 0
    for name, tensor in out.items():
        assert torch.allclose(tensor, merged[name], atol=1e-6), name
        changed += not torch.equal(tensor, load_all(models["base-bf16"])[name].float())
    assert changed == 4  # q_proj and v_proj of 2 layers


def test_store_inputs_and_output(models, tmp_path):
    with Store.init(tmp_path / "store") as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["ft-mlp"], "mlp", base="base", metrics={"loss": 0.5}, progress=False)
        store.add(models["lora"], "lora", base="base", progress=False)
        text = """
merge_method: task_arithmetic
base_model: base
models:
  - model: mlp
  - model: lora
    parameters: {weight: 0.5}
parameters: {lambda: 0.7}
"""
        result = mergehub.merge(text, out=tmp_path / "out", store=store, to_store="merged",
                                progress=False)
        assert result.store_name == "merged"
        info = store.show("merged")
        assert info.kind == "merged" and info.base == "base"
        assert info.provenance["merge_method"] == "task_arithmetic"
        assert "lambda: 0.7" in info.provenance["recipe"]
        exported = store.export("merged", tmp_path / "exported", progress=False)
        assert load_all(exported).keys() == load_all(tmp_path / "out").keys()
        for name, t in load_all(exported).items():
            assert torch.equal(t, load_all(tmp_path / "out")[name])
        # to_store alone writes no directory
        mergehub.merge(text, store=store, to_store="merged2", progress=False)
        assert "merged2" in store and store.verify(progress=False).ok


def test_metric_weighted_reads_trainer_state(models, tmp_path):
    import shutil

    ckpts = []
    for i, (key, loss) in enumerate((("ft-mlp", 0.8), ("ft-attn", 1.6))):
        d = tmp_path / f"ckpt{i}"
        shutil.copytree(models[key], d)
        (d / "trainer_state.json").write_text(json.dumps(
            {"global_step": 100 * (i + 1), "log_history": [{"loss": 9.0}, {"loss": loss}]}))
        ckpts.append(d)
    r = recipe(tmp_path, f"""
merge_method: metric_weighted
models: [{{model: {ckpts[0]}}}, {{model: {ckpts[1]}}}]
parameters: {{metric: loss, penalty: 1}}
out_dtype: float32
""")
    mergehub.merge(r, out=tmp_path / "out", progress=False)
    out = load_all(tmp_path / "out")
    a, b = load_all(ckpts[0]), load_all(ckpts[1])
    w = ref.mwa_weights([0.8, 1.6], "loss", 1)  # 2/3, 1/3
    for name in out:
        assert torch.allclose(out[name], w[0] * a[name].float() + w[1] * b[name].float(), atol=1e-6)


def test_gradient_and_filter_parameters(models, tmp_path):
    r = recipe(tmp_path, f"""
merge_method: task_arithmetic
base_model: {models['base-bf16']}
models:
  - model: {models['ft-mlp']}
    parameters:
      weight: [{{filter: down_proj, value: 0}}, {{value: [0, 1]}}]
out_dtype: float32
""")
    mergehub.merge(r, out=tmp_path / "out", progress=False)
    out, base, ft = load_all(tmp_path / "out"), load_all(models["base-bf16"]), load_all(models["ft-mlp"])
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"].float())
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], ft["model.layers.1.mlp.up_proj.weight"].float())
    assert torch.equal(out["model.layers.1.mlp.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"].float())


def test_resolve_value_like_mergekit():
    # mergekit 0.1.5 on 5 layers: weight [{filter: mlp, value: [0,1,0.5]}, {filter: q_proj, value: 7},
    # {value: [10, 20]}] gave mlp 0, .5, 1, .75, .5; q_proj 7; others 10..20; embed/norm/head 10
    value = [{"filter": "mlp", "value": [0, 1, 0.5]}, {"filter": "self_attn.q_proj", "value": 7},
             {"value": [10, 20]}]
    mlp = [resolve_value(value, f"model.layers.{i}.mlp.up_proj.weight", 5) for i in range(5)]
    assert mlp == [0, 0.5, 1, 0.75, 0.5]
    assert resolve_value(value, "model.layers.3.self_attn.q_proj.weight", 5) == 7
    assert [resolve_value(value, f"model.layers.{i}.input_layernorm.weight", 5) for i in range(5)] \
        == [10, 12.5, 15, 17.5, 20]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert resolve_value(value, name, 5) == 10
    assert resolve_value([{"filter": "nothing", "value": 1}], "x", 1) is None


def test_dry_run_writes_nothing(models, tmp_path):
    r = recipe(tmp_path, f"""
merge_method: ties
base_model: {models['base-bf16']}
models: [{{model: {models['ft-mlp']}, parameters: {{density: 0.2}}}}]
""")
    lines = []
    result = mergehub.merge(r, out=tmp_path / "out", dry_run=True, echo=lines.append)
    assert result.out is None and not (tmp_path / "out").exists()
    assert "method: ties" in lines[-1] and "output: 21 tensors" in lines[-1]


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nbase_model: B\nmodels: [{model: F}]\nparamters: {}\n",
     r"recipe.yaml:4: unknown key 'paramters' \(did you mean 'parameters'\?\)"),
    ("merge_method: tis\nbase_model: B\nmodels: [{model: F}]\n",
     r"recipe.yaml:1: unknown merge_method 'tis' \(did you mean 'ties'\?\)"),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: F\n    parameters:\n      weight: 1\n"
     "      densty: 0.2\n", r"recipe.yaml:7: unknown parameter 'densty' .*did you mean 'density'"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: F}]\nparameters: {lamda: 1}\n",
     r"recipe.yaml:4: unknown parameter 'lamda' for merge_method ties \(did you mean 'lambda'\?\)"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: F}]\nslices: []\n",
     r"recipe.yaml:4: 'slices': layer slicing"),
    ("merge_method: ties\nmodels: [{model: F}]\n", r"ties needs a base_model"),
    ("merge_method: ties\nbase_model: B\nmodels: []\n", r"models: must be a non-empty list"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: F}\n", r"recipe.yaml:\d+: not valid YAML"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: F}]\nparameters: {trim_scope: all}\n",
     r"recipe.yaml:4: ties parameter trim_scope must be one of 'tensor', 'global', not 'all'"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: F}]\nparameters: {density_tolerance: 0.5}\n",
     r"density_tolerance must be a number in \[0, 0.5\), not 0.5"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: F}]\n"
     "parameters: {density_tolerance: 0.1, trim_scope: global}\n",
     r"density_tolerance applies to trim_scope: tensor"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: F}]\ndtype: float8\n",
     r"recipe.yaml:4: dtype 'float8' is not one of"),
])
def test_recipe_errors_name_the_line(models, tmp_path, text, message):
    text = text.replace(" B\n", f" {models['base-bf16']}\n").replace("model: F", f"model: {models['ft-mlp']}")
    with pytest.raises(RecipeError, match=message):
        mergehub.merge(recipe(tmp_path, text), out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_input_is_clear(models, tmp_path):
    r = recipe(tmp_path, f"merge_method: ties\nbase_model: {models['base-bf16']}\n"
                         "models:\n  - model: some-model\n")
    with pytest.raises(InputError, match=r"recipe.yaml:4: input 'some-model' is neither a "
                                         r"local path nor a Hub repo \(write org/name"):
        mergehub.merge(r, out=tmp_path / "out", progress=False)


def _variant(models, tmp_path, name: str, edit) -> Path:
    tensors = load_all(models["ft-mlp"])
    edit(tensors)
    d = tmp_path / name
    d.mkdir()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_bytes((models["ft-mlp"] / "config.json").read_bytes())
    return d


def test_missing_and_mismatched_tensors(models, tmp_path):
    head = "lm_head.weight"
    missing = _variant(models, tmp_path, "missing", lambda t: t.pop(head))
    resized = _variant(models, tmp_path, "resized", lambda t: t.update({head: torch.zeros(300, 64, dtype=torch.bfloat16)}))
    extra = _variant(models, tmp_path, "extra", lambda t: t.update({"score.weight": torch.zeros(2, 64, dtype=torch.bfloat16)}))
    for variant, message in ((missing, f"has no tensor '{head}'"),
                             (resized, rf"tensor '{head}' has shape \[300, 64\] but the base has \[256, 64\]"),
                             (extra, "has tensor 'score.weight', which the base lacks")):
        r = recipe(tmp_path, f"merge_method: task_arithmetic\nbase_model: {models['base-bf16']}\n"
                             f"models:\n  - model: {models['ft-attn']}\n  - model: {variant}\n")
        out_dir = tmp_path / f"out-{variant.name}"
        with pytest.raises(BaseMismatchError, match=rf"recipe.yaml:5: input '{variant}' .*{message}.*missing=\"take-base\""):
            mergehub.merge(r, out=out_dir, progress=False)
        assert not out_dir.exists()
        notes = []
        mergehub.merge(r, out=out_dir, missing="take-base", progress=False, echo=notes.append)
        assert any(variant.name in n for n in notes)
        out, base = load_all(out_dir), load_all(models["base-bf16"])
        if variant != extra:
            assert torch.equal(out[head], base[head])
        assert "score.weight" not in out


def test_lora_target_missing_from_base(models, tmp_path):
    other = _variant(models, tmp_path, "renamed", lambda t: t.update(
        {"model.layers.0.self_attn.q_proj_renamed.weight": t.pop("model.layers.0.self_attn.q_proj.weight")}))
    r = recipe(tmp_path, f"merge_method: task_arithmetic\nbase_model: {other}\n"
                         f"models:\n  - model: {models['lora']}\n")
    with pytest.raises(BaseMismatchError, match="LoRA targets 'model.layers.0.self_attn.q_proj.weight', "
                                                "which the base .* does not have"):
        mergehub.merge(r, out=tmp_path / "out", progress=False)


def test_non_float_tensors_copied_and_failure_leaves_nothing(tmp_path):
    base = {"w": torch.randn(4, 4), "ids": torch.arange(4)}
    ft = {"w": base["w"] + 1, "ids": torch.arange(4)}
    for name, t in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(t, tmp_path / name / "model.safetensors")
    r = recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: ft}]\n"
                         "parameters: {lambda: 0.5}\n".replace("base\n", f"{tmp_path / 'base'}\n")
               .replace("model: ft", f"model: {tmp_path / 'ft'}"))
    mergehub.merge(r, out=tmp_path / "out", progress=False)
    out = load_all(tmp_path / "out")
    assert torch.equal(out["ids"], base["ids"]) and torch.allclose(out["w"], base["w"] + 0.5)
    bad = recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'base'}\n"
                           f"    parameters: {{weight: 1}}\n  - model: {tmp_path / 'ft'}\n"
                           f"    parameters: {{weight: -1}}\n")
    with pytest.raises(MergehubError, match="tensor 'w': linear: .*weights sum to 0"):
        mergehub.merge(bad, out=tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")]


@pytest.mark.parametrize("ties", ["index", "threshold"])
def test_ties_global_trim_end_to_end(models, tmp_path, ties):
    """trim_scope: global over a bf16 fine-tune keeps what the oracle's trim of the whole
    flattened task vector (tensors in the base's order) keeps, and reports that count."""
    r = recipe(tmp_path, f"""
merge_method: ties
base_model: {models['base-bf16']}
models:
  - model: {models['ft-mlp']}
    parameters: {{density: 0.1}}
parameters: {{trim_scope: global, ties: {ties}}}
out_dtype: float32
""")
    result = mergehub.merge(r, out=tmp_path / "out", progress=False)
    out, base = load_all(tmp_path / "out"), load_all(models["base-bf16"])
    ft = load_all(models["ft-mlp"])
    taus = torch.cat([(ft[n].float() - base[n].float()).reshape(-1) for n in base])
    merged = torch.cat([(out[n] - base[n].float()).reshape(-1) for n in base])
    k = ref.kept_count(0.1, taus.numel())
    want = torch.from_numpy(ref.top_k_mask(taus.numpy(), k) if ties == "index"
                            else ref.threshold_mask(taus.numpy(), k))
    assert torch.equal(merged != 0, want & (taus != 0))
    assert torch.allclose(merged[merged != 0], taus[merged != 0], atol=1e-7)
    assert result.report["kept"].kept == [int(want.sum())]
    assert (int(want.sum()) == k) if ties == "index" else (int(want.sum()) > k)


@pytest.mark.parametrize("params", ["{density: [0.1, 0.9]}",
                                    "{density: [{filter: mlp, value: 0.2}, {value: 0.1}]}",
                                    "{density: 0.1, weight: [{filter: mlp, value: 2.0}, "
                                    "{value: 1.0}]}"])
def test_global_trim_refuses_gradients_and_filters(models, tmp_path, params):
    """A global trim sees the whole task vector at one density per model: a density gradient
    or filter (a value per layer or tensor) is refused with one line naming the recipe,
    nothing written (it used to be taken at its first value: the check ran before the trim
    existed); a weight may still vary by layer (it scales what the cut kept)."""
    r = recipe(tmp_path, f"merge_method: ties\nbase_model: {models['base-bf16']}\nmodels:\n"
                         f"  - model: {models['ft-mlp']}\n    parameters: {params}\n"
                         "parameters: {trim_scope: global}\n")
    res = CliRunner().invoke(cli, ["--store", str(tmp_path / "store"), "merge", str(r),
                                   str(tmp_path / "out")])
    if "weight" in params:
        assert res.exit_code == 0, res.output
        return
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert (f"error: {r}: merge_method ties with these global parameters needs one plain "
            "density per model (its pre-pass sees the whole model at once), not a gradient or "
            "filter") in res.output
    assert not (tmp_path / "out").exists()


def test_a_finished_prepass_passes_no_more(models, tmp_path, monkeypatch):
    """The global trim's pre-pass results stay with the plan's method (its ``Prepass``): a
    second merger of the same plan (what a Ray task or the Composer's remembered plan is)
    reads no chunk in its pre-pass, and merges the first merger's bits, which are those of a
    fresh ``hub merge`` of the recipe."""
    from mergehub.merge.plan import plan_merge
    from mergehub.merge.recipe import load_recipe
    from mergehub.merge.tensors import TensorMerger

    r = recipe(tmp_path, f"""
merge_method: ties
base_model: {models['base-bf16']}
models:
  - model: {models['ft-mlp']}
    parameters: {{density: 0.1}}
  - model: {models['ft-attn']}
    parameters: {{density: 0.3}}
parameters: {{trim_scope: global}}
""")
    plan = plan_merge(load_recipe(r))
    first = TensorMerger(plan, chunk_elements=1000)
    first.prepass()
    want = {s.name: torch.cat([p.reshape(-1) for p in first.merged(s)]) for s in plan.specs}
    second = TensorMerger(plan, chunk_elements=1000)
    reads = []
    chunks = second._chunks
    monkeypatch.setattr(second, "_chunks", lambda spec, *a: reads.append(spec.name)
                        or chunks(spec, *a))
    second.prepass()
    assert not reads
    fresh = load_all(mergehub.merge(r, out=tmp_path / "out", progress=False).out)
    for spec in plan.specs:
        got = torch.cat([p.reshape(-1) for p in second.merged(spec)])
        assert torch.equal(got, want[spec.name]), spec.name
        assert torch.equal(fresh[spec.name].reshape(-1), got), spec.name


def test_a_prepass_cut_short_starts_over(models, tmp_path, monkeypatch):
    """A pre-pass that fails part-way (a read error, Ctrl-C) forgets its partial counts: the
    same plan's next pre-pass (the Composer's remembered plan) gives a fresh merge's bits."""
    from mergehub.merge.plan import plan_merge
    from mergehub.merge.recipe import load_recipe
    from mergehub.merge.tensors import TensorMerger

    r = recipe(tmp_path, f"merge_method: ties\nbase_model: {models['base-bf16']}\nmodels:\n"
                         f"  - model: {models['ft-mlp']}\n    parameters: {{density: 0.1}}\n"
                         "parameters: {trim_scope: global}\n")
    plan = plan_merge(load_recipe(r))
    merger = TensorMerger(plan, chunk_elements=1000)
    chunks, seen = merger._chunks, []

    def failing(spec, *a):
        seen.append(spec.name)
        if len(seen) == 5:
            raise OSError("read error")
        return chunks(spec, *a)

    monkeypatch.setattr(merger, "_chunks", failing)
    with pytest.raises(OSError):
        merger.prepass()
    monkeypatch.setattr(merger, "_chunks", chunks)
    merger.prepass()
    fresh = load_all(mergehub.merge(r, out=tmp_path / "out", progress=False).out)
    for spec in plan.specs:
        got = torch.cat([p.reshape(-1) for p in merger.merged(spec)])
        assert torch.equal(fresh[spec.name].reshape(-1), got), spec.name


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_density_zero_keeps_nothing(models, tmp_path, scope):
    """Density 0 trims every entry in both scopes: the merge is the base (the global scope
    used to keep each task's largest entry)."""
    r = recipe(tmp_path, f"merge_method: ties\nbase_model: {models['base-bf16']}\nmodels:\n"
                         f"  - model: {models['ft-mlp']}\n    parameters: {{density: 0.0}}\n"
                         f"parameters: {{trim_scope: {scope}}}\n")
    out = load_all(mergehub.merge(r, out=tmp_path / "out", progress=False).out)
    for name, t in load_all(models["base-bf16"]).items():
        assert torch.equal(out[name], t), name


@pytest.mark.parametrize("method, extra, word", [
    ("ties", "", "exactly"), ("ties", ", ties: threshold", "at least"),
    ("ties", ", density_tolerance: 0.3", "about"), ("breadcrumbs", "", "exactly"),
    ("dare_ties", "", "about")])
def test_kept_share_in_dry_run_and_summary(models, tmp_path, method, extra, word):
    """``--dry-run`` says how many task-vector entries each input's sparsification will keep,
    the merge summary how many it kept: k = int(d·n) per tensor, exactly, with ``ties:
    index`` (bf16 deltas tie at nearly every cut); at least that with ``threshold``."""
    from mergehub.ops.selection import kth_rank

    r = recipe(tmp_path, f"merge_method: {method}\nbase_model: {models['base-bf16']}\nmodels:\n"
                         f"  - model: {models['ft-mlp']}\n    parameters: {{density: 0.2}}\n"
                         f"  - model: {models['ft-attn']}\n    parameters: {{density: 0.4}}\n"
                         f"parameters: {{lambda: 1.0{extra}}}\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["merge", str(r), "--dry-run"])
    assert res.exit_code == 0, res.output
    base = load_all(models["base-bf16"])
    sizes = [t.numel() for n, t in base.items() if t.is_floating_point()]
    plans = [sum(kth_rank(d, n) for n in sizes) for d in (0.2, 0.4)]
    if method == "breadcrumbs":
        plans = [sum(int(d * n) for n in sizes) for d in (0.2, 0.4)]
    line = next(x for x in res.output.splitlines() if x.startswith("sparsification will keep"))
    assert line.startswith(f"sparsification will keep {word}: ")
    if word != "about":
        assert all(f"({p:,} of {sum(sizes):,})" in line for p in plans), line
    res = runner.invoke(cli, ["merge", str(r), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("sparsification kept"))
    result = mergehub.merge(r, out=tmp_path / "again", progress=False)
    kept = result.report["kept"].kept
    assert f"({kept[0]:,} of {sum(sizes):,})" in line
    if word == "exactly":
        assert kept == plans
    elif word == "at least":
        assert all(k > p for k, p in zip(kept, plans))  # ties at the cut are all kept
    else:
        assert all(abs(k - p) < 0.3 * sum(sizes) for k, p in zip(kept, plans))


def test_cli_merge(models, tmp_path):
    r = recipe(tmp_path, f"merge_method: dare_ties\nbase_model: {models['base-bf16']}\n"
                         f"models:\n  - model: {models['ft-mlp']}\n    parameters: {{density: 0.5}}\n"
                         f"  - model: {models['ft-attn']}\n    parameters: {{density: 0.5}}\n")
    runner = CliRunner()
    res = runner.invoke(cli, ["merge", str(r), "-o", str(tmp_path / "a"), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "merged 21 tensors" in res.output
    runner.invoke(cli, ["merge", str(r), "-o", str(tmp_path / "b"), "--seed", "3"])
    runner.invoke(cli, ["merge", str(r), "-o", str(tmp_path / "c"), "--seed", "4"])
    a, b, c = (load_all(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)
    res = runner.invoke(cli, ["merge", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "d")])
    assert res.exit_code == 2 and "error: " in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["merge", str(r), "--dry-run"])
    assert res.exit_code == 0 and "method: dare_ties" in res.output


def test_lora_only_task_arithmetic_writes_peft_adapter(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergehub.hub.demo import make_lora

    base = models["base-fp32"]
    l1 = make_lora(base, tmp_path / "l1", rank=2, seed=21)
    l2 = make_lora(base, tmp_path / "l2", rank=3, seed=22, target_modules=("q_proj", "o_proj"))
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            f"  - model: {l1}\n    parameters: {{weight: 0.7}}\n  - model: {l2}\n"
            f"parameters: {{lambda: 0.5}}\n")
    result = mergehub.merge(text, out=tmp_path / "peft", output_format="peft", progress=False)
    assert result.format == "peft"
    files = sorted(p.name for p in result.out.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert config["r"] == 5 and config["rank_pattern"]  # q_proj: 2 + 3; v_proj 2, o_proj 3
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, result.out).merge_and_unload().state_dict()
    dense = mergehub.merge(text, out=tmp_path / "dense", output_format="hf", progress=False)
    assert not (dense.out / "adapter_config.json").exists()
    for name, t in load_all(dense.out).items():
        assert torch.allclose(merged[name], t, atol=1e-6), name
    with pytest.raises(InputError, match='output_format="peft" needs every input to be a LoRA'):
        mergehub.merge(text.replace("merge_method: task_arithmetic", "merge_method: ties"), out=tmp_path / "x",
                       output_format="peft", progress=False)


@pytest.mark.parametrize("method, extra", [
    ("task_arithmetic", "parameters: {lambda: 0.7, normalize: true}"),
    ("ties", "parameters: {lambda: 0.9}"),
    ("ties", "parameters: {rescale: true}"),  # no fused form: merged in chunks
    ("ties", "parameters: {trim_scope: global, sign_method: count}"),
    ("ties", "parameters: {density_tolerance: 0.3}"),  # the MLP's and embeddings' from a sample
    ("consensus_task_arithmetic", "parameters: {k: 1}"),
    ("consensus_ties", "parameters: {k: 1, lambda: 1.5}"),
])
def test_fused_path_equals_chunked_path(models, tmp_path, monkeypatch, method, extra):
    """The whole-tensor path through mergehub.kernels.merge_tensor (the GPU path; on CPU its
    torch reference) gives the chunked path's output."""
    from mergehub import kernels
    from mergehub.merge.engine import execute
    from mergehub.merge.plan import plan_merge
    from mergehub.merge.recipe import load_recipe

    calls = []
    real = kernels.merge_tensor
    monkeypatch.setattr(kernels, "merge_tensor", lambda *a, **k: calls.append(k) or real(*a, **k))

    density = (", density: 0.3", ", density: 0.6") if "ties" in method else ("", "")
    r = recipe(tmp_path, f"merge_method: {method}\nbase_model: {models['base-bf16']}\nmodels:\n"
                         f"  - model: {models['ft-mlp']}\n    parameters: {{weight: 1.0{density[0]}}}\n"
                         f"  - model: {models['ft-attn']}\n    parameters: {{weight: 0.5{density[1]}}}\n"
                         f"{extra}\n")
    outs = {}
    for fused in (False, True):
        plan = plan_merge(load_recipe(r))
        execute(plan, tmp_path / f"out-{fused}", progress=False, fused=fused, chunk_elements=1000)
        outs[fused] = load_all(tmp_path / f"out-{fused}")
        assert bool(calls) == (fused and "rescale" not in extra)
    assert outs[True].keys() == outs[False].keys()
    changed = 0
    for name, chunked in outs[False].items():
        assert outs[True][name].dtype == chunked.dtype
        torch.testing.assert_close(outs[True][name], chunked, rtol=0, atol=0, msg=name)
        changed += int(not torch.equal(chunked, load_all(models["base-bf16"])[name]))
    assert changed > 0


def test_fused_path_reads_compressed_store_entries(models, tmp_path):
    """Store inputs (lossless and lossy) go through Source.raw / StoredModel.load on the fused
    path and give the chunked path's output."""
    from mergehub.merge.engine import execute
    from mergehub.merge.plan import plan_merge
    from mergehub.merge.recipe import load_recipe

    store = Store(tmp_path / "store", create=True)
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "mlp", base="base", progress=False)
    store.add(models["ft-attn"], "attn", base="base", progress=False)
    store.compress("mlp", "bit1", progress=False)
    store.compress("attn", "compeft", {"density": 0.2}, progress=False)
    text = ("merge_method: ties\nbase_model: base\nmodels:\n"
            "  - model: mlp-bit1\n    parameters: {density: 0.5}\n"
            "  - model: attn-compeft\n    parameters: {density: 0.5, weight: 0.7}\n"
            "  - model: attn\n    parameters: {density: 0.3}\n")
    outs = []
    for fused in (False, True):
        execute(plan_merge(load_recipe(text), store=store), tmp_path / f"o{fused}",
                progress=False, fused=fused, chunk_elements=1000)
        outs.append(load_all(tmp_path / f"o{fused}"))
    for name, chunked in outs[0].items():
        assert torch.equal(outs[1][name], chunked), name


def test_density_tolerance_samples_tensors(models, tmp_path):
    """``density_tolerance`` changes the trim of tensors large enough to sample (a sample's
    threshold may also hit the exact one), nothing else."""
    from mergehub.ops.selection import sample_positions

    outs = {}
    for tol in (0, 0.3):
        r = recipe(tmp_path, f"merge_method: ties\nbase_model: {models['base-bf16']}\nmodels:\n"
                             f"  - model: {models['ft-mlp']}\n    parameters: {{density: 0.3}}\n"
                             f"parameters: {{density_tolerance: {tol}}}\n")
        outs[tol] = load_all(mergehub.merge(r, out=tmp_path / f"o{tol}", progress=False).out)
    differ = {name for name, t in outs[0].items() if not torch.equal(t, outs[0.3][name])}
    sampled = {name for name, t in outs[0].items() if "mlp" in name
               and sample_positions(t.numel(), 0.3) is not None}
    assert differ and differ <= sampled


def test_store_name_beats_a_folder_of_the_same_name(models, tmp_path, monkeypatch):
    """A name the store has is its entry even beside a folder of that name (also a name with a
    slash); ``./name`` is the folder."""
    from mergehub.storage.store import Store

    monkeypatch.chdir(tmp_path)
    shutil.copytree(models["ft-attn"], tmp_path / "ft")  # a folder called ft ...
    with Store.init(tmp_path / "store") as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["ft-mlp"], "ft", base="base", progress=False)  # ... and an entry
        store.add(models["ft-mlp"], "org/ft", base="base", progress=False)
        outs = {}
        for ref in ("ft", "./ft", "org/ft"):
            r = recipe(tmp_path, f"merge_method: task_arithmetic\nbase_model: base\n"
                                 f"models:\n  - model: {ref}\n")
            outs[ref] = load_all(mergehub.merge(r, out=tmp_path / f"o{len(outs)}", store=store,
                                                progress=False).out)
    for name, t in load_all(models["ft-mlp"]).items():
        assert torch.equal(outs["ft"][name], t) and torch.equal(outs["org/ft"][name], t), name
    for name, t in load_all(models["ft-attn"]).items():
        assert torch.equal(outs["./ft"][name], t), name


def test_store_merge_decodes_each_blob_once(models, tmp_path, monkeypatch):
    """A merge of store entries decodes every blob it reads once: the base tensor that the
    fine-tunes' lossless deltas reference is decoded for the base and then reused, not decoded
    again for each fine-tune (issue 15, item 4: store merges were ~3x slower than folders).
    The output is the same as from the folders."""
    with Store.init(tmp_path / "store") as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["ft-mlp"], "mlp", base="base", progress=False)
        store.add(models["ft-attn"], "attn", base="base", progress=False)
        deltas = store._db.execute("SELECT COUNT(*) FROM blobs WHERE ref IS NOT NULL").fetchone()
        assert deltas[0] > 0  # the fine-tunes' changed tensors are deltas against the base's
        decoded: list[str] = []
        open_for_read = Store._open_for_read  # every decode opens its blob there

        def counting(self, blob_id, *args, **kwargs):
            decoded.append(blob_id)
            return open_for_read(self, blob_id, *args, **kwargs)

        monkeypatch.setattr(Store, "_open_for_read", counting)
        recipe = ("merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n"
                  "  - model: {}\n    parameters: {{weight: 0.5}}\n")
        mergehub.merge(recipe.format("base", "mlp", "attn"), out=tmp_path / "stored",
                       store=store, progress=False)
        twice = {b for b in decoded if decoded.count(b) > 1}
        assert decoded and not twice, f"{len(twice)} blobs decoded more than once"
        assert store._reuse is None  # kept only while the merge runs
    mergehub.merge(recipe.format(models["base-bf16"], models["ft-mlp"], models["ft-attn"]),
                   out=tmp_path / "folders", progress=False)
    stored, folders = load_all(tmp_path / "stored"), load_all(tmp_path / "folders")
    assert stored.keys() == folders.keys()
    assert all(torch.equal(stored[n], folders[n]) for n in stored)


def test_store_reads_decode_into_no_numpy_arrays_of_huge_page_size(tmp_path, monkeypatch):
    """Decoding a large lossless tensor, whole (a merge's read) or a chunk at a time (an
    export's), and its delta against the base, allocates no numpy array of 4 MiB or more:
    numpy advises huge pages for those, and the kernel may compact memory at their first
    write (1.27-1.74 s against 0.75-0.86 s for a first merge of store entries, issue 15,
    item 4; see codec.new_buffer). The bytes are exact."""
    import numpy as np
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(0)
    weights = {"w": torch.randn(3 << 20, generator=gen)}  # 12 MiB of float32
    for name, scale in (("base", 0.0), ("ft", 0.01)):
        (tmp_path / name).mkdir()
        save_file({k: v + scale * torch.randn(v.shape, generator=gen) for k, v in weights.items()},
                  tmp_path / name / "model.safetensors")
    with Store.init(tmp_path / "store") as store:
        store.add(tmp_path / "base", "base", progress=False)
        store.add(tmp_path / "ft", "ft", base="base", progress=False)
        empty = np.empty

        def small_only(shape, *args, **kwargs):
            out = empty(shape, *args, **kwargs)
            assert out.nbytes < 4 << 20, f"a numpy array of {out.nbytes} bytes"
            return out

        monkeypatch.setattr(np, "empty", small_only)
        for name in ("base", "ft"):
            truth = load_file(tmp_path / name / "model.safetensors")["w"]
            model = store.open(name)
            assert torch.equal(model.load("w"), truth)
            pieces = b"".join(bytes(p) for p in model.iter_bytes("w"))
            assert pieces == truth.numpy().tobytes()


def test_reused_bytes_are_dropped_after_their_last_expected_read(models, tmp_path):
    """Store.reusing keeps a base tensor's decoded bytes only until every read that
    shared_blobs counted has had them (a merge then holds a base tensor while its fine-tunes
    are read, not the whole base); a read beyond the count decodes again, to the same bytes."""
    with Store.init(tmp_path / "store") as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["ft-mlp"], "mlp", base="base", progress=False)
        store.add(models["ft-attn"], "attn", base="base", progress=False)
        reads = store.shared_blobs(["base", "mlp", "attn"])
        base, mlp, attn = (store.open(n) for n in ("base", "mlp", "attn"))
        name = next(n for n in (s.name for s in base.specs()) if base.blob(n) != mlp.blob(n))
        # read three times: as the base's, as the reference of mlp's delta, as attn's own
        # (attn leaves this tensor as it is: the base's blob)
        assert attn.blob(name) == base.blob(name) and reads[base.blob(name)] == 3
        with store.reusing(reads):
            kept = store._reuse
            first = base.load(name).clone()
            assert base.blob(name) in kept.held
            mlp.load(name)
            assert base.blob(name) in kept.held
            attn.load(name)  # the last read counted
            assert base.blob(name) not in kept.held and kept.size == sum(
                len(b) for b in kept.held.values())
            assert torch.equal(base.load(name), first)  # decoded again


def test_lora_merge_writes_a_model_by_default_and_an_adapter_that_finds_its_base(models,
                                                                                 tmp_path):
    """``hub merge -o`` of LoRA inputs writes the whole model by default (what the README
    promises), a PEFT adapter with ``--format peft``, and its output line says which. The
    adapter's base_model_name_or_path is where the base came from (the folder a store base
    was added from, an absolute path for a path base), not the store's name nor what the input
    adapter said, so that peft's AutoPeftModel loads it alone (issue 15, item 3)."""
    from peft import AutoPeftModelForCausalLM

    from mergehub.hub.demo import make_lora

    base = models["base-fp32"]
    lora = make_lora(base, tmp_path / "lora", rank=2, seed=21)
    config = json.loads((lora / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "base"  # a store name, as `hub train` used to write
    (lora / "adapter_config.json").write_text(json.dumps(config))
    runner = CliRunner()
    store = str(tmp_path / "store")
    for args in (("add", base, "-n", "base"), ("add", lora, "-n", "lora", "--base", "base")):
        assert runner.invoke(cli, ["--store", store, *map(str, args)]).exit_code == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                      "  - model: lora\nparameters: {lambda: 0.5}\n")

    def merge(out, *more):
        res = runner.invoke(cli, ["--store", store, "merge", str(recipe), "-o", str(out), *more])
        assert res.exit_code == 0, res.output
        return res.output.strip().splitlines()[-1]

    assert merge(tmp_path / "dense").endswith(f"into {tmp_path / 'dense'}: an HF model dir")
    assert (tmp_path / "dense" / "model.safetensors").is_file()
    assert not (tmp_path / "dense" / "adapter_config.json").exists()
    assert merge(tmp_path / "adapter", "--format", "peft").endswith(": a PEFT adapter of the base")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(base)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").merge_and_unload()
    merged = model.state_dict()
    for name, t in load_all(tmp_path / "dense").items():
        assert torch.allclose(merged[name], t, atol=1e-6), name
    # a base given by a relative path: the adapter names it absolutely (peft would read a
    # relative one from wherever it runs)
    relative = Path(os.path.relpath(base))
    out = mergehub.merge(f"merge_method: task_arithmetic\nbase_model: {relative}\nmodels:\n"
                         f"  - model: {lora}\n", out=tmp_path / "p2", output_format="peft",
                         progress=False)
    assert json.loads((out.out / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(base.absolute())


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", "{lambda: 0.7}"),
    ("ties", "{lambda: 0.9}"),
    ("ties", "{rescale: true}"),
    ("dare_ties", "{lambda: 1.1}"),
    ("breadcrumbs", "{normalize: false}"),
])
def test_tensors_merged_at_once_give_the_bits_of_one_at_a_time(models, tmp_path, method, params):
    """On the CPU, ``hub merge`` merges as many tensors at once as torch has threads, each on
    a thread of its own (TensorMerger.map_tensors). Inputs of every kind (a folder, a store
    entry read through its deltas, a compressed one, a LoRA) give the same bytes and the same
    kept counts as one tensor after another, and the merges did run on several threads; a
    tensor above ALONE_BYTES is merged alone, in chunks, on torch's own threads."""
    import threading

    from mergehub.merge import tensors
    from mergehub.merge.tensors import TensorMerger

    with Store.init(tmp_path / "store") as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["ft-mlp"], "mlp", base="base", progress=False)
        store.add(models["ft-attn"], "attn", base="base", progress=False)
        store.compress("attn", "bit1", progress=False)
        density = "" if method == "task_arithmetic" else ", density: 0.4"
        text = (f"merge_method: {method}\nbase_model: base\nmodels:\n"
                f"  - model: mlp\n    parameters: {{weight: 1.0{density}}}\n"
                f"  - model: attn-bit1\n    parameters: {{weight: 0.6{density}}}\n"
                f"  - model: {models['ft-sharded']}\n    parameters: {{weight: 0.8{density}}}\n"
                f"  - model: {models['lora']}\n    parameters: {{weight: 0.5{density}}}\n"
                f"parameters: {params}\n")
        ran: list[tuple[str, int]] = []  # (thread, its torch threads) of each tensor's merge
        merged = TensorMerger.merged

        def recording(self, spec, raw=None):
            ran.append((threading.current_thread().name, torch.get_num_threads()))
            yield from merged(self, spec, raw)

        before = torch.get_num_threads()
        sizes = sorted({s.nbytes for s in store.open("base").specs()})
        outs, kept, where = {}, {}, {}
        try:
            # one thread; three; three with the larger tensors merged alone (ALONE_BYTES)
            for run, n, ahead in (("1", 1, None), ("3", 3, None), ("3-alone", 3, sizes[-2])):
                torch.set_num_threads(n)
                ran.clear()
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(TensorMerger, "merged", recording)
                    if ahead is not None:
                        mp.setattr(tensors, "ALONE_BYTES", ahead)
                    result = mergehub.merge(text, out=tmp_path / run, store=store,
                                            progress=False)
                outs[run] = {p.name: p.read_bytes() for p in (tmp_path / run).iterdir()}
                kept[run] = result.report and result.report["kept"]
                where[run] = set(ran)
        finally:
            torch.set_num_threads(before)
    assert outs["1"] == outs["3"] == outs["3-alone"]
    assert kept["1"] == kept["3"] == kept["3-alone"]
    assert len({name for name, _ in where["3"]}) >= 2  # several workers ...
    assert {n for _, n in where["3"]} == {1}  # ... each on one torch thread
    assert ("MainThread", 3) in where["3-alone"]  # the largest alone, on torch's threads
    assert len({name for name, _ in where["3-alone"]}) >= 3  # the others at once
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads", [1, 2])
def test_store_merge_with_a_damaged_input_fails_and_writes_nothing(tmp_path, threads):
    """A fine-tune's blob that decodes to other bytes than its original fails the merge
    (naming the entry and tensor) and leaves no output, whether the merge takes a tensor at a
    time (the hash checked on a thread of its own, before the rename) or several at once (each
    tensor hashed on the thread that decodes it)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(4)
    for name in ("base", "ft"):
        (tmp_path / name).mkdir()
        save_file({"big": torch.randn(3 << 16, generator=gen),
                   "small": torch.randn(64, generator=gen)},
                  str(tmp_path / name / "model.safetensors"))
    previous = torch.get_num_threads()
    with Store.init(tmp_path / "store") as store:
        store.add(tmp_path / "base", "base", progress=False)
        store.add(tmp_path / "ft", "ft", base="base", progress=False)
        (blob,) = store._db.execute(
            "SELECT t.blob FROM tensors t JOIN models m ON t.model_id = m.id "
            "WHERE m.name = 'ft' AND t.name = 'big'").fetchone()
        path = store._blob_path(blob)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # the random values were stored as they are: still decodes
        path.write_bytes(bytes(data))
        torch.set_num_threads(threads)
        try:
            with pytest.raises(MergehubError, match="model 'ft', tensor 'big': blob .* decodes "
                                                    "to bytes whose sha256 does not match"):
                mergehub.merge("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                               "  - model: ft\n", out=tmp_path / "out", store=store,
                               progress=False)
        finally:
            torch.set_num_threads(previous)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "store"]
