"""No network access the user did not ask for (issue 15, item 8): with the network blocked
and ``HF_HUB_OFFLINE`` unset, add, train (on a store base, which made peft ask the Hub for a
repo named like the store entry), merge, export, compress, ls, show and verify run as they do
anywhere, and nothing tries to connect."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from click.testing import CliRunner

from mergehub.hub.cli import cli


class NetworkUsed(BaseException):
    """Raised by a blocked socket call: a BaseException, so that no ``except Exception`` in a
    library (peft turns a failed Hub request into a warning) can hide the attempt."""


@pytest.fixture
def no_network(monkeypatch):
    """Every DNS lookup and connection in this process raises :class:`NetworkUsed` (and is
    recorded); the offline switches of huggingface_hub, transformers and peft are off."""
    from huggingface_hub import constants

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    attempts: list[str] = []

    def blocked(what):
        def refuse(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what == 'connect' else args}")
            raise NetworkUsed(f"network used: {attempts[-1]}")
        return refuse

    monkeypatch.setattr(socket, "getaddrinfo", blocked("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", blocked("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", blocked("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", blocked("connect_ex"))
    yield attempts
    assert not attempts, attempts


def test_offline_operations_never_touch_the_network(no_network, models, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runner = CliRunner()

    def hub(*args):
        result = runner.invoke(cli, ["--store", str(tmp_path / "store"), *map(str, args)],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    try:
        hub("add", models["base-bf16"], "-n", "base")
        hub("add", models["ft-mlp"], "-n", "mlp", "--base", "base")
        hub("add", models["lora"], "-n", "lora", "--base", "base")
        train = tmp_path / "train.yaml"
        train.write_text("base: base\ndata: {task: copy}\nmethod: lora\n"
                         "peft: {r: 2, lora_alpha: 4, target_modules: [q_proj, v_proj]}\n"
                         "steps: 2\nbatch_size: 2\noutput: {store: trained}\n")
        assert "'trained' (adapter of 'base')" in hub("train", train)
        recipe = tmp_path / "r.yaml"
        recipe.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                          "  - model: mlp\n  - model: lora\n  - model: trained\n")
        hub("merge", recipe, "-o", tmp_path / "merged", "--to-store", "merged")
        hub("export", "merged", "-o", tmp_path / "exported")
        hub("export", "trained", "-o", tmp_path / "adapter")
        hub("compress", "mlp", "--codec", "compeft")
        hub("ls")
        hub("show", "merged")
        assert hub("verify").rstrip().endswith(": OK")
        # the trained adapter names its base as peft can find it: the folder "base" was
        # added from, not the store's name for it (which peft would look up on the Hub)
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(models["base-bf16"])
    finally:
        torch.set_num_threads(threads)
