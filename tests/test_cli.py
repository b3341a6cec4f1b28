"""The ``hub`` CLI: every verb, and one clear line with exit status 2 for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mergehub.hub.cli import cli
from mergehub.hub.demo import dir_digests


@pytest.fixture
def hub(tmp_path):
    runner = CliRunner()
    store = str(tmp_path / "store")

    def run(*args: str, code: int = 0):
        result = runner.invoke(cli, ["--store", store, *map(str, args)])
        assert result.exit_code == code, (result.output, result.exception)
        return result

    return run


def _one_line_error(result, *fragments: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_workflow(hub, models, tmp_path):
    assert "initialized store" in hub("init").output
    assert "already exists" in hub("init").output
    out = hub("add", models["base-bf16"], "--name", "base").output
    assert out.startswith("added 'base' (base): 21 tensors")
    out = hub("add", models["ft-mlp"], "--name", "ft", "--base", "base",
              "--metrics", '{"loss": 0.5}', "--provenance", '{"run": "r1"}').output
    assert "(finetune of 'base')" in out and "saved" in out
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text('{"acc": 0.9}')
    hub("add", models["lora"], "-n", "lora", "-b", "base", "--metrics", f"@{metrics_file}")
    table = hub("ls").output.splitlines()
    assert table[0].split() == ["NAME", "KIND", "BASE", "TENSORS", "LOGICAL", "STORED", "SAVED", "CREATED"]
    assert [r.split()[:3] for r in table[1:4]] == [["base", "base", "-"], ["ft", "finetune", "base"],
                                                  ["lora", "adapter", "base"]]
    assert table[4].startswith("total: ")
    listed = json.loads(hub("ls", "--json").output)
    assert [m["name"] for m in listed] == ["base", "ft", "lora"]
    shown = hub("show", "ft").output
    for key in ("kind:", "base:", "tensors:", "logical bytes:", "bytes on disk:", "saving vs raw:",
                "provenance:", '"run": "r1"', '"loss": 0.5'):
        assert key in shown, key
    info = json.loads(hub("show", "lora", "--json").output)
    assert info["metrics"] == {"acc": 0.9} and info["kind"] == "adapter"
    for name, key in (("ft", "ft-mlp"), ("lora", "lora")):
        hub("export", name, "-o", tmp_path / name)
        assert dir_digests(tmp_path / name) == dir_digests(models[key])
    hub("export", "base", "-o", tmp_path / "resharded", "--max-shard-size", "60KB")
    assert (tmp_path / "resharded" / "model.safetensors.index.json").is_file()
    assert "OK" in hub("verify").output
    hub("rm", "lora")
    assert "removed" in hub("gc").output
    assert "OK" in hub("verify").output


def test_errors_are_one_line_exit_2(hub, models, tmp_path):
    _one_line_error(hub("ls", code=2), "no mergehub store at", "hub init")
    hub("add", models["base-bf16"], "--name", "base")
    _one_line_error(hub("show", "nope", code=2), "no model named 'nope'")
    _one_line_error(hub("export", "nope", "-o", tmp_path / "o", code=2), "no model named 'nope'")
    _one_line_error(hub("rm", "nope", code=2), "no model named 'nope'")
    _one_line_error(hub("add", models["ft-mlp"], "--name", "x", "--base", "nope", code=2),
                    "no model named 'nope'")
    _one_line_error(hub("add", models["base-bf16"], "--name", "base", code=2),
                    "'base' already exists")
    _one_line_error(hub("add", tmp_path / "missing", "--name", "m", code=2),
                    str(tmp_path / "missing"), "no such file or directory")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    _one_line_error(hub("add", junk, "--name", "j", code=2), str(junk), "not a safetensors file")
    pkl = tmp_path / "pytorch_model.bin"
    pkl.write_bytes(b"\x80\x04")
    _one_line_error(hub("add", pkl, "--name", "p", code=2), str(pkl), "pickle checkpoint refused")
    unreadable = tmp_path / "locked.safetensors"
    unreadable.mkdir()  # a directory where a file is expected: no weights inside
    _one_line_error(hub("add", unreadable, "--name", "u", code=2), "no safetensors weights")
    hub("add", models["base-fp32"], "--name", "fp32")
    hub("add", models["ft-mlp"], "--name", "ft", "--base", "base")
    _one_line_error(hub("rm", "base", code=2), "it is the base of 'ft'")
    assert hub("export", "base", "-o", tmp_path / "o1").exit_code == 0
    _one_line_error(hub("export", "base", "-o", tmp_path / "o1", code=2), "not empty", "--overwrite")
    _one_line_error(hub("export", "base", "-o", tmp_path / "o3", "--max-shard-size", "lots", code=2),
                    "cannot read size 'lots'")


def test_base_mismatch_error(hub, models):
    hub("add", models["base-bf16"], "--name", "base")
    hub("add", models["base-fp32"], "--name", "fp32")
    # same names and shapes, other dtype: allowed (stored without a delta)
    hub("add", models["base-fp16"], "--name", "fp16-ft", "--base", "base")
    hub("add", models["lora"], "--name", "lora")
    result = hub("add", models["ft-mlp"], "--name", "ft", "--base", "lora", code=2)
    _one_line_error(result, "lora_A.weight' of base 'lora' is missing")


def test_corrupt_blob_error(hub, models, tmp_path):
    from mergehub.storage.store import Store

    hub("add", models["base-bf16"], "--name", "base")
    with Store(tmp_path / "store") as s:
        name, blob = s._db.execute("SELECT name, blob FROM tensors LIMIT 1").fetchone()
        path = s._blob_path(blob)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _one_line_error(hub("export", "base", "-o", tmp_path / "out", code=2),
                    "model 'base'", f"tensor '{name}'", "corrupt")
    assert not (tmp_path / "out").exists()
    result = hub("verify", code=2)
    assert "1 problems" in result.output and name in result.output


def test_bad_json_option(hub, models):
    result = hub("add", models["base-bf16"], "--name", "b", "--metrics", "{nope", code=2)
    assert "--metrics" in result.output and "not valid JSON" in result.output


def test_help_documents_every_option():
    import click

    runner = CliRunner()
    for name, command in [("hub", cli), *cli.commands.items()]:
        assert command.help, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts}: no help text"
        args = [name, "--help"] if name != "hub" else ["--help"]
        assert "Usage:" in runner.invoke(cli, args).output


def test_console_script_exit_code_and_debug(tmp_path):
    """The installed ``hub`` entry point: one line and exit 2; --debug shows the traceback."""
    cmd = [sys.executable, "-c", "from mergehub.hub.cli import main; main()",
           "--store", str(tmp_path / "s")]
    r = subprocess.run([*cmd, "show", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: no mergehub store")
    r = subprocess.run([*cmd[:3], "--debug", *cmd[3:], "show", "x"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "StoreError" in r.stderr
