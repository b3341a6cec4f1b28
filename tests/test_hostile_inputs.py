"""Hostile and malformed inputs: each is refused with one line naming the file, tensor or
recipe line (the CLI: ``error: ...``, exit status 2), never a traceback, a hang, a
gigabyte-sized message or a silently broken result.

The inputs are fixtures built here byte by byte: alias bombs, duplicate keys, non-finite and
out-of-range parameters, unknown safetensors dtypes, deeply nested JSON, bad adapter
configs, pickle weights for ``hub train``, and fine-tunes merged against another base.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import mergehub
from mergehub.adapters.config import ConfigError, load_config
from mergehub.errors import BaseMismatchError, InputError
from mergehub.hub.cli import cli
from mergehub.merge.methods import METHODS
from mergehub.merge.recipe import RecipeError, load_recipe
from mergehub.safejson import MAX_JSON_DEPTH, parse_json
from mergehub.storage.checkpoint import open_checkpoint
from mergehub.storage.store import Store

# --- building hostile inputs ----------------------------------------------------------------


def run_hub(*args: object) -> tuple[int, str]:
    """``hub ARGS`` through click's runner: (exit status, stdout + stderr)."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *fragments: str) -> str:
    """Exit status 2 and exactly one line ``error: ...`` containing every fragment."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, output[:2000])
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def raw_safetensors(path: Path, header: bytes | str, data: bytes = b"") -> Path:
    """A file with exactly this header text (no checks, no padding)."""
    head = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def nested(depth: int) -> str:
    """JSON nesting ``depth`` lists: ``[[[...]]]``."""
    return "[" * depth + "]" * depth


def alias_bomb(levels: int, width: int = 10) -> str:
    """YAML whose last anchor expands to width**levels strings through aliases of aliases
    (a few hundred bytes of text)."""
    lines = [f"  a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two unrelated bases, a fine-tune of the first and a LoRA adapter for it (files of a few
    hundred bytes: ``layer.weight`` is 4x4 float32, ``layer.bias`` ones)."""
    root = tmp_path_factory.mktemp("tiny")
    gen = torch.Generator().manual_seed(0)
    base_a = torch.randn(4, 4, generator=gen)
    out = {}
    for name, w in {"base-a": base_a, "base-b": torch.randn(4, 4, generator=gen),
                    "ft-a": base_a + 0.1}.items():
        tensors = {"layer.weight": w, "layer.bias": torch.ones(4)}
        out[name] = root / f"{name}.safetensors"
        save_file(tensors, out[name])
    out["lora"] = lora_dir(root / "lora", {"r": 2, "lora_alpha": 4, "peft_type": "LORA"})
    return out


def lora_dir(path: Path, config: dict | str, rank: int = 2) -> Path:
    """A PEFT LoRA dir for ``layer.weight`` with ``config`` (a dict, or the raw JSON text)."""
    path.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (path / "adapter_config.json").write_text(text)
    gen = torch.Generator().manual_seed(1)
    save_file({"base_model.model.layer.lora_A.weight": torch.randn(rank, 4, generator=gen),
               "base_model.model.layer.lora_B.weight": torch.randn(4, rank, generator=gen)},
              path / "adapter_model.safetensors")
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- item 5: YAML alias bombs and unbounded error messages -----------------------------------

def test_alias_bomb_recipe_is_refused_at_once(tmp_path):
    # 6 levels of 10: a million strings from ~500 bytes; the first thing to look at dtype used
    # to repr() them all into the message (5 MB here; 9 levels took 7 GB and minutes)
    text = "merge_method: linear\nmodels: [x]\nparameters:\n" + alias_bomb(6) + "dtype: *a6\n"
    assert len(text) < 600
    path = write(tmp_path, "bomb.yaml", text)
    start = time.perf_counter()
    code, output = run_hub("--store", tmp_path / "store", "merge", path, "-o", tmp_path / "out")
    line = assert_one_line_error(code, output, f"{path}:", "aliases expand")
    assert len(line) < 300 and time.perf_counter() - start < 5
    assert not (tmp_path / "out").exists()


