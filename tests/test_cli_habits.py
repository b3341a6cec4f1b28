"""The ``hub`` CLI fits the habits people bring: options where they type them, mergekit's
spellings, a second script name, and output that behaves in pipes and logs (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mergehub.hub.cli import cli

HUB = [sys.executable, "-c", "from mergehub.hub.cli import main; main()"]


def invoke(*args: object, code: int = 0, env: dict[str, str] | None = None):
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    assert result.exit_code == code, (result.output, result.exception)
    return result


# --- item 5: --store (and the other shared options) after the command's name ------------------

def test_store_after_the_command(models, tmp_path, monkeypatch):
    """`hub ls --store X` works as `hub --store X ls` does, for every command that opens a
    store; the command's --store wins over the group's; MERGEHUB_HOME still applies without."""
    store, home = tmp_path / "store", tmp_path / "home"
    monkeypatch.setenv("MERGEHUB_HOME", str(home))
    invoke("init", "--store", store)
    invoke("add", models["base-bf16"], "--name", "base", "--store", store)
    invoke("add", models["ft-mlp"], "--name", "ft", "--base", "base", "--store", store)
    assert not home.exists()
    rows = invoke("ls", "--store", store, "--json").output
    assert [m["name"] for m in json.loads(rows)] == ["base", "ft"]
    assert json.loads(invoke("show", "ft", "--json", "--store", store).output)["base"] == "base"
    assert "OK" in invoke("verify", "--store", store).output
    invoke("export", "ft", "-o", tmp_path / "ft", "--store", store)
    assert (tmp_path / "ft" / "model.safetensors").is_file()
    # given twice, the command's own --store wins
    assert "ft" in invoke("--store", tmp_path / "nowhere", "ls", "--store", store).output
    # MERGEHUB_HOME as before
    invoke("init")
    assert (home / "mergehub-store.json").is_file()
    assert invoke("ls", "--json").output.strip() == "[]"


def test_every_store_command_takes_store_after_its_name():
    """Each command that opens a store (every one but `demo`), also those added later."""
    for name, command in cli.commands.items():
        opts = {o for p in command.params if isinstance(p, click.Option) for o in p.opts}
        assert {"--debug", "--quiet", "-v"} <= opts, name
        assert ("--store" in opts) == (name != "demo"), name


def test_debug_after_the_command(tmp_path):
    """`hub show x --debug` shows the traceback as `hub --debug show x` does."""
    r = subprocess.run([*HUB, "show", "x", "--store", tmp_path / "s", "--debug"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "StoreError" in r.stderr


# --- item 6: mergekit's habits ------------------------------------------------------------------

def _dare_recipe(models, tmp_path: Path) -> Path:
    path = tmp_path / "dare.yaml"
    path.write_text(f"merge_method: dare_ties\nbase_model: {models['base-bf16']}\nmodels:\n"
                    f"  - model: {models['ft-mlp']}\n    parameters: {{density: 0.5}}\n"
                    f"  - model: {models['ft-attn']}\n    parameters: {{density: 0.5}}\n")
    return path


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_merge_like_mergekit_yaml(models, tmp_path):
    """`hub merge RECIPE OUT --random-seed N --out-shard-size S` is `-o OUT --seed N
    --max-shard-size S'` with S in mergekit's spelling (K/M/B: thousand, million, billion)."""
    r = _dare_recipe(models, tmp_path)
    invoke("merge", r, "-o", tmp_path / "a", "--seed", 7, "--max-shard-size", "60000")
    invoke("merge", r, tmp_path / "b", "--random-seed", 7, "--out-shard-size", "60K")
    invoke("merge", r, tmp_path / "c", "--random-seed", 8, "--out-shard-size", "60K")
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert "model.safetensors.index.json" in a and len(a) > 4  # several 60 kB shards
    assert a == b and a != c
    for args, hint in ((["OUT", "-o", tmp_path / "o"], "--output"),
                       (["--out-shard-size", "1B", "--max-shard-size", "1GB"], "--max-shard-size")):
        args = [tmp_path / "d" if a == "OUT" else a for a in args]
        result = invoke("merge", r, *args, code=2)
        assert "given twice" in result.output and hint in result.output
    assert not (tmp_path / "d").exists()


