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