def test_alias_bomb_training_config_is_refused(tmp_path):
    path = write(tmp_path, "train.yaml", "base: b\ndata: {task: copy}\nmethod: lora\n"
                 "output: {dir: o}\nmethod_params:\n" + alias_bomb(6) + "peft: *a6\n")
    with pytest.raises(ConfigError, match="aliases expand") as e:
        load_config(path)
    assert len(str(e.value)) < 300


def test_recursive_alias_and_deep_nesting_are_refused():
    with pytest.raises(RecipeError, match="r.yaml:1: not valid YAML: a recursive alias"):
        load_recipe("a: &a [*a]\nmerge_method: linear\n", source="r.yaml")
    for depth in (40, 5000):  # past the limit; past Python's recursion limit
        with pytest.raises(RecipeError, match="nested deeper than 32 levels"):
            load_recipe(f"merge_method: linear\nmodels: {nested(depth)}\n", source="r.yaml")
    with pytest.raises(RecipeError, match="not valid YAML: Exceeds the limit"):
        load_recipe("merge_method: linear\nmodels: [x]\nparameters: {lambda: " + "9" * 5000
                    + "}\n", source="r.yaml")


def test_small_aliases_still_work(tmp_path, tiny):
    text = (f"merge_method: task_arithmetic\nbase_model: {tiny['base-a']}\n"
            f"models:\n  - model: {tiny['ft-a']}\n    parameters: &p {{weight: 0.5}}\n"
            f"  - model: {tiny['ft-a']}\n    parameters: *p\n")
    out = tmp_path / "out"
    mergehub.merge(write(tmp_path, "r.yaml", text), out=out, progress=False)
    merged = open_checkpoint(out).load("layer.weight")
    base, ft = (open_checkpoint(tiny[k]).load("layer.weight") for k in ("base-a", "ft-a"))
    assert torch.allclose(merged, base + (ft - base), atol=1e-6)  # 0.5 + 0.5 of the delta


@pytest.mark.parametrize("text, where", [
    ("merge_method: {m}\nmodels: [x]\n", "r.yaml:1: merge_method: must be a method name"),
    ("merge_method: linear\nmodels: [{m}]\n", "r.yaml:2: models: a model reference has at"),
    ("merge_method: linear\nmodels: [{{model: {m}}}]\n", "r.yaml:2: model: must be a path"),
    ("merge_method: {{m: 1}}\nmodels: [x]\n", "r.yaml:1: merge_method: must be a method name"),
    ("merge_method: linear\nmodels: [x]\nparameters:\n  ? {m}\n  : 1\n",
     "r.yaml:4: unknown parameter"),
    ("merge_method: linear\nmodels:\n  - model: x\n    ? {m}\n    : 1\n", "r.yaml:4: unknown key"),
    ("merge_method: linear\nmodels: [x]\ndtype: {m}\n", "r.yaml:3: dtype"),
    ("merge_method: linear\n? {m}\n: 1\nmodels: [x]\n", "r.yaml:2: unknown key"),
])
def test_error_messages_show_a_bounded_part_of_huge_values(text, where):
    """A 200 kB name is shown in at most a few dozen characters, and did-you-mean does not run
    difflib over it (quadratic: minutes for a few hundred kB)."""
    huge = "q" * 200_000
    start = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        mergehub.merge(load_recipe(text.format(m=huge), source="r.yaml"), out="unused",
                       progress=False, dry_run=True)
    assert str(e.value).startswith(where) and len(str(e.value)) < 300, str(e.value)[:300]
    assert time.perf_counter() - start < 5


# --- item 21 (second half): duplicate YAML keys ----------------------------------------------

@pytest.mark.parametrize("text, line, key", [
    ("merge_method: ties\nbase_model: b\nmerge_method: linear\nmodels: [x]\n", 3, "merge_method"),
    ("merge_method: ties\nmodels:\n  - model: x\n    parameters: {weight: 1, weight: 2}\n", 4,
     "weight"),
    ("merge_method: ties\nmodels:\n  - model: x\n    model: y\n", 4, "model"),
])
def test_duplicate_recipe_keys_are_errors(tmp_path, text, line, key):
    path = write(tmp_path, "r.yaml", text)
    code, output = run_hub("--store", tmp_path / "store", "merge", path, "-o", tmp_path / "out")
    assert_one_line_error(code, output, f"{path}:{line}: not valid YAML: duplicate key '{key}'")