def test_parse_kmb_is_mergekits():
    from mergehub.errors import InputError
    from mergehub.units import parse_kmb

    assert [parse_kmb(s) for s in ("5B", "5b", "500M", "20k", "123", 7)] == [
        5 * 10**9, 5 * 10**9, 500 * 10**6, 20_000, 123, 7]
    for bad in ("2GB", "1.5B", "5T", ""):
        with pytest.raises(InputError, match="thousand, million, billion"):
            parse_kmb(bad)


def test_new_entry_is_name_everywhere(models, tmp_path):
    """`--name/-n` names the new entry in add, pull, compress and merge; compress's `--as` and
    merge's `--to-store` stay as aliases."""
    s = ["--store", tmp_path / "s"]
    invoke("add", models["base-bf16"], "-n", "base", *s)
    invoke("add", models["ft-mlp"], "--name", "ft", "-b", "base", *s)
    invoke("compress", "ft", "--codec", "compeft", "--name", "ft-c1", *s)
    invoke("compress", "ft", "--codec", "compeft", "--as", "ft-c2", *s)
    recipe = tmp_path / "ta.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ft\n")
    invoke("merge", recipe, "--name", "m1", *s)
    invoke("merge", recipe, "-n", "m2", *s)
    invoke("merge", recipe, "--to-store", "m3", *s)
    names = [m["name"] for m in json.loads(invoke("ls", "--json", *s).output)]
    assert names == ["base", "ft", "ft-c1", "ft-c2", "m1", "m2", "m3"]
    for command in ("add", "pull", "compress", "merge"):
        opts = {o for p in cli.commands[command].params for o in getattr(p, "opts", [])}
        assert {"--name", "-n"} <= opts, command


def test_pull_revision_option_and_conflict(tmp_path):
    """`hub pull REPO --revision REV` is REPO@REV; both, disagreeing, is one clear error (before
    any network access: the endpoint here does not exist)."""
    from mergehub.storage.hf_hub import split_repo_ref

    assert split_repo_ref("me/x", "exp") == ("me/x", "exp") == split_repo_ref("me/x@exp")
    assert split_repo_ref("me/x@exp", "exp") == ("me/x", "exp")
    env = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    result = invoke("pull", "me/x@main", "--revision", "exp", "--store", tmp_path / "s",
                    code=2, env=env)
    assert result.output.startswith("error: 'me/x@main': revision 'main' after '@' and 'exp'")


def test_quiet_drops_notes_and_verbose_sets_log_levels(models, tmp_path):
    """--quiet drops the notes a merge prints on stderr (not the result, nor a dry run's plan,
    which is on stdout); -v / -vv (before or after the command) log at INFO / DEBUG."""
    r = tmp_path / "r.yaml"
    r.write_text(f"merge_method: task_arithmetic\nbase_model: {models['base-bf16']}\n"
                 f"models:\n  - model: {models['base-bf16']}\n  - model: {models['ft-mlp']}\n")
    plan = invoke("merge", r, "--dry-run", "--quiet")
    assert "method: task_arithmetic" in plan.stdout and "note: base_model" in plan.stdout
    assert plan.stderr == ""
    args = ["merge", r]
    loud = invoke(*args, tmp_path / "loud")
    quiet = invoke(*args, tmp_path / "quiet", "-q")
    assert "note: " in loud.stderr and quiet.stderr == ""
    assert quiet.stdout.startswith("merged 21 tensors")
    code = ("import logging, sys; from mergehub.hub.cli import cli\n"
            "cli(sys.argv[1:], standalone_mode=False)\n"
            "print(*(logging.getLogger(n).level for n in ('mergehub', 'huggingface_hub', "
            "'transformers', '')))")
    for args, level in ((["-v"], 20), (["-v", "-v"], 10)):
        out = subprocess.run([sys.executable, "-c", code, *args, "init", "--store",
                              tmp_path / "s", *args[1:]], capture_output=True, text=True)
        assert out.stdout.split()[-4:] == [str(level)] * 4, out.stderr


