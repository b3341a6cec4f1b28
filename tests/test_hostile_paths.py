"""Hostile paths, manifests, blobs and output targets (issue 12, items 1, 2, 3 (import side),
6, 10 and 22): nothing a pulled repo, an edited catalog or a symlink chooses is ever written
outside the store or the output directory, an output directory never replaces a store, and a
malformed manifest is one clear error naming the repo and the field.

The Hub tests push to the test servers of ``tests/conftest.py`` (olah + the stand-in write API)
and then tamper with the repo by another commit, as a hostile repo owner would."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zstandard
from click.testing import CliRunner

from mergehub.errors import InputError, IntegrityError
from mergehub.hub.cli import cli
from mergehub.hub.demo import dir_digests
from mergehub.hub.remote import MANIFEST, pull, push
from mergehub.storage.blob_format import pack_blob, unpack_blob
from mergehub.storage.store import Store
from tests.hub_server import new_repo_id

#: file paths a manifest or catalog may carry that must never be joined to a target directory
HOSTILE_PATHS = {
    "parent": "../escaped.json",
    "deep-parent": "tokenizer/../../../escaped.json",
    "absolute": "/tmp/mergehub-escaped.json",
    "backslash": "..\\escaped.json",
    "nul": "config\x00.json",
    "empty": "",
    "dot": ".",
    "empty-part": "a//config.json",
    "dot-part": "./config.json",
    "trailing-slash": "config.json/",
}


@pytest.fixture(params=sorted(HOSTILE_PATHS))
def hostile_path(request: pytest.FixtureRequest) -> str:
    return HOSTILE_PATHS[request.param]


def _malformed_manifests(good: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Malformed variants of the pushed manifest ``good``: name -> (manifest, field the error
    must name)."""
    def changed(**fields: Any) -> dict[str, Any]:
        return {**json.loads(json.dumps(good)), **fields}

    blob = next(iter(good["blobs"]))
    tensor = good["tensors"][0]
    weights = next(f for f in good["files"] if f[1] == "weights")
    return {
        "not-an-object": ([good], "manifest"),
        "only-version": ({"mergehub_manifest": 1}, "name"),
        "empty-entry": (changed(files=[], tensors=[], blobs={}, external={}), "files"),
        "name-not-string": (changed(name=7), "name"),
        "kind": (changed(kind="root"), "kind"),
        "files-not-list": (changed(files={"a": 1}), "files"),
        "file-row-short": (changed(files=[weights[:2]]), "files[0]"),
        "file-role": (changed(files=[[weights[0], "exec", weights[2]]]), "files[0]"),
        "tensor-row-short": (changed(tensors=[tensor[:3]]), "tensors[0]"),
        "tensor-shape": (changed(tensors=[[*tensor[:4], "big", tensor[5]]]), "tensors[0]"),
        "tensor-offset": (changed(tensors=[[tensor[0], tensor[1], -8, *tensor[3:]]]),
                          "tensors[0]"),
        "tensor-dtype": (changed(tensors=[[*tensor[:3], "F33", *tensor[4:]]]), "tensors[0]"),
        "tensor-in-no-weights-file": (changed(tensors=[[tensor[0], "config.json",
                                                        *tensor[2:]]]), "tensors[0]"),
        "blob-id-path": (changed(blobs={"../../x": good["blobs"][blob]}), "blobs"),
        "blob-size-string": (changed(blobs={**good["blobs"], blob: {
            **good["blobs"][blob], "size": "12"}}), f"blobs[{blob[:16]}"),
        "blob-meta-missing": (changed(blobs={**good["blobs"], blob: {"codec": "lossless"}}),
                              f"blobs[{blob[:16]}"),
        "external-not-object": (changed(external=[1, 2]), "external"),
        "base-without-fingerprint": (changed(base={"name": "base", "tensors": 3}), "base"),
        "metrics-list": (changed(metrics=[1]), "metrics"),
        "duplicate-file": (changed(files=[*good["files"], good["files"][0]]), "files[")}


# --- an entry's manifest and blobs, as a push ships them -------------------------------------

