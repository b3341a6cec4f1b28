"""hub push / hub pull against a real Hub-compatible server: olah (PyPI) serving git repos for
reads, and the test-only write API of ``tests/hub_server.py`` in front of it. Nothing of
``huggingface_hub`` is mocked: every push -> pull crosses HTTP through the real client."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergehub.errors import (
    BaseMismatchError, IntegrityError, MergehubError, RemoteError, StoreError)
from mergehub.hub.cli import cli
from mergehub.hub.demo import dir_digests, make_finetune, make_tiny_llama
from mergehub.hub.remote import MANIFEST, pull, push
from mergehub.storage.hf_hub import split_repo_ref
from mergehub.storage.store import Store
from tests.hub_server import READ_TOKEN, WRITE_TOKEN
from tests.hub_server import new_repo_id as _repo


def _export(store: Store, name: str, out: Path) -> dict[str, str]:
    return dir_digests(store.export(name, out, progress=False))


def _new_store(path: Path) -> Store:
    return Store.init(path)


def test_base_round_trip_bit_exact(hf, models, tmp_path):
    """A base pushed as an HF repo comes back bit for bit, and transformers loads the repo."""
    with _new_store(tmp_path / "a") as a:
        a.add(models["sharded-bf16"], "base", progress=False)
        result = push(a, "base", repo := _repo("base"), progress=False)
        want = _export(a, "base", tmp_path / "a-out")
    assert result.forms == ["hf"]
    assert {"README.md", MANIFEST, "config.json", "model.safetensors.index.json"} \
        <= set(result.files)
    with _new_store(tmp_path / "b") as b:
        got = pull(b, repo, progress=False)
        assert got.info.name == "base" and got.info.kind == "base" and got.form == "hf"
        assert got.info.provenance["hub"]["repo_id"] == repo
        # the source is the repo, neither the pusher's path nor the transfer folder
        assert got.info.provenance["source"] == f"{hf.url}/{repo}@{got.commit}"
        assert _export(b, "base", tmp_path / "b-out") == want == dir_digests(models["sharded-bf16"])
        assert list((b.root / "transfers").iterdir()) == []  # the download folder is gone


def _card(hf, repo: str, revision: str = "main") -> tuple[dict, str]:
    from huggingface_hub import ModelCard, hf_hub_download

    card = ModelCard.load(hf_hub_download(repo, "README.md", revision=revision))
    return card.data.to_dict(), card.text


def test_lora_pushes_as_peft_repo_that_peft_loads(hf, models, pushed_base, tmp_path):
    """A LoRA entry is a standard PEFT repo (PeftModel.from_pretrained(base, repo_id) gives the
    adapter's exact weights) and pulls back bit for bit against the base found by fingerprint."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    a, base_repo = pushed_base
    a.add(models["lora"], "lora", base="base", metrics={"eval_loss": 1.5}, progress=False)
    result = push(a, "lora", repo := _repo("lora"), base_model=base_repo, progress=False)
    assert result.forms == ["peft"]
    meta, text = _card(hf, repo)
    assert meta["library_name"] == "peft" and meta["base_model"] == base_repo
    assert meta["base_model_relation"] == "adapter"
    assert {"mergehub", "lora"} <= set(meta["tags"])
    assert meta["mergehub"]["metrics"] == {"eval_loss": 1.5} and "| eval_loss | 1.5 |" in text
    assert f"PeftModel.from_pretrained(base, '{repo}')" in text
    assert f"AutoModelForCausalLM.from_pretrained('{base_repo}')" in text

    base_model = AutoModelForCausalLM.from_pretrained(models["base-bf16"])
    peft_model = PeftModel.from_pretrained(base_model, repo)
    want = load_file(models["lora"] / "adapter_model.safetensors")
    got = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(got) == len(want) > 0
    for key, value in want.items():
        assert torch.equal(got[key.replace(".weight", ".default.weight")], value)

    with _new_store(tmp_path / "b") as b:
        assert pull(b, base_repo, progress=False).info.name == "base"
        got = pull(b, repo, progress=False)
        assert (got.info.kind, got.info.base, got.form) == ("adapter", "base", "peft")
        assert got.info.metrics == {"eval_loss": 1.5}
        # peft's own README.md is kept with the adapter (under mergehub/files/ in the repo)
        assert _export(b, "lora", tmp_path / "b-out") == dir_digests(models["lora"])


def test_merged_round_trip_with_recipe_card(hf, models, pushed_base, tmp_path):
    """A merged entry pushed as hf + mergehub: the card carries the recipe and method tags, and
    the pull restores the stored blobs themselves (same ids) against the base."""
    import mergehub

    a, base_repo = pushed_base
    a.add(models["ft-mlp"], "ft-mlp", base="base", progress=False)
    a.add(models["ft-attn"], "ft-attn", base="base", progress=False)
    recipe = tmp_path / "ties.yaml"
    recipe.write_text("merge_method: ties\nbase_model: base\nmodels:\n"
                      "  - model: ft-mlp\n    parameters: {weight: 1.0, density: 0.5}\n"
                      "  - model: ft-attn\n    parameters: {weight: 1.0, density: 0.5}\n"
                      "parameters: {lambda: 1.0}\n")
    mergehub.merge(recipe, store=a, to_store="ties", progress=False, echo=lambda t: None)
    push(a, "ties", repo := _repo("ties"), fmt=["hf", "mergehub"], base_model=base_repo,
         progress=False)
    meta, text = _card(hf, repo)
    assert {"merge", "ties", "mergehub"} <= set(meta["tags"])
    assert meta["base_model_relation"] == "merge" and meta["library_name"] == "transformers"
    assert "merge_method: ties" in text
    want = _export(a, "ties", tmp_path / "a-out")
    manifest = a.entry_manifest("ties")
    with _new_store(tmp_path / "b") as b:
        b.add(models["base-bf16"], "my-base", progress=False)  # same bytes, another name
        got = pull(b, repo, progress=False)
        assert (got.form, got.info.base, got.info.kind) == ("mergehub", "my-base", "merged")
        assert _export(b, "ties", tmp_path / "b-out") == want
        assert b.entry_manifest("ties")["blobs"].keys() == manifest["blobs"].keys()
        assert b.verify(progress=False).ok


def test_compressed_delta_round_trip_stays_compressed(hf, models, pushed_base, tmp_path):
    """A compeft entry pushes its dense form and its compressed blobs; the pull restores the
    compressed entry (same codec bytes) without decoding, even into a store whose copy of the
    base is encoded differently (then only the blob headers' base references change)."""
    a, base_repo = pushed_base
    a.add(models["ft-mlp"], "ft", base="base", progress=False)
    info = a.compress("ft", "compeft", {"density": 0.1}, progress=False)
    result = push(a, info.name, repo := _repo("compeft"), base_model=base_repo, progress=False)
    assert result.forms == ["hf", "mergehub"]
    assert any(f.startswith("mergehub/blobs/") for f in result.files)
    assert "model.safetensors" in result.files
    meta, text = _card(hf, repo)
    assert meta["mergehub"]["codec"] == "compeft" and {"compressed", "compeft"} <= set(meta["tags"])
    assert meta["mergehub"]["compression_ratio"] == pytest.approx(
        info.codecs["compeft"]["raw_bytes"] / info.codecs["compeft"]["stored_bytes"], rel=1e-3)
    want = _export(a, info.name, tmp_path / "a-out")

    with _new_store(tmp_path / "b") as b:  # the base pulled from the Hub: same blobs
        with pytest.raises(BaseMismatchError,
                           match=rf"delta against base 'base'.*pull\(store, '{base_repo}'\) first"):
            pull(b, repo, progress=False)
        assert info.name not in b
        b.add(models["base-bf16"], "base", progress=False)
        got = pull(b, repo, progress=False)
        assert got.form == "mergehub" and got.info.codecs["compeft"] == info.codecs["compeft"]
        assert got.info.stored_bytes == info.stored_bytes
        assert _export(b, info.name, tmp_path / "b-out") == want

    with _new_store(tmp_path / "c") as c:  # the base stored as a delta against another model
        other = make_tiny_llama(tmp_path / "other", seed=9)
        c.add(other, "other", progress=False)
        c.add(models["base-bf16"], "base", base="other", progress=False)
        got = pull(c, repo, progress=False)
        assert got.info.codecs["compeft"]["raw_bytes"] == info.codecs["compeft"]["raw_bytes"]
        assert _export(c, info.name, tmp_path / "c-out") == want
        assert c.verify(progress=False).ok

    with _new_store(tmp_path / "d") as d:  # a base with other weights is refused, by name
        d.add(make_tiny_llama(tmp_path / "wrong", seed=5), "wrong", progress=False)
        with pytest.raises(BaseMismatchError, match="'wrong' has other tensors"):
            pull(d, repo, base="wrong", progress=False)
        assert d.ls()[-1].name == "wrong"


def test_tall_entry_round_trip_ships_its_shared_vector(hf, models, pushed_base, tmp_path):
    """A TALL-compressed fine-tune (its blobs need the shared multi-task vector) pushed in the
    mergehub form alone comes back decoding to the same bytes, the shared vector included."""
    a, _ = pushed_base
    a.add(models["ft-mlp"], "mlp", base="base", progress=False)
    a.add(models["ft-attn"], "attn", base="base", progress=False)
    a.compress_tall(["mlp", "attn"], progress=False)
    manifest = a.entry_manifest("mlp-tall")
    assert any(meta["needs"] for meta in manifest["blobs"].values())
    result = push(a, "mlp-tall", repo := _repo("tall"), fmt="mergehub", progress=False)
    assert "model.safetensors" not in result.files
    with _new_store(tmp_path / "b") as b:
        b.add(models["base-bf16"], "base", progress=False)
        got = pull(b, repo, progress=False)
        assert got.info.codecs == a.show("mlp-tall").codecs
        assert _export(b, "mlp-tall", tmp_path / "b-out") == \
            _export(a, "mlp-tall", tmp_path / "a-out")
        assert b.verify(progress=False).ok and b.gc().blobs_removed == 0


def test_plain_peft_repo_made_by_peft_is_pulled_and_used(hf, pushed_base, tmp_path):
    """An adapter repo written by peft's own push_to_hub (no mergehub files), for a base loaded
    by transformers from the Hub, is pulled, tied to the base pulled from that repo (its
    base_model_name_or_path), and gives the same logits as the original."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    _, base_repo = pushed_base
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_repo, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    repo = _repo("peft-made")
    model.push_to_hub(repo)
    assert MANIFEST not in _list(repo) and "adapter_model.safetensors" in _list(repo)
    with _new_store(tmp_path / "s") as s:
        pull(s, base_repo, name="hub-base", progress=False)
        got = pull(s, repo, name="peft-lora", progress=False)
        assert (got.form, got.info.kind, got.info.base) == ("peft", "adapter", "hub-base")
        out = s.export("peft-lora", tmp_path / "out", progress=False)
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        want = model(x).logits
        used = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_repo, dtype=torch.float32), out)
        assert torch.equal(used(x).logits, want)


def test_subfolder_pull_of_an_uploaded_folder(hf, models, tmp_path):
    """A PEFT adapter uploaded into a folder of a repo with upload_folder (no mergehub files) is
    pulled with --subfolder; its files come back bit for bit."""
    from huggingface_hub import HfApi

    api, repo = HfApi(), _repo("folders")
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=models["lora"], path_in_repo="adapters/task-a")
    with _new_store(tmp_path / "s") as s:
        s.add(models["base-bf16"], "base", progress=False)
        with pytest.raises(RemoteError, match="no safetensors weights"):
            pull(s, repo, progress=False)  # nothing at the root
        with pytest.raises(RemoteError, match="adapters/nope"):
            pull(s, repo, subfolder="adapters/nope", progress=False)
        got = pull(s, repo, subfolder="adapters/task-a", base="base", progress=False)
        assert got.info.name == f"{repo.split('/')[1]}-adapters-task-a"
        assert (got.form, got.info.base) == ("peft", "base")
        assert got.info.provenance["hub"]["subfolder"] == "adapters/task-a"
        assert _export(s, got.info.name, tmp_path / "out") == dir_digests(models["lora"])


def test_push_into_subfolders_and_pull_them_back(hf, models, pushed_base, tmp_path):
    """Two entries pushed into two folders of one repo, and one at its root: each push leaves
    the others' files alone (a re-push into a folder replaces only that folder's stale files),
    and each comes back bit for bit with --subfolder."""
    a, _ = pushed_base
    a.add(models["lora"], "lora", base="base", progress=False)
    a.add(models["ft-mlp"], "ft", base="base", progress=False)
    repo = _repo("subfolders")
    push(a, "lora", repo, subfolder="adapters/lora", progress=False)
    got = push(a, "ft", repo, subfolder="/models/ft/", fmt="hf", progress=False)
    assert all(f.startswith("models/ft/") for f in got.files)
    push(a, "ft", repo, fmt="hf", progress=False)  # at the root
    files = set(_list(repo))
    assert {"adapters/lora/adapter_model.safetensors", "adapters/lora/README.md",
            "models/ft/model.safetensors", "models/ft/mergehub/manifest.json",
            "model.safetensors", "README.md"} <= files
    push(a, "lora", repo, subfolder="models/ft", progress=False)  # replaces ft's weights there
    files = set(_list(repo))
    assert "models/ft/model.safetensors" not in files and "model.safetensors" in files
    assert "models/ft/adapter_model.safetensors" in files
    assert "adapters/lora/adapter_model.safetensors" in files
    with pytest.raises(RemoteError, match="bad subfolder"):
        push(a, "lora", repo, subfolder="a/../b", progress=False)
    with _new_store(tmp_path / "b") as b:
        b.add(models["base-bf16"], "base", progress=False)
        for folder, want in (("adapters/lora", models["lora"]), ("models/ft", models["lora"])):
            got = pull(b, repo, subfolder=folder, name=folder.replace("/", "-"), progress=False)
            assert got.info.base == "base" and got.info.provenance["hub"]["subfolder"] == folder
            assert _export(b, got.info.name, tmp_path / folder) == dir_digests(want)
        got = pull(b, repo, name="ft-root", progress=False)
        assert _export(b, "ft-root", tmp_path / "root") == dir_digests(models["ft-mlp"])


def _list(repo: str, revision: str = "main") -> list[str]:
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(repo, revision=revision)


def test_revisions_branches_and_commits(hf, models, pushed_base, tmp_path):
    """Pushes to a branch leave main alone; pull takes @branch, @commit-sha and --revision."""
    a, _ = pushed_base
    a.add(models["ft-mlp"], "ft-mlp", base="base", progress=False)
    a.add(models["ft-attn"], "ft-attn", base="base", progress=False)
    repo = _repo("revs")
    first = push(a, "ft-mlp", repo, progress=False)
    second = push(a, "ft-attn", repo, revision="exp", progress=False)
    assert (first.revision, second.revision) == ("main", "exp") and first.commit != second.commit
    with _new_store(tmp_path / "b") as b:
        b.add(models["base-bf16"], "base", progress=False)
        assert pull(b, f"{repo}@exp", name="x", progress=False).commit == second.commit
        assert pull(b, repo, name="y", progress=False).commit == first.commit
        by_sha = pull(b, repo, revision=first.commit, name="z", progress=False)
        assert by_sha.revision == by_sha.commit == first.commit
        assert _export(b, "x", tmp_path / "x") == dir_digests(models["ft-attn"])
        assert _export(b, "y", tmp_path / "y") == _export(b, "z", tmp_path / "z") \
            == dir_digests(models["ft-mlp"])
        assert b.show("x").base == "base"
        with pytest.raises(RemoteError, match=r"revision 'nope' not found \(branches and tags: "
                                              r"exp, main\)"):
            pull(b, f"{repo}@nope", progress=False)
        with pytest.raises(RemoteError, match=f"revision '{'0' * 40}' not found"):
            pull(b, repo, revision="0" * 40, name="w", progress=False)
    with _new_store(tmp_path / "c") as c:  # no base there: the dense form stands alone
        alone = pull(c, repo, progress=False).info
        assert (alone.name, alone.kind, alone.base) == ("ft-mlp", "finetune", None)
        assert _export(c, "ft-mlp", tmp_path / "c-out") == dir_digests(models["ft-mlp"])
    # a second push to main replaces the model files and deletes what it no longer has
    push(a, "base", repo, fmt="mergehub", progress=False)
    files = _list(repo)
    assert "model.safetensors" not in files and any(f.startswith("mergehub/blobs/") for f in files)


def test_failures_missing_repo_and_write_permission(hf, models, tmp_path):
    with _new_store(tmp_path / "s") as s:
        with pytest.raises(RemoteError, match="org/absent: repository not found"):
            pull(s, "org/absent", progress=False)
        s.add(models["base-bf16"], "base", progress=False)
        hf.monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
        with pytest.raises(RemoteError, match="no write permission .*HTTP 403"):
            push(s, "base", repo := _repo("denied"), progress=False)
        hf.monkeypatch.delenv("HF_TOKEN")
        with pytest.raises(RemoteError, match="no write permission .*HTTP 401"):
            push(s, "base", repo, progress=False)
        assert not hf.hub.repo_path(repo).exists()
        with pytest.raises(RemoteError, match="is not a PEFT adapter"):
            push(s, "base", repo, fmt="peft", progress=False)
    with pytest.raises(RemoteError, match="ORG/NAME"):
        split_repo_ref("no-slash")
    with pytest.raises(RemoteError, match=r"org/x: ConnectError: .*\(http://127.0.0.1:1\)"):
        with _new_store(tmp_path / "t") as t:
            pull(t, "org/x", endpoint="http://127.0.0.1:1", progress=False)


def test_corrupted_file_is_refused_and_nothing_added(hf, models, pushed_base, tmp_path):
    """A file whose bytes differ from what the server reports (sha256 of the LFS pointer) or
    from the manifest is refused; nothing is added, and a fixed repo then pulls fine."""
    a, base_repo = pushed_base
    obj = next((hf.hub.repo_path(base_repo) / ".git" / "lfs" / "objects").rglob("*"))
    objs = [p for p in (hf.hub.repo_path(base_repo) / ".git" / "lfs" / "objects").rglob("*")
            if p.is_file()]
    assert len(objs) == 1 and obj
    good = objs[0].read_bytes()
    objs[0].write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with _new_store(tmp_path / "b") as b:
        with pytest.raises(IntegrityError, match="model.safetensors: downloaded bytes have "
                                                 "sha256 .* but the server reports"):
            pull(b, base_repo, progress=False)
        assert b.ls() == []
        objs[0].write_bytes(good)
        assert _export(b, pull(b, base_repo, progress=False).info.name, tmp_path / "o") == \
            dir_digests(models["base-bf16"])


def test_blob_not_matching_manifest_is_refused(hf, models, pushed_base, tmp_path):
    """A mergehub blob replaced consistently on the server (so the server's hash agrees) still
    fails the check against its name / the manifest."""
    a, _ = pushed_base
    a.add(models["ft-mlp"], "ft", base="base", progress=False)
    repo = _repo("tampered")
    push(a, "ft", repo, fmt="mergehub", progress=False)
    from huggingface_hub import CommitOperationAdd, HfApi

    victim = next(iter(a.entry_manifest("ft")["blobs"]))
    data = bytearray(a.blob_path(victim).read_bytes())
    data[-1] ^= 1  # another commit replaces one blob file with other bytes
    HfApi().create_commit(repo, [CommitOperationAdd(f"mergehub/blobs/{victim}", bytes(data))],
                          commit_message="tamper")
    with _new_store(tmp_path / "b") as b:
        b.add(models["base-bf16"], "base", progress=False)
        with pytest.raises(IntegrityError, match="does not match its sha256 name"):
            pull(b, repo, progress=False)
        assert "ft" not in b


@pytest.mark.parametrize("manifest, message", [
    ('{"mergehub_manifest": 1, "name": ' + "[" * 100_000 + "]" * 100_000 + "}",  # RecursionError
     "JSON nested deeper than 64 levels"),
    ('{"mergehub_manifest": 1, "name": ' + "[" * 70 + "]" * 70 + "}", "JSON nested deeper"),
    ("[1]", "not a JSON object"),
], ids=["recursion", "depth-70", "not-an-object"])
def test_deeply_nested_manifest_is_refused(hf, models, pushed_base, tmp_path, manifest,
                                           message):
    """A manifest rewritten on the server into deeply nested JSON (or no object) is refused
    with one error naming the file, before anything is added."""
    a, _ = pushed_base
    a.add(models["ft-mlp"], "ft", base="base", progress=False)
    repo = _repo("deep-manifest")
    push(a, "ft", repo, fmt="mergehub", progress=False)
    from huggingface_hub import CommitOperationAdd, HfApi

    HfApi().create_commit(repo, [CommitOperationAdd(MANIFEST, manifest.encode())],
                          commit_message="tamper")
    with _new_store(tmp_path / "b") as b:
        b.add(models["base-bf16"], "base", progress=False)
        with pytest.raises(MergehubError, match=f"{MANIFEST}: {message}"):
            pull(b, repo, progress=False)
        assert "ft" not in b


def test_interrupted_pull_resumes(hf, models, pushed_base, tmp_path):
    """A pull cut short after some files adds nothing; the next one downloads only the rest."""
    a, _ = pushed_base
    a.add(models["ft-sharded"], "ft", base="base", progress=False)
    repo = _repo("resume")
    push(a, "ft", repo, progress=False)
    shards = sorted(f for f in _list(repo) if f.endswith(".safetensors"))
    assert len(shards) > 2
    with _new_store(tmp_path / "b") as b:
        b.add(models["base-bf16"], "base", progress=False)
        hf.hub.fail.add(shards[-1])
        with pytest.raises(RemoteError, match=f"{shards[-1]}: file not found"):
            pull(b, repo, progress=False)
        assert "ft" not in b
        staged = list((b.root / "transfers").iterdir())
        assert len(staged) == 1 and (staged[0] / shards[0]).is_file()
        with pytest.raises(StoreError, match="'base' already exists"):
            pull(b, repo, name="base", progress=False)  # refused before any download
        hf.hub.fail.clear()
        seen = len(hf.hub.requests)
        got = pull(b, repo, progress=False)
        assert shards[-1] in got.downloaded and not set(shards[:-1]) & set(got.downloaded)
        fetched = [p for m, p, _ in hf.hub.requests[seen:] if "/resolve/" in p]
        assert fetched and not any(s in p for p in fetched for s in shards[:-1])
        assert _export(b, "ft", tmp_path / "o") == dir_digests(models["ft-sharded"])


def test_cli_push_pull_and_the_token_never_shows(hf, models, tmp_path, caplog):
    """hub push / hub pull from the command line; the token appears in no output, log,
    error, provenance, manifest or card."""
    caplog.set_level(logging.DEBUG)
    runner = CliRunner()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    repo = _repo("cli")
    outputs = []

    def hub(*args: str, code: int = 0) -> str:
        result = runner.invoke(cli, list(args))
        outputs.append(result.output)
        assert result.exit_code == code, result.output
        return result.output

    hub("--store", a, "add", str(models["base-bf16"]), "--name", "base")
    hub("--store", a, "add", str(models["lora"]), "--name", "lora", "--base", "base")
    out = hub("--store", a, "push", "base", repo, "--revision", "v1", "-m", "first")
    assert f"pushed 'base' to {repo}@v1 as hf" in out
    assert "pushed 'lora'" in hub("--store", a, "push", "lora", repo + "-lora")
    assert "pulled" in hub("--store", b, "pull", f"{repo}@v1", "--name", "base")
    out = hub("--store", b, "pull", repo + "-lora")
    assert "'lora' (adapter of 'base')" in out and "peft form" in out
    shown = hub("--store", b, "show", "lora", "--json")
    assert json.loads(shown)["provenance"]["hub"]["repo_id"] == repo + "-lora"
    hub("--store", b, "push", "lora", repo + "-again")  # its base came from the Hub: card says so
    assert _card(hf, repo + "-again")[0]["base_model"] == repo
    err = hub("--store", b, "pull", "org/absent-repo", code=2)
    assert err.startswith("error: org/absent-repo: repository not found")
    hf.monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    assert "no write permission" in hub("--store", a, "push", "base", _repo("ro"), code=2)
    hub("--store", b, "pull", f"{repo}@nope", code=2)
    assert "--subfolder" in hub("pull", "--help") and "--private" in hub("push", "--help")
    stored = [p.read_bytes() for root in (Path(a), Path(b), hf.hub.mirrors)
              for p in root.rglob("*") if p.is_file()]
    for secret in (WRITE_TOKEN, READ_TOKEN):
        assert not any(secret in o for o in outputs)
        assert secret not in caplog.text
        assert not any(secret.encode() in data for data in stored)
    # the token did go over the wire, to the write API, as the Hub expects
    assert any(h.get("authorization") == f"Bearer {WRITE_TOKEN}"
               for m, p, h in hf.hub.requests if "/commit/" in p)


def test_cli_push_pull_show_no_library_bars_off_a_terminal(hf, models, tmp_path):
    """huggingface_hub's own upload/download bars (switched on here, as they are by default
    outside the test suite) stay out of `hub push` / `hub pull` output that is not a terminal."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    repo = _repo("bars")
    enable_progress_bars()
    try:
        runner = CliRunner()
        outs = [runner.invoke(cli, ["--store", str(tmp_path / s), *args]) for s, args in (
            ("a", ["add", str(models["base-bf16"]), "--name", "base"]),
            ("a", ["push", "base", repo]),
            ("b", ["pull", repo, "--name", "base"]))]
    finally:
        disable_progress_bars()
    for r in outs:
        assert r.exit_code == 0, r.output
        assert r.stderr == "", r.stderr