def test_duplicate_training_config_keys_are_errors(tmp_path):
    path = write(tmp_path, "t.yaml", "base: b\ndata: {task: copy}\nmethod: lora\nsteps: 5\n"
                 "output: {dir: o}\nsteps: 500\n")
    with pytest.raises(ConfigError, match=r"t.yaml:6: not valid YAML: duplicate key 'steps' "
                                          r"\(first on line 4\)"):
        load_config(path)


def test_merge_keys_may_override_what_they_merge():
    recipe = load_recipe("merge_method: linear\nmodels:\n  - model: x\n    parameters:\n"
                         "      <<: {weight: 1}\n      weight: 2\n", source="r.yaml")
    assert recipe.models[0].parameters == {"weight": 2}


# --- items 9 and 18: the recipe's parameter schema -------------------------------------------

@pytest.mark.parametrize("method, model_params, global_params, message", [
    ("task_arithmetic", "{weight: .nan}", "{}", "weight must be a finite number, not nan"),
    ("task_arithmetic", "{weight: .inf}", "{}", "weight must be a finite number, not inf"),
    ("task_arithmetic", "{weight: 1}", "{lambda: -.inf}", "lambda must be a finite number"),
    ("task_arithmetic", "{weight: [0, .nan]}", "{}",
     "weight must be a finite number (or a list of them), not nan in the list"),
    ("task_arithmetic", "{weight: [{filter: mlp, value: .nan}, {value: 1}]}", "{}",
     "weight must be a finite number, not nan"),
    ("task_arithmetic", "{weight: [{filter: 3, value: 1}]}", "{}",
     "weight filters must be text, not 3"),
    ("task_arithmetic", "{weight: [{filter: mlp}]}", "{}", "weight filter entries must be"),
    ("task_arithmetic", "{weight: true}", "{}", "weight must be a finite number, not True"),
    ("ties", "{density: .nan}", "{}", "density must be a number in [0, 1], not nan"),
    ("ties", "{density: -0.1}", "{}", "density must be a number in [0, 1], not -0.1"),
    ("ties", "{density: 1.5}", "{}", "density must be a number in [0, 1], not 1.5"),
    ("ties", "{density: 0.5}", "{normalize: yes please}",
     "normalize must be true or false, not 'yes please'"),
    ("dare_ties", "{density: 2}", "{}", "density must be a number in [0, 1], not 2"),
    ("dare_linear", "{density: 0.5}", "{rescale: l2}",
     "rescale must be one of true, false, 'l1', not 'l2'"),
    ("breadcrumbs", "{density: 0.5, gamma: -1}", "{}", "gamma must be a number in [0, 1]"),
    ("consensus_ties", "{density: 0.5}", "{k: -5}", "k must be an integer >= 0, not -5"),
    ("consensus_task_arithmetic", "{weight: 1}", "{k: 2.5}", "k must be an integer >= 0"),
    ("consensus_task_arithmetic", "{tall_lambda: -0.4}", "{}", "tall_lambda must be a number >= 0"),
    ("metric_weighted", "{loss: .nan}", "{}", "loss must be a number > 0, not nan"),
    ("metric_weighted", "{loss: 1}", "{penalty: -1}", "penalty must be a number >= 0, not -1"),
])
def test_parameter_values_are_checked_against_the_schema(tmp_path, tiny, method, model_params,
                                                         global_params, message):
    text = (f"merge_method: {method}\nbase_model: {tiny['base-a']}\nmodels:\n"
            f"  - model: {tiny['ft-a']}\n    parameters: {model_params}\n"
            f"parameters: {global_params}\n")
    path = write(tmp_path, "r.yaml", text)
    line = 6 if message.split()[0] in global_params else 5
    code, output = run_hub("--store", tmp_path / "store", "merge", path, "-o", tmp_path / "out")
    assert_one_line_error(code, output, f"{path}:{line}: {method} parameter {message}")
    assert not (tmp_path / "out").exists()