@pytest.fixture
def shipped(store: Store, models: dict[str, Path], tmp_path: Path
            ) -> tuple[Store, dict[str, Any], Path]:
    """``store`` holding the bf16 base and fine-tune ``ft``, ``ft``'s manifest and a folder of
    its blob files named by id (what the ``mergehub`` form ships and ``pull`` imports)."""
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "ft", base="base", progress=False)
    manifest = store.entry_manifest("ft")
    blobs = tmp_path / "shipped"
    blobs.mkdir()
    for blob_id in manifest["blobs"]:
        shutil.copyfile(store.blob_path(blob_id), blobs / blob_id)
    return store, manifest, blobs


def _import(store: Store, manifest: dict[str, Any], blobs: Path) -> None:
    store.import_entry(manifest, blobs, "imported", base="base", progress=False)


def _replace_blob(manifest: dict[str, Any], blobs: Path, old: str, data: bytes) -> str:
    """Ship ``data`` instead of blob ``old`` (new id, manifest updated to agree)."""
    from mergehub.storage.blob_format import sha256

    new = sha256(data)
    (blobs / new).write_bytes(data)
    manifest["blobs"][new] = {**manifest["blobs"].pop(old), "size": len(data)}
    for row in manifest["tensors"] + manifest["files"]:
        if row[-1] == old:
            row[-1] = new
    return new


def _delta_blob(manifest: dict[str, Any]) -> str:
    """A shipped blob holding a tensor's lossless delta (planes of zstd frames)."""
    return next(b for b, m in manifest["blobs"].items()
                if m["codec"] == "lossless" and m["ref"] and m["raw_size"] > 1000)


def test_import_refuses_unsafe_file_path(shipped, hostile_path, tmp_path):
    """Item 2: a manifest file path that is absolute, climbs out, or is not a plain relative
    POSIX path is refused at import, naming the field; nothing is added."""
    store, manifest, blobs = shipped
    side = next(i for i, f in enumerate(manifest["files"]) if f[0] == "config.json")
    manifest["files"][side][0] = hostile_path
    with pytest.raises(IntegrityError, match=rf"files\[{side}\].*not a safe relative path"):
        _import(store, manifest, blobs)
    assert "imported" not in store


def test_import_refuses_malformed_manifests(shipped):
    """Item 22: each malformed manifest is one IntegrityError naming the field, never a
    KeyError / TypeError traceback, and adds nothing."""
    store, manifest, blobs = shipped
    for case, (bad, field) in _malformed_manifests(manifest).items():
        try:
            _import(store, bad, blobs)
        except IntegrityError as e:
            assert field in str(e), f"{case}: {e}"
        except Exception as e:  # noqa: BLE001  (what the test is about)
            pytest.fail(f"{case}: {type(e).__name__}: {e}")
        else:
            pytest.fail(f"{case}: accepted")
        assert "imported" not in store, case


def test_import_checks_blob_sizes_before_reading(shipped):
    """Item 3 (import side): a shipped blob file of another size than the manifest says is
    refused from its size (before its bytes are read); the manifest's decoded size must
    agree with the blob's header and with the tensor's dtype and shape."""
    store, manifest, blobs = shipped
    victim = _delta_blob(manifest)
    with open(blobs / victim, "ab") as f:
        f.write(b"\0")
    size = manifest["blobs"][victim]["size"]
    with pytest.raises(IntegrityError, match=rf"{victim[:16]}.* is {size + 1} bytes, the "
                                             rf"manifest says {size}$"):
        _import(store, manifest, blobs)
    shutil.copyfile(store.blob_path(victim), blobs / victim)

    lying = json.loads(json.dumps(manifest))
    lying["blobs"][victim]["raw_size"] += 2  # and its tensor one bf16 element more, to agree
    row = next(r for r in lying["tensors"] if r[5] == victim)
    assert row[3] == "BF16"
    row[4] = [math.prod(row[4]) + 1]
    with pytest.raises(IntegrityError, match=rf"{victim[:16]}.*decodes to .* bytes"):
        _import(store, lying, blobs)
    row = next(r for r in manifest["tensors"] if r[5] == victim)
    row[4] = [1]  # a tensor of one element stored in a blob of many
    with pytest.raises(IntegrityError, match=rf"tensor {row[0]!r}.*{row[3]} \[1\] is "
                                             r"\d+ bytes, its blob decodes to \d+"):
        _import(store, manifest, blobs)
    assert "imported" not in store