def test_version():
    assert CliRunner().invoke(cli, ["--version"]).output.startswith("mergehub, version ")


# --- item 7: `mergehub`, the same commands under a name that does not clash --------------------

def test_mergehub_console_script_and_python_m(tmp_path):
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "project"]["scripts"]
    assert scripts["mergehub"] == scripts["hub"] == "mergehub.hub.cli:main"
    as_mergehub = [sys.executable, "-c", "import sys; sys.argv[0] = '/usr/bin/mergehub'; "
                   "from mergehub.hub.cli import main; main()"]
    r = subprocess.run([*as_mergehub, "ls", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("Usage: mergehub ls [OPTIONS]")
    r = subprocess.run([sys.executable, "-m", "mergehub", "init", "--store", tmp_path / "s"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "initialized store" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "mergehub", "--help"], capture_output=True, text=True)
    assert r.stdout.startswith("Usage: python -m mergehub [OPTIONS] COMMAND")


# --- item 9: output hygiene ---------------------------------------------------------------------

def test_closed_pipe_exits_quietly(models, tmp_path):
    """`hub show X | head -1`: the reader is gone before hub writes; no traceback, no
    `error: [Errno 32] Broken pipe`."""
    import os

    store = tmp_path / "s"
    invoke("add", models["base-bf16"], "--name", "base", "--store", store)
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([*HUB, "show", "base", "--store", store], stdout=write,
                           stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert r.stderr == "" and r.returncode == 1


BAR = ("it/s", "B/s", "%|")


def test_no_progress_bars_off_a_terminal(models, tmp_path, capsys):
    """CLI output that is not a terminal has no bars (a re-sharding export printed one); the
    Python API's default shows them only on a terminal too, progress=True forces them."""
    import transformers

    from mergehub.hub.demo import make_tiny_llama
    from mergehub.storage.store import Store

    s = ["--store", tmp_path / "s"]
    runs = [invoke("add", models["base-bf16"], "--name", "base", *s),
            invoke("add", models["ft-mlp"], "--name", "ft", "--base", "base", *s),
            invoke("export", "ft", "-o", tmp_path / "e1", *s),
            invoke("export", "ft", "-o", tmp_path / "e2", "--max-shard-size", "60KB", *s),
            invoke("compress", "ft", "--codec", "bit1", *s),
            invoke("verify", *s)]
    for r in runs:
        assert not any(b in r.stderr for b in BAR), r.stderr
    capsys.readouterr()
    with Store(tmp_path / "s") as store:
        store.export("ft", tmp_path / "e3")
        assert not any(b in capsys.readouterr().err for b in BAR)
        store.export("ft", tmp_path / "e4", progress=True)
        assert "export ft" in capsys.readouterr().err
    transformers.logging.enable_progress_bar()  # as outside this test suite
    try:
        make_tiny_llama(tmp_path / "tiny")  # the README's Python example builds with these
    finally:
        transformers.logging.disable_progress_bar()
    assert not any(b in capsys.readouterr().err for b in BAR)


def test_show_keeps_a_space_after_every_label(models, tmp_path):
    s = ["--store", tmp_path / "s"]
    invoke("add", models["base-bf16"], "--name", "base", *s)
    lines = invoke("show", "base", *s).output.splitlines()
    assert any(line.startswith("codec lossless: ") for line in lines), lines
    assert all(": " in line for line in lines)


def test_demo_help_says_what_the_demo_does():
    text = " ".join(invoke("demo", "--help").output.split())
    for step in ("LoRA", "export", "TIES-merge", "compress", "train", "verify"):
        assert step in text, step


def test_model_card_has_no_placeholder(models, tmp_path):
    """A pushed adapter whose base is not on the Hub gets a card that says how to get the base
    (export it from the store) instead of `from_pretrained('BASE')`; with the base's repo known
    the snippet names it."""
    from mergehub.hub.remote import model_card
    from mergehub.storage.store import Store

    with Store.init(tmp_path / "s") as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["lora"], "lora", base="base", progress=False)
        store.add(models["lora"], "orphan", progress=False)
        card = lambda name, base_model: model_card(  # noqa: E731
            store.show(name), store.entry_manifest(name), ["peft"], base_model, "me/lora",
            "AutoModelForCausalLM")
        local, known, orphan = card("lora", None), card("lora", "me/base"), card("orphan", None)
    assert "hub export base -o base-model" in local
    assert "AutoModelForCausalLM.from_pretrained('base-model')" in local
    assert "AutoModelForCausalLM.from_pretrained('me/base')" in known
    assert "PeftModel.from_pretrained(base, 'me/lora')" in orphan
    for text in (local, known, orphan):
        assert "BASE" not in text


def test_python_errors_name_python_arguments(models, tmp_path):
    """The same mistake, made from Python and from the CLI: each message names the option as
    that caller spells it."""
    import mergehub
    from mergehub.errors import MergehubError
    from mergehub.storage.store import Store

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {models['base-bf16']}\n"
                      f"models:\n  - model: {models['ft-mlp']}\n")
    with pytest.raises(MergehubError) as e:
        mergehub.merge(recipe, progress=False)
    assert "(out=) and/or a store entry name (to_store=)" in str(e.value)
    assert "--" not in str(e.value) and "-o" not in str(e.value)
    assert "(OUT or -o) and/or a store entry name (--name)" in invoke("merge", recipe,
                                                                       code=2).output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with Store.init(tmp_path / "s") as store:
        store.add(models["base-bf16"], "base", progress=False)
        with pytest.raises(MergehubError, match=r"pass overwrite=True to replace it"):
            store.export("base", tmp_path / "full")
        with pytest.raises(MergehubError, match=r"\(add it with base=\)"):
            store.compress("base", "compeft")
    cli_err = invoke("export", "base", "-o", tmp_path / "full", "--store", tmp_path / "s", code=2)
    assert "pass --overwrite to replace it" in cli_err.output
    # after the CLI ran in this process, Python callers still get Python spellings
    with pytest.raises(MergehubError, match=r"Store\.init\(root\) creates one"):
        Store(tmp_path / "nowhere")


def test_did_you_mean_for_entry_names(models, tmp_path):
    """An unknown entry name suggests the closest stored one: in every command that takes a
    name, in a recipe's inputs and in a training config's base."""
    s = ["--store", tmp_path / "s"]
    invoke("add", models["base-bf16"], "--name", "llama-base", *s)
    invoke("add", models["ft-mlp"], "--name", "math-sft", "--base", "llama-base", *s)
    for args in (["show", "math-stf"], ["export", "math-stf", "-o", tmp_path / "o"],
                 ["rm", "math-stf"], ["compress", "math-stf", "--codec", "bit1"],
                 ["add", models["lora"], "--name", "l", "--base", "lama-base"]):
        out = invoke(*args, *s, code=2).output
        assert out.count("\n") == 1 and "(did you mean '" in out, (args, out)
    assert "did you mean 'math-sft'" in invoke("show", "math-stf", *s, code=2).output
    assert "`hub ls` lists them" in invoke("show", "zzzzzz", *s, code=2).output
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: llama-base\nmodels:\n"
                      "  - model: math_sft\n")
    out = invoke("merge", recipe, tmp_path / "m", *s, code=2).output
    assert "input 'math_sft' is neither a local path nor a model in store" in out
    assert "(did you mean 'math-sft'?)" in out
    config = tmp_path / "t.yaml"
    config.write_text("base: lama-base\ndata: {task: add1}\nmethod: lora\nsteps: 1\n"
                      "output: {store: t}\n")
    out = invoke("train", config, *s, code=2).output
    assert "base 'lama-base' is neither a path" in out and "did you mean 'llama-base'" in out