def test_consensus_k_above_the_number_of_inputs_is_refused(tmp_path, tiny):
    text = (f"merge_method: consensus_task_arithmetic\nbase_model: {tiny['base-a']}\n"
            f"models: [{tiny['ft-a']}]\nparameters: {{k: 2}}\n")
    with pytest.raises(RecipeError, match=r"k must be at most the number of inputs \(1\), not 2"):
        mergehub.merge(write(tmp_path, "r.yaml", text), out=tmp_path / "o", progress=False)


def test_every_method_parameter_has_a_rule():
    for cls in METHODS.values():
        for name, default in {**cls.model_params, **cls.global_params}.items():
            rule = cls.rule(name)  # KeyError: a parameter the schema does not cover
            assert default is None or rule.accepts(default), (cls.name, name, default)


def test_nan_lora_alpha_is_refused_at_add_and_merge(tmp_path, tiny):
    bad = lora_dir(tmp_path / "nan-lora", '{"r": 2, "lora_alpha": NaN, "peft_type": "LORA"}')
    store = tmp_path / "store"
    assert run_hub("--store", store, "add", tiny["base-a"], "-n", "base")[0] == 0
    code, output = run_hub("--store", store, "add", bad, "-n", "lora", "--base", "base")
    assert_one_line_error(code, output, f"{bad / 'adapter_config.json'}: lora_alpha must be a "
                                        "finite number, not nan")
    text = f"merge_method: task_arithmetic\nbase_model: {tiny['base-a']}\nmodels: [{bad}]\n"
    code, output = run_hub("--store", tmp_path / "store", "merge", write(tmp_path, "r.yaml", text), "-o", tmp_path / "out")
    assert_one_line_error(code, output, "lora_alpha must be a finite number")
    assert not (tmp_path / "out").exists()


# --- item 19: bad adapter_config.json values -------------------------------------------------