@pytest.mark.parametrize("version", [1, 2])
def test_import_checks_plane_count_against_transform(shipped, version):
    """Item 3 (import side): a lossless blob whose payload has more zstd planes than its
    transform writes (a decompression bomb's extra frames) is refused at import, without
    decoding; in the chunked format (version 2) and the one before it (version 1), whose
    payloads are the same for a tensor of one chunk."""
    store, manifest, blobs = shipped
    victim = _delta_blob(manifest)
    header, payload = unpack_blob((blobs / victim).read_bytes())
    assert header.version == 2 and header.nbytes <= header.params["chunk"]
    header = replace(header, version=version)
    count = struct.unpack_from("<I", payload)[0]
    sizes = struct.unpack_from(f"<{count}Q", payload, 4)
    frames = bytes(payload[4 + 8 * count:])
    extra = zstandard.ZstdCompressor().compress(bytes(header.nbytes))
    bomb = (struct.pack(f"<I{count + 2}Q", count + 2, *sizes, len(extra), len(extra))
            + frames + extra + extra)
    _replace_blob(manifest, blobs, victim, pack_blob(header, bomb))
    assert count == 2  # a bf16 delta: two byte planes
    with pytest.raises(IntegrityError, match=rf"{count + 2} zstd frames; transform delta has "
                                             rf"{count}"):
        _import(store, manifest, blobs)
    assert "imported" not in store



def test_ls_of_an_entry_without_bytes(store, models):
    """Item 22: `hub ls` of a store whose entries have no bytes at all (what an empty manifest
    used to import) lists them instead of dividing by zero."""
    store.add(models["base-bf16"], "base", progress=False)
    with sqlite3.connect(store.root / "catalog.sqlite") as db:
        db.execute("DELETE FROM tensors")
        db.execute("DELETE FROM files")
    code, output = _hub("--store", str(store.root), "ls")
    assert code == 0 and "base" in output.split() and "total: 0 B logical" in output, output

# --- export and merge outputs ------------------------------------------------------------

def _edit_path(store: Store, old: str, new: str) -> None:
    """Rename a file of every entry in the catalog, as a hand edit (or damage) would."""
    with sqlite3.connect(store.root / "catalog.sqlite") as db:
        db.execute("UPDATE files SET path = ? WHERE path = ?", (new, old))


def test_export_refuses_unsafe_catalog_path(store, models, tmp_path):
    """Item 2: a file path edited into the catalog cannot make export (exact or re-sharded,
    which goes through the merge writer) write outside the output directory."""
    store.add(models["base-bf16"], "base", progress=False)
    _edit_path(store, "config.json", "../escaped.model")
    out = tmp_path / "exports" / "out"
    for shard in (None, "100KB"):
        with pytest.raises(IntegrityError, match="not a safe relative path"):
            store.export("base", out, max_shard_size=shard, progress=False)
        assert not (tmp_path / "exports" / "escaped.model").exists()
        assert not out.exists()


def test_push_refuses_unsafe_catalog_path(hf, store, models):
    """Item 2: push checks the manifest it builds: an edited catalog path is refused before
    anything is uploaded (the mergehub form ships paths without exporting)."""
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "ft", base="base", progress=False)
    _edit_path(store, "config.json", "/tmp/mergehub-escaped.json")
    with pytest.raises(IntegrityError, match="files.*not a safe relative path"):
        push(store, "ft", repo := new_repo_id("bad-path"), fmt="mergehub", progress=False)
    assert not hf.hub.repo_path(repo).exists()


def _hub(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_outputs_never_replace_a_store(models, tmp_path):
    """Item 6: `hub export -o` and `hub merge -o` refuse a target that is a store, is inside
    one or contains one, with --overwrite too; the store stays whole. Outputs beside the store
    are still fine."""
    root = tmp_path / "home" / "store"
    other = tmp_path / "other-store"
    Store.init(other).close()
    with Store.init(root) as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["ft-mlp"], "ft", base="base", progress=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: base\n"
                      "models:\n  - model: ft\n    parameters: {weight: 1.0}\n")
    targets = {root: "is a mergehub store", root / "blobs": "inside the mergehub store",
               root / "new": "inside the mergehub store",
               root.parent: "contains the mergehub store", other: "is a mergehub store"}
    for target, why in targets.items():
        for command in (["export", "base"], ["merge", str(recipe)]):
            code, output = _hub("--store", str(root), *command, "-o", str(target),
                                "--overwrite")
            assert code == 2, (command, target, output)
            assert output.startswith(f"error: {target}: ") and why in output, output
    with Store(root) as store:
        assert [m.name for m in store.ls()] == ["base", "ft"] and store.verify(False).ok
    assert (other / "mergehub-store.json").is_file()
    assert not (root / "new").exists()
    beside = tmp_path / "home" / "out"
    for _ in range(2):
        assert _hub("--store", str(root), "export", "base", "-o", str(beside),
                    "--overwrite")[0] == 0
    assert dir_digests(beside) == dir_digests(models["base-bf16"])


