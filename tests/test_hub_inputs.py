"""Merge inputs on the Hugging Face Hub (``hf://org/name[@rev]``, or ``org/name`` that is no
local path or store name), against the test Hub of ``tests/conftest.py`` (olah behind the
stand-in write API): the real ``huggingface_hub`` client over real HTTP. The oracle is the
merge of the same models from local folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import mergehub
from mergehub.errors import InputError, RemoteError
from mergehub.hub.cli import cli
from mergehub.hub.demo import dir_digests
from mergehub.storage.hub_inputs import open_hub_input
from tests.hub_server import new_repo_id


def _upload(folder: Path, tag: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    repo = new_repo_id(tag)
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=str(folder))
    return repo


def _snapshot_files(repo: str) -> set[str]:
    """The files of ``repo`` in the Hugging Face cache (downloaded so far)."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return {p.name for p in root.glob("*/*")} if root.is_dir() else set()


def _ties(base: str, inputs: list[str]) -> str:
    models = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                     for m in inputs)
    return f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}"


def test_hub_inputs_merge_as_local_folders_and_download_lazily(hf, models, tmp_path):
    """A sharded base as ``hf://`` and a sharded fine-tune as a plain repo id at a revision:
    planning downloads no weight file; the merge gives the local folders' output byte for byte;
    a checkpoint whose one tensor was read has fetched that tensor's shard only."""
    base = _upload(models["sharded-bf16"], "base")
    ft = _upload(models["ft-sharded"], "ft")
    (tmp_path / "local.yaml").write_text(_ties(models["sharded-bf16"],
                                               [models["ft-sharded"], models["ft-attn"]]))
    (tmp_path / "hub.yaml").write_text(_ties(f"hf://{base}", [f"{ft}@main", models["ft-attn"]]))
    mergehub.merge(tmp_path / "local.yaml", tmp_path / "local", progress=False)

    plan = mergehub.merge(tmp_path / "hub.yaml", dry_run=True, echo=lambda t: None).plan
    assert plan.base.label == f"hf://{base}"
    shards = [f for f in plan.base.reader.headers]
    assert len(shards) >= 3
    assert not any(f.endswith(".safetensors") for f in _snapshot_files(base) | _snapshot_files(ft))

    ckpt = open_hub_input(ft, "here")
    name = next(n for n, t in ckpt.tensors.items() if t.file == sorted(ckpt.headers)[-1])
    assert ckpt.load(name).shape == ckpt.tensors[name].spec.shape
    assert {f for f in _snapshot_files(ft) if f.endswith(".safetensors")} == {
        ckpt.tensors[name].file}

    mergehub.merge(tmp_path / "hub.yaml", tmp_path / "hub", progress=False)
    assert dir_digests(tmp_path / "hub") == dir_digests(tmp_path / "local")


def test_hub_input_is_a_whole_model_folder(hf, models, tmp_path):
    """A Hub repo is a model folder as a local one is: its files at any depth are side files
    (a sentence-transformers module's ``1_Pooling/config.json``), a pickle is named as not
    kept; the merge output carries the same files as the merge of the local folder (nested
    ones too, not the model card), and the files it does not carry are never downloaded."""
    base = tmp_path / "base"
    shutil.copytree(models["sharded-bf16"], base)
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    (base / "modules.json").write_text('[{"idx": 1, "path": "1_Pooling"}]\n')
    (base / "pytorch_model.bin").write_bytes(b"a pickle would be here")
    (base / "README.md").write_text("# the base's card\n")
    repo = _upload(base, "tree")

    ckpt = open_hub_input(f"hf://{repo}", "here")
    assert {"1_Pooling/config.json", "modules.json", "README.md", "config.json"} <= set(
        ckpt.side_files)
    assert ckpt.not_kept["pytorch_model.bin"].startswith("pickle")
    assert "pytorch_model.bin" not in ckpt.side_files

    (tmp_path / "local.yaml").write_text(_ties(base, [models["ft-sharded"]]))
    (tmp_path / "hub.yaml").write_text(_ties(f"hf://{repo}", [models["ft-sharded"]]))
    mergehub.merge(tmp_path / "local.yaml", tmp_path / "local", progress=False)
    mergehub.merge(tmp_path / "hub.yaml", tmp_path / "hub", progress=False)
    got = dir_digests(tmp_path / "hub")
    assert got == dir_digests(tmp_path / "local")
    assert "1_Pooling/config.json" in got and "README.md" not in got
    assert not {"README.md", "pytorch_model.bin"} & _snapshot_files(repo)


def test_hub_lora_input_and_cli(hf, models, tmp_path):
    """A PEFT adapter repo is a LoRA input (its adapter_config.json read from the Hub); the
    CLI merges it as the library does from the local folder."""
    lora = _upload(models["lora"], "lora")
    (tmp_path / "local.yaml").write_text(_ties(models["base-bf16"], [models["lora"]]))
    (tmp_path / "hub.yaml").write_text(_ties(models["base-bf16"], [f"hf://{lora}"]))
    mergehub.merge(tmp_path / "local.yaml", tmp_path / "local", progress=False)
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "hub.yaml"), "-o",
                                      str(tmp_path / "hub")])
    assert result.exit_code == 0, result.output
    assert dir_digests(tmp_path / "hub") == dir_digests(tmp_path / "local")


def test_hub_input_errors_are_one_line(hf, models, tmp_path):
    """A repo id that is on no Hub, a revision that is not there: one line naming the recipe
    line and the input; a bare name that is no path, store entry or repo id says so."""
    repo = _upload(models["base-bf16"], "base")
    cases = [
        (_ties(models["base-bf16"], ["org/not-there-at-all"]),
         r"recipe.yaml:4: input 'org/not-there-at-all' is neither a local path nor a Hub repo "
         r"\(org/not-there-at-all: repository not found on http://127.0.0.1"),
        (_ties(models["base-bf16"], [f"hf://{repo}@nope"]),
         rf"recipe.yaml:4: input 'hf://{repo}@nope': {repo}: revision 'nope' not found"),
        (_ties(models["base-bf16"], ["not-a-thing"]),
         r"recipe.yaml:4: input 'not-a-thing' is neither a local path nor a Hub repo "
         r"\(write org/name or hf://org/name\[@revision\]\)"),
    ]
    for text, message in cases:
        (tmp_path / "recipe.yaml").write_text(text)
        with pytest.raises((InputError, RemoteError), match=message):
            mergehub.merge(tmp_path / "recipe.yaml", tmp_path / "out", progress=False)
        result = CliRunner().invoke(cli, ["merge", str(tmp_path / "recipe.yaml"), "-o",
                                          str(tmp_path / "out")])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