BAD_ADAPTER_CONFIGS = [
    ({"lora_alpha": "abc"}, "lora_alpha must be a finite number, not 'abc'"),
    ({"lora_alpha": True}, "lora_alpha must be a finite number, not True"),
    ({"r": 0}, "r must be an integer >= 1, not 0"),
    ({"r": 2.5}, "r must be an integer >= 1, not 2.5"),
    ({"alpha_pattern": {"q_proj(": 4}}, "alpha_pattern key 'q_proj(' is not a valid regular "
                                        "expression"),
    ({"alpha_pattern": {"w": "4"}}, "alpha_pattern['w'] must be a finite number, not '4'"),
    ({"alpha_pattern": ["w"]}, "alpha_pattern must map module patterns to values"),
    ({"rank_pattern": {"w": 0}}, "rank_pattern['w'] must be an integer >= 1, not 0"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false, not 'yes'"),
    ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false, not 1"),
    ({"peft_type": ["LORA"]}, "peft_type must be a string"),
]


@pytest.mark.parametrize("change, message", BAD_ADAPTER_CONFIGS)
def test_bad_adapter_config_is_refused_by_add(tmp_path, tiny, change, message):
    bad = lora_dir(tmp_path / "bad", {"r": 2, "lora_alpha": 4, "peft_type": "LORA", **change})
    code, output = run_hub("--store", tmp_path / "store", "add", bad, "-n", "lora")
    assert_one_line_error(code, output, f"{bad / 'adapter_config.json'}: {message}")


@pytest.mark.parametrize("change, message", BAD_ADAPTER_CONFIGS[:6])
def test_bad_adapter_config_in_the_store_is_refused_by_merge(tmp_path, tiny, monkeypatch,
                                                             change, message):
    """An entry stored before add checked configs (simulated by switching the check off for
    the add) is checked again when a merge reads it."""
    import mergehub.storage.checkpoint as checkpoint

    bad = lora_dir(tmp_path / "bad", {"r": 2, "lora_alpha": 4, "peft_type": "LORA", **change})
    with Store.init(tmp_path / "store") as store:
        store.add(tiny["base-a"], "base", progress=False)
        with monkeypatch.context() as m:
            m.setattr(checkpoint, "check_adapter_config", lambda config, where: config,
                      raising=False)
            store.add(bad, "lora", base="base", progress=False)
    text = "merge_method: task_arithmetic\nbase_model: base\nmodels: [lora]\n"
    code, output = run_hub("--store", tmp_path / "store", "merge",
                           write(tmp_path, "r.yaml", text), "-o", tmp_path / "out")
    assert_one_line_error(code, output, f"model 'lora': adapter_config.json: {message}")


def test_rank_zero_lora_factors_are_refused_by_merge(tmp_path, tiny):
    bad = lora_dir(tmp_path / "r0", {"r": 2, "lora_alpha": 4, "peft_type": "LORA"}, rank=0)
    text = f"merge_method: task_arithmetic\nbase_model: {tiny['base-a']}\nmodels: [{bad}]\n"
    code, output = run_hub("--store", tmp_path / "store", "merge", write(tmp_path, "r.yaml", text), "-o", tmp_path / "out")
    assert_one_line_error(code, output, "are not LoRA factors of one rank >= 1")


def test_good_lora_still_merges(tmp_path, tiny):
    text = f"merge_method: task_arithmetic\nbase_model: {tiny['base-a']}\nmodels: [{tiny['lora']}]\n"
    out = tmp_path / "out"
    mergehub.merge(write(tmp_path, "r.yaml", text), out=out, output_format="hf", progress=False)
    lora = open_checkpoint(tiny["lora"])
    a, b = (lora.load(f"base_model.model.layer.lora_{x}.weight") for x in "AB")
    base = open_checkpoint(tiny["base-a"]).load("layer.weight")
    assert torch.allclose(open_checkpoint(out).load("layer.weight"), base + b @ a * (4 / 2), atol=1e-6)


# --- item 8: unknown safetensors dtypes ------------------------------------------------------

@pytest.mark.parametrize("dtype", ["F33", "F4", "f32", ""])
def test_unknown_dtype_is_refused_by_add(tmp_path, dtype):
    path = raw_safetensors(tmp_path / "m.safetensors",
                           json.dumps({"w": {"dtype": dtype, "shape": [2], "data_offsets": [0, 8]}}),
                           b"\0" * 8)
    code, output = run_hub("--store", tmp_path / "store", "add", path, "-n", "m")
    assert_one_line_error(code, output, f"{path}: tensor 'w': unknown dtype {dtype!r}")


# --- item 20: deeply nested JSON -------------------------------------------------------------

@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_deeply_nested_safetensors_header_is_refused(tmp_path, depth):
    header = '{"__metadata__": ' + nested(depth) + "}"
    path = raw_safetensors(tmp_path / "deep.safetensors", header)
    code, output = run_hub("--store", tmp_path / "store", "add", path, "-n", "m")
    assert_one_line_error(code, output, f"{path}: not a safetensors file: header: JSON nested "
                                        f"deeper than {MAX_JSON_DEPTH} levels")


def test_deeply_nested_adapter_config_is_refused(tmp_path, tiny):
    bad = lora_dir(tmp_path / "deep", '{"r": 2, "lora_alpha": 4, "x": ' + nested(100_000) + "}")
    code, output = run_hub("--store", tmp_path / "store", "add", bad, "-n", "lora")
    assert_one_line_error(code, output, f"{bad / 'adapter_config.json'}: JSON nested deeper")
    text = f"merge_method: task_arithmetic\nbase_model: {tiny['base-a']}\nmodels: [{bad}]\n"
    code, output = run_hub("--store", tmp_path / "store", "merge", write(tmp_path, "r.yaml", text), "-o", tmp_path / "out")
    assert_one_line_error(code, output, "adapter_config.json: JSON nested deeper")


def test_deeply_nested_metrics_and_index_files_are_refused(tmp_path, tiny):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(tiny["ft-a"], model / "model.safetensors")
    (model / "metrics.json").write_text(nested(100_000))
    text = (f"merge_method: metric_weighted\nmodels: [{model}, {tiny['ft-a']}]\n")
    code, output = run_hub("--store", tmp_path / "store", "merge", write(tmp_path, "r.yaml", text), "-o", tmp_path / "out")
    assert_one_line_error(code, output, f"{model / 'metrics.json'}: JSON nested deeper")
    (model / "metrics.json").unlink()
    (model / "model.safetensors.index.json").write_text('{"weight_map": ' + nested(3000) + "}")
    code, output = run_hub("--store", tmp_path / "store", "add", model, "-n", "m")
    assert_one_line_error(code, output, "model.safetensors.index.json: JSON nested deeper")


def test_parse_json_limits():
    assert parse_json(nested(MAX_JSON_DEPTH), "x") == json.loads(nested(MAX_JSON_DEPTH))
    for text, message in ((nested(MAX_JSON_DEPTH + 1), "x: JSON nested deeper than"),
                          ('{"a": ' * 5000 + "1" + "}" * 5000, "x: JSON nested deeper than"),
                          ("9" * 5000, "x: not valid JSON: Exceeds the limit"),
                          (b"\xff\xfe{", "x: not valid JSON"), ("{oops", "x: not valid JSON")):
        with pytest.raises(InputError, match=message):
            parse_json(text, "x")


# --- item 13: hub train refuses pickle weights -----------------------------------------------

def test_train_refuses_a_pickle_base_like_add(tmp_path, models):
    base = tmp_path / "pickle-base"
    base.mkdir()
    shutil.copy(models["base-fp32"] / "config.json", base / "config.json")
    state = open_checkpoint(models["base-fp32"])
    torch.save({n: state.load(n) for n in state.tensors}, base / "pytorch_model.bin")
    config = write(tmp_path, "train.yaml", f"base: {base}\ndata: {{task: copy}}\nmethod: full\n"
                   f"steps: 1\nbatch_size: 1\noutput: {{dir: {tmp_path / 'out'}}}\n")
    code, output = run_hub("train", config)
    line = assert_one_line_error(code, output, f"{base / 'pytorch_model.bin'}: pickle "
                                               "checkpoint refused")
    code, add_output = run_hub("--store", tmp_path / "store", "add", base, "-n", "b")
    assert assert_one_line_error(code, add_output) == line  # the same message as add
    assert not (tmp_path / "out").exists()


# --- item 21: fine-tunes merged against another base -----------------------------------------

@pytest.fixture
def two_bases(tmp_path, tiny) -> Path:
    """A store with base-a, base-b, base-a again as base-a2, and ft (a fine-tune of base-a)."""
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add(tiny["base-a"], "base-a", progress=False)
        store.add(tiny["base-b"], "base-b", progress=False)
        store.add(tiny["base-a"], "base-a2", progress=False)
        store.add(tiny["ft-a"], "ft", base="base-a", progress=False)
        store.add(tiny["lora"], "lora", base="base-a", progress=False)
    return root


@pytest.mark.parametrize("base_key, model", [("base-b", "ft"), ("base-b", "lora"),
                                             ("path-b", "ft")])
def test_merging_against_a_foreign_base_is_an_error(tmp_path, tiny, two_bases, base_key, model):
    base = tiny["base-b"] if base_key == "path-b" else base_key
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {model}\n"
    path = write(tmp_path, "r.yaml", text)
    code, output = run_hub("--store", two_bases, "merge", path, "-o", tmp_path / "out")
    assert_one_line_error(code, output, f"{path}:4: input '{model}' was added to the store "
                                        "against base 'base-a'", "--allow-foreign-base")
    assert not (tmp_path / "out").exists()
    code, output = run_hub("--store", two_bases, "merge", path, "-o", tmp_path / "out",
                           "--allow-foreign-base", "--format", "hf")
    assert code == 0 and "merged against it anyway" in output, output
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("base", ["base-a", "base-a2", "path-a"])
def test_merging_against_the_same_base_passes(tmp_path, tiny, two_bases, base):
    base = tiny["base-a"] if base == "path-a" else base
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [ft, lora]\n"
    with Store(two_bases) as store:
        result = mergehub.merge(write(tmp_path, "r.yaml", text), out=tmp_path / "out",
                                store=store, progress=False)
    assert result.tensors == 2 and not [n for n in result.plan.notes if "foreign" in n]


def test_foreign_base_python_argument(tmp_path, two_bases):
    text = "merge_method: task_arithmetic\nbase_model: base-b\nmodels: [ft]\n"
    with Store(two_bases) as store:
        with pytest.raises(BaseMismatchError, match="against base 'base-a'"):
            mergehub.merge(text, out=tmp_path / "o", store=store, progress=False)
        mergehub.merge(text, out=tmp_path / "o", store=store, progress=False,
                       allow_foreign_base=True)
    assert math.isfinite(float(open_checkpoint(tmp_path / "o").load("layer.weight").sum()))