# --- symlinks in a model folder ----------------------------------------------------------

def test_symlink_leaving_the_model_folder_is_refused(store, models, tmp_path):
    """Item 10: a side file or weights file that is a symlink out of the model folder is
    refused by add (one line), so it is never stored or pushed; links inside the folder, and
    the Hugging Face cache's snapshot links into its blobs folder, are followed."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    model = tmp_path / "model"
    shutil.copytree(models["base-bf16"], model)
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(secret)
    with pytest.raises(InputError, match=r"model/config.json: a symlink to .*secret.txt, "
                                         "outside the model folder"):
        store.add(model, "leak", progress=False)
    code, output = _hub("--store", str(store.root), "add", str(model), "--name", "leak")
    assert code == 2 and output.startswith("error: ") and "outside the model folder" in output
    (model / "config.json").unlink()
    weights = tmp_path / "elsewhere.safetensors"
    (model / "model.safetensors").rename(weights)
    (model / "model.safetensors").symlink_to(weights)
    shutil.copyfile(models["base-bf16"] / "config.json", model / "config.json")
    with pytest.raises(InputError, match="model.safetensors: a symlink"):
        store.add(model, "leak", progress=False)
    assert "leak" not in store

    (model / "model.safetensors").unlink()
    (model / "sub").mkdir()
    weights.rename(model / "sub" / "weights")
    (model / "model.safetensors").symlink_to("sub/weights")  # inside: fine
    store.add(model, "inside", progress=False)
    snapshot = tmp_path / "hf-cache" / "models--org--base" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "blobs").mkdir()
    for f in models["base-bf16"].iterdir():  # the layout huggingface_hub downloads into
        shutil.copyfile(f, snapshot.parent.parent / "blobs" / f"sha-{f.name}")
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", f"sha-{f.name}"))
    store.add(snapshot, "cached", progress=False)
    assert dir_digests(store.export("cached", tmp_path / "o", progress=False)) == \
        dir_digests(models["base-bf16"])


# --- pulls of tampered repos ---------------------------------------------------------------

def _tamper(repo: str, manifest: Any, files: dict[str, bytes] | None = None) -> str:
    """Commit ``manifest`` (and ``files``) to ``repo`` as its owner could; returns the commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    ops = [CommitOperationAdd(MANIFEST, json.dumps(manifest).encode())]
    ops += [CommitOperationAdd(p, data) for p, data in (files or {}).items()]
    return HfApi().create_commit(repo, ops, commit_message="tamper").oid


def _manifest_of(repo: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(repo, MANIFEST)).read_text())


@pytest.fixture
def pushed_lora(hf, pushed_base, models):
    """A LoRA pushed in the peft form (its README.md shadowed under mergehub/files/), and the
    store it came from; returns (store, repo id)."""
    a, _ = pushed_base
    a.add(models["lora"], "lora", base="base", progress=False)
    push(a, "lora", repo := new_repo_id("lora"), progress=False)
    return a, repo


def test_pull_shadowed_paths_cannot_escape(pushed_lora, models, tmp_path):
    """Item 1: a manifest's `shadowed` entries (files the card displaced) can name neither a
    path outside the model folder nor a file the manifest does not have; the pull is refused
    before anything is copied or added."""
    _, repo = pushed_lora
    good = _manifest_of(repo)
    assert good["shadowed"] == {"README.md": "mergehub/files/README.md"}
    store_root = tmp_path / "b"
    escapes = {"../../../escaped.txt": tmp_path / "escaped.txt",
               str(tmp_path / "absolute.txt"): tmp_path / "absolute.txt"}
    with Store.init(store_root) as b:
        b.add(models["base-bf16"], "base", progress=False)
        for path, where in escapes.items():
            commit = _tamper(repo, {**good, "shadowed": {**good["shadowed"],
                                                         path: "mergehub/files/README.md"}})
            with pytest.raises(IntegrityError, match=rf"{repo}: .*shadowed.*not a safe "
                                                     "relative path"):
                pull(b, repo, revision=commit, progress=False)
            assert not where.exists()
        commit = _tamper(repo, {**good, "shadowed": {**good["shadowed"],
                                                     ".bashrc": "mergehub/files/README.md"}})
        with pytest.raises(IntegrityError, match=rf"{repo}: .*shadowed.*'.bashrc' is not a file "
                                                 "of the manifest"):
            pull(b, repo, revision=commit, progress=False)
        assert "lora" not in b
        assert pull(b, repo, revision=_tamper(repo, good), progress=False).info.name == "lora"


def test_pull_refuses_unsafe_manifest_paths(hf, pushed_base, models, tmp_path):
    """Item 2: a pulled manifest whose file paths climb out is refused at the manifest reader,
    before any blob is downloaded, and a later export cannot write outside its folder."""
    a, _ = pushed_base
    a.add(models["ft-mlp"], "ft", base="base", progress=False)
    push(a, "ft", repo := new_repo_id("paths"), fmt="mergehub", progress=False)
    bad = _manifest_of(repo)
    side = next(i for i, f in enumerate(bad["files"]) if f[0] == "config.json")
    bad["files"][side][0] = "../../../../escaped.json"
    commit = _tamper(repo, bad)
    with Store.init(tmp_path / "b") as b:
        b.add(models["base-bf16"], "base", progress=False)
        seen = len(hf.hub.requests)
        with pytest.raises(IntegrityError, match=rf"^{repo}: mergehub/manifest.json: "
                                                 rf"files\[{side}\]\[0\]: .*not a safe relative path"):
            pull(b, repo, revision=commit, progress=False)
        assert not any("/blobs/" in p for _, p, _ in hf.hub.requests[seen:])
        assert "ft" not in b


def test_pull_of_malformed_manifests_is_one_line(hf, pushed_base, models, tmp_path):
    """Item 22: malformed pulled manifests are one error line (exit 2) naming the repo and the
    field, never a traceback; an empty one adds no entry, and `hub ls` keeps working."""
    a, _ = pushed_base
    a.add(models["ft-mlp"], "ft", base="base", progress=False)
    push(a, "ft", repo := new_repo_id("malformed"), fmt="mergehub", progress=False)
    good = _manifest_of(repo)
    store_root = str(tmp_path / "b")
    with Store.init(store_root) as b:
        b.add(models["base-bf16"], "base", progress=False)
    cases = _malformed_manifests(good)
    for case in ("not-an-object", "only-version", "empty-entry", "tensor-shape",
                 "blob-size-string", "blob-id-path", "duplicate-file"):
        manifest, field = cases[case]
        commit = _tamper(repo, manifest)
        code, output = _hub("--store", store_root, "pull", f"{repo}@{commit}")
        assert code == 2 and output.startswith(f"error: {repo}: mergehub/manifest.json: "), \
            (case, output)
        assert field in output and len(output.strip().splitlines()) == 1, (case, output)
    code, output = _hub("--store", store_root, "ls")
    assert code == 0 and "ft" not in output.split() and "total:" in output, output
    commit = _tamper(repo, {**good, "forms": "mergehub"})
    code, output = _hub("--store", store_root, "pull", f"{repo}@{commit}")
    assert code == 2 and "forms" in output, output


def test_pull_checks_blob_sizes_before_downloading(hf, pushed_base, models, tmp_path):
    """Item 3 (import side): a repo blob larger than its manifest says is refused from the
    size the server lists, before it is downloaded."""
    a, _ = pushed_base
    a.add(models["ft-mlp"], "ft", base="base", progress=False)
    push(a, "ft", repo := new_repo_id("sizes"), fmt="mergehub", progress=False)
    manifest = _manifest_of(repo)
    victim = _delta_blob(manifest)
    padded = a.blob_path(victim).read_bytes() + bytes(1 << 16)
    commit = _tamper(repo, manifest, {f"mergehub/blobs/{victim}": padded})
    with Store.init(tmp_path / "b") as b:
        b.add(models["base-bf16"], "base", progress=False)
        seen = len(hf.hub.requests)
        with pytest.raises(IntegrityError, match=rf"{repo}: mergehub/blobs/{victim[:16]}.* is "
                                                 rf"{len(padded)} bytes on the server, the "
                                                 "manifest says"):
            pull(b, repo, revision=commit, progress=False)
        assert not any(victim in p for _, p, _ in hf.hub.requests[seen:])
        assert "ft" not in b

