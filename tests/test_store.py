"""The store through its Python API: bit-exact add -> export, dedup, deltas, rm/gc, integrity."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from mergehub.errors import BaseMismatchError, InputError, IntegrityError, StoreError
from mergehub.hub.demo import dir_digests, make_tiny_llama
from mergehub.storage.checkpoint import open_checkpoint
from mergehub.storage.store import Store


def _blob_bytes(store: Store) -> int:
    return sum(p.stat().st_size for p in (store.root / "blobs").rglob("*") if p.is_file())


@pytest.mark.parametrize("key", ["base-bf16", "base-fp16", "base-fp32",
                                 "sharded-bf16", "sharded-fp16", "sharded-fp32", "lora"])
def test_add_export_bit_exact(store, models, tmp_path, key):
    info = store.add(models[key], "m", progress=False)
    assert info.kind == ("adapter" if key == "lora" else "base")
    out = store.export("m", tmp_path / "out", progress=False)
    assert dir_digests(out) == dir_digests(models[key])


def test_finetunes_against_base_bit_exact_and_small(store, models, tmp_path):
    base = store.add(models["base-bf16"], "base", progress=False)
    for key in ("ft-mlp", "ft-attn", "ft-sharded", "lora"):
        info = store.add(models[key], key, base="base", progress=False)
        assert info.base == "base"
        out = store.export(key, tmp_path / key, progress=False)
        assert dir_digests(out) == dir_digests(models[key]), key
    ft = store.show("ft-mlp")
    assert ft.kind == "finetune" and ft.logical_bytes == base.logical_bytes
    # only the MLP tensors changed; each is stored as a delta well under its raw size
    ckpt = open_checkpoint(models["ft-mlp"])
    changed = sum(t.nbytes for n, t in ckpt.tensors.items() if "mlp" in n)
    assert 0 < ft.stored_bytes < 0.7 * changed
    assert store.show("lora").kind == "adapter"


def test_identical_tensors_stored_once(store, models):
    store.add(models["base-bf16"], "a", progress=False)
    size = _blob_bytes(store)
    info = store.add(models["base-bf16"], "b", base="a", progress=False)
    assert info.stored_bytes == 0 and _blob_bytes(store) == size
    # the same bytes in another layout (sharded) reuse every tensor blob
    store.add(models["sharded-bf16"], "c", progress=False)
    tensor_blobs = {r[0] for r in store._db.execute("SELECT DISTINCT blob FROM tensors")}
    ckpt = open_checkpoint(models["base-bf16"])
    distinct = {bytes(ckpt.read_bytes(n)) for n in ckpt.tensors}  # the RMSNorm weights are all ones
    assert len(tensor_blobs) == len(distinct) < len(ckpt.tensors)


def test_unchanged_tensors_reference_base_blobs(store, models):
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-attn"], "ft", base="base", progress=False)
    rows = dict(store._db.execute(
        "SELECT t.name, t.blob = b.blob FROM tensors t JOIN tensors b ON b.name = t.name "
        "JOIN models mt ON mt.id = t.model_id JOIN models mb ON mb.id = b.model_id "
        "WHERE mt.name = 'ft' AND mb.name = 'base'").fetchall())
    assert rows and all(bool(same) != ("self_attn" in name) for name, same in rows.items())


def test_open_loads_tensors(store, models):
    store.add(models["base-fp16"], "m", progress=False)
    stored = store.open("m")
    ckpt = open_checkpoint(models["base-fp16"])
    assert [s.name for s in stored.specs()] == list(ckpt.tensors)
    for name in ckpt.tensors:
        assert torch.equal(stored.load(name), ckpt.load(name))
    assert json.loads(stored.side_file("config.json"))["hidden_size"] == 64


def test_metrics_provenance_and_kinds(store, models):
    info = store.add(models["base-bf16"], "m", kind="merged", metrics={"loss": 0.25},
                     provenance={"recipe": "ties.yaml"}, progress=False)
    assert info.kind == "merged" and info.metrics == {"loss": 0.25}
    assert info.provenance["recipe"] == "ties.yaml"
    assert info.provenance["source"] == str(models["base-bf16"].absolute())
    assert "mergehub_version" in info.provenance
    lora = store.add(models["lora"], "l", progress=False)
    assert lora.provenance["base_model_name_or_path"]
    with pytest.raises(StoreError, match="invalid kind"):
        store.add(models["base-bf16"], "x", kind="weird", progress=False)
    with pytest.raises(StoreError, match="invalid model name"):
        store.add(models["base-bf16"], "bad name", progress=False)


def test_errors(store, models, tmp_path):
    store.add(models["base-bf16"], "base", progress=False)
    with pytest.raises(StoreError, match="'base' already exists"):
        store.add(models["base-bf16"], "base", progress=False)
    with pytest.raises(StoreError, match="no model named 'nope'"):
        store.add(models["ft-mlp"], "ft", base="nope", progress=False)
    for call in (lambda: store.show("nope"), lambda: store.rm("nope"),
                 lambda: store.export("nope", tmp_path / "o", progress=False)):
        with pytest.raises(StoreError, match="no model named 'nope'"):
            call()
    assert [m.name for m in store.ls()] == ["base"]


def test_base_mismatch_names_tensor(store, models, tmp_path):
    store.add(models["base-bf16"], "base", progress=False)
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergehub.hub.demo import TINY_LLAMA
    wider = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "vocab_size": 300}))
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(BaseMismatchError, match=r"'lm_head.weight' has shape \[300, 64\] but "
                                                r"\[256, 64\] in base 'base'"):
        store.add(tmp_path / "wider", "w", base="base", progress=False)
    deeper = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 3}))
    deeper.save_pretrained(tmp_path / "deeper")
    with pytest.raises(BaseMismatchError, match=r"'model.layers.2.input_layernorm.weight' is not in base"):
        store.add(tmp_path / "deeper", "d", base="base", progress=False)
    store.add(tmp_path / "deeper", "deeper", progress=False)
    with pytest.raises(BaseMismatchError, match="of base 'deeper' is missing"):
        store.add(models["ft-mlp"], "ft", base="deeper", progress=False)
    # a LoRA whose target modules the base lacks
    store.add(models["lora"].parent / "lora" / "adapter_model.safetensors", "raw-lora", progress=False)
    with pytest.raises(BaseMismatchError, match=r"targets 'model.layers.0.self_attn.q_proj.weight'"):
        store.add(models["lora"], "lora", base="raw-lora", progress=False)
    assert not (store.root / "tmp").exists() or not any((store.root / "tmp").iterdir())


def test_rm_and_gc(store, models, tmp_path):
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "ft", base="base", progress=False)
    store.add(models["base-fp32"], "other", progress=False)
    with pytest.raises(StoreError, match="it is the base of 'ft'"):
        store.rm("base")
    before = _blob_bytes(store)
    store.rm("other")
    report = store.gc()
    assert report.blobs_removed > 0 and _blob_bytes(store) == before - report.bytes_freed
    store.rm("ft")
    assert store.gc().blobs_removed > 0
    out = store.export("base", tmp_path / "out", progress=False)  # survivors intact
    assert dir_digests(out) == dir_digests(models["base-bf16"])
    assert store.verify(progress=False).ok
    store.rm("base")
    store.gc()
    assert _blob_bytes(store) == 0


def test_gc_of_a_base_and_its_delta_fine_tune_removed_together(store, models):
    """A fine-tune stored as deltas of its base, then both removed: one gc deletes every blob
    (it used to delete a base blob row before the delta row referencing it: FOREIGN KEY
    constraint failed)."""
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "ft", base="base", progress=False)
    assert store._db.execute("SELECT COUNT(*) FROM blobs WHERE ref IS NOT NULL").fetchone()[0]
    store.rm("ft")
    store.rm("base")
    report = store.gc()
    assert report.blobs_removed > 0 and _blob_bytes(store) == 0
    assert store._db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0] == 0
    assert store.verify(progress=False).ok


def test_gc_clears_temp_files_and_dirs_left_by_killed_work(store, models):
    store.add(models["base-bf16"], "base", progress=False)
    (store.root / "tmp" / "add-1234.blob").write_bytes(b"partial")
    left = store.root / "tmp" / "merge-abcd" / "out"  # a killed `hub merge --to-store`
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"partial")
    assert store.gc().temp_files_removed == 2
    assert list((store.root / "tmp").iterdir()) == []
    assert store.verify(progress=False).ok


def test_gc_removes_transfers_no_process_holds(store):
    """An interrupted pull's folder is removed by gc; one in use (locked by its push / pull) is
    kept; a transfer whose folder gc removed while it waited for the lock makes it anew."""
    with store.transfer("pull-org--a--c0ffee") as held:
        (held / "part.safetensors").write_bytes(b"partial")
        with store.transfer("pull-org--b--c0ffee") as left:
            (left / "x").write_bytes(b"x")
        assert store.gc().transfers_removed == 1  # b: nobody holds it
        assert held.is_dir() and not left.exists()
    assert store.gc().transfers_removed == 1 and not held.exists()
    folder = store.root / "transfers" / "pull-again"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # gc holds it, about to remove it
    got = []

    def pull() -> None:
        with store.transfer("pull-again") as f:
            got.append(f.is_dir())

    waiting = threading.Thread(target=pull)
    waiting.start()
    time.sleep(0.2)
    shutil.rmtree(folder)
    os.close(fd)
    waiting.join(10)
    assert got == [True]  # made anew (locking the removed folder would leave none)


def test_gc_keeps_base_blobs_of_deltas(store, models, tmp_path):
    """A delta blob needs its reference even when no tensor row points at the reference."""
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "ft", base="base", progress=False)
    store._db.execute("PRAGMA foreign_keys=OFF")  # simulate a base whose rows are gone
    store._db.execute("DELETE FROM models WHERE name = 'base'")
    store._db.execute("UPDATE models SET base_id = NULL")
    store.gc()
    out = store.export("ft", tmp_path / "out", progress=False)
    assert dir_digests(out) == dir_digests(models["ft-mlp"])


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_blob_detected_with_model_and_tensor(store, models, tmp_path):
    store.add(models["base-bf16"], "base", progress=False)
    name, blob = store._db.execute(
        "SELECT name, blob FROM tensors WHERE name LIKE '%q_proj%' LIMIT 1").fetchone()
    _flip_byte(store._blob_path(blob))
    with pytest.raises(IntegrityError, match=rf"model 'base', tensor '{name}': blob .* is corrupt"):
        store.export("base", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    report = store.verify(progress=False)
    assert not report.ok and any(name in p and "corrupt" in p for p in report.problems)
    store._blob_path(blob).unlink()
    assert any("is missing" in p for p in store.verify(progress=False).problems)


def test_a_read_checks_the_blob_header_against_the_catalog(store, models, tmp_path):
    """Reads do not hash a blob's stored bytes (the decoded bytes are checked instead); a blob
    file swapped for another valid blob, whose header then names another original, is caught
    before decoding by the catalog's record of that original, naming model and tensor."""
    store.add(models["base-bf16"], "base", progress=False)
    (a_name, a_blob), (_, b_blob) = store._db.execute(
        "SELECT name, blob FROM tensors WHERE name LIKE '%q_proj.weight' ORDER BY name "
        "LIMIT 2").fetchall()  # two layers' weights: the same shape, other bytes
    store._blob_path(a_blob).write_bytes(store._blob_path(b_blob).read_bytes())
    with pytest.raises(IntegrityError, match=rf"model 'base', tensor '{a_name}': blob \w+ is "
                                             "corrupt \\(its header disagrees with the catalog"):
        store.export("base", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert any(a_name in p for p in store.verify(progress=False).problems)


def test_verify_checks_decoded_bytes(store, models):
    """A blob whose header lies about the original's hash is caught after decoding."""
    from dataclasses import replace

    from mergehub.storage.blob_format import pack_blob, unpack_blob

    store.add(models["base-bf16"], "base", progress=False)
    name, blob = store._db.execute("SELECT name, blob FROM tensors LIMIT 1").fetchone()
    header, payload = unpack_blob(store._blob_path(blob).read_bytes())
    forged = pack_blob(replace(header, sha256="0" * 64), bytes(payload))
    forged_id, _ = store._write_blob([forged])
    store._db.execute("INSERT INTO blobs VALUES (?, 'lossless', NULL, ?, ?, ?)",
                      (forged_id, "0" * 64, header.nbytes, len(forged)))
    store._db.execute("UPDATE tensors SET blob = ? WHERE name = ?", (forged_id, name))
    problems = store.verify(progress=False).problems
    assert any(name in p and "decodes to bytes whose sha256 does not match" in p for p in problems)


def test_resharded_export_loads(store, models, tmp_path):
    from transformers import AutoModelForCausalLM

    store.add(models["base-bf16"], "base", progress=False)
    out = store.export("base", tmp_path / "out", max_shard_size="50KB", progress=False)
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").state_dict()
    ckpt = open_checkpoint(models["base-bf16"])
    assert all(torch.equal(loaded[n], ckpt.load(n)) for n in ckpt.tensors)
    store.add(models["lora"], "lora", progress=False)
    with pytest.raises(StoreError, match="PEFT adapter: it cannot be re-sharded"):
        store.export("lora", tmp_path / "o2", max_shard_size="1GB", progress=False)


def test_export_overwrite(store, models, tmp_path):
    store.add(models["base-bf16"], "base", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(Exception, match="not empty"):
        store.export("base", out, progress=False)
    store.export("base", out, overwrite=True, progress=False)
    assert dir_digests(out) == dir_digests(models["base-bf16"])


def test_store_root_resolution(tmp_path, monkeypatch, models):
    monkeypatch.setenv("MERGEHUB_HOME", str(tmp_path / "env-store"))
    with Store.init() as s:
        assert s.root == tmp_path / "env-store"
    monkeypatch.delenv("MERGEHUB_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with Store.init() as s:
        assert s.root == tmp_path / "home" / ".cache" / "mergehub"
    with pytest.raises(StoreError, match="no mergehub store at"):
        Store(tmp_path / "missing")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(StoreError, match="not empty and is not a mergehub store"):
        Store.init(tmp_path / "full")


def test_reopen_store_keeps_models(tmp_path, models):
    with Store.init(tmp_path / "s") as s:
        s.add(models["base-bf16"], "base", progress=False)
    with Store(tmp_path / "s") as s:
        assert [m.name for m in s.ls()] == ["base"]
        assert s.verify(progress=False).ok


def test_tied_duplicate_tensors_share_blob(store, tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(64, 32)
    save_file({"a": t, "b": t.clone(), "c": torch.randn(5)}, tmp_path / "m.safetensors")
    store.add(tmp_path / "m.safetensors", "m", progress=False)
    blobs = dict(store._db.execute("SELECT name, blob FROM tensors"))
    assert blobs["a"] == blobs["b"] != blobs["c"]
    out = store.export("m", tmp_path / "out", progress=False)
    assert (out / "m.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()


def test_unreadable_side_file_is_clear(store, models, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(models["base-bf16"], d)
    (d / "config.json").unlink()
    (d / "config.json").symlink_to(d / "dangling")
    # a dangling symlink cannot be kept: one clear error, not a file silently left out
    with pytest.raises(InputError, match=r"config\.json: a broken symlink \(to .*dangling\)"):
        store.add(d, "m", progress=False)
    assert "m" not in store


def _depths(store) -> dict[str, int]:
    """Each blob's number of references to follow to a self-contained blob."""
    refs = dict(store._db.execute("SELECT id, ref FROM blobs"))
    depth = {}
    for blob in refs:
        d, b = 0, blob
        while refs[b] is not None:
            d, b = d + 1, refs[b]
        depth[blob] = d
    return depth


def test_chain_of_finetunes_stays_a_few_deltas_deep(store, models, tmp_path):
    """Fine-tunes of fine-tunes: each delta references its base's tensor while that is fewer
    than MAX_DELTA_DEPTH deltas deep, else the self-contained blob, so reads stay cheap and
    everything exports bit for bit."""
    from mergehub.hub.demo import make_finetune
    from mergehub.storage.store import MAX_DELTA_DEPTH

    store.add(models["base-bf16"], "ft0", progress=False)
    previous, paths = models["base-bf16"], {}
    for i in range(1, 20):
        path = make_finetune(previous, tmp_path / f"ft{i}", pattern="mlp" if i % 2 else "self_attn",
                             seed=100 + i)
        store.add(path, f"ft{i}", base=f"ft{i - 1}", progress=False)
        previous = paths[i] = path
    depth = _depths(store)
    assert max(depth.values()) == MAX_DELTA_DEPTH
    for i in (5, 19):
        out = store.export(f"ft{i}", tmp_path / f"out{i}", progress=False)
        assert dir_digests(out) == dir_digests(paths[i])
    assert store.verify(progress=False).ok


def test_small_change_of_a_finetune_costs_only_its_own_delta(store, models, tmp_path):
    """A fine-tune changing 1% of a fine-tune's MLP weights is coded against that fine-tune,
    not the base: a fraction of the bytes a delta against the base takes; it exports bit for
    bit after a gc."""
    from safetensors.torch import load_file, save_file

    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "sft", base="base", progress=False)
    dpo = tmp_path / "dpo"
    shutil.copytree(models["ft-mlp"], dpo)
    tensors = load_file(dpo / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if "mlp" in name:
            hit = torch.rand(t.shape, generator=gen) < 0.01
            tensors[name] = torch.where(hit, t * 1.01, t)
    save_file(tensors, dpo / "model.safetensors", metadata={"format": "pt"})
    store.add(dpo, "dpo", base="sft", progress=False)
    with Store.init(tmp_path / "other") as other:  # the same blobs would be shared in one store
        other.add(models["base-bf16"], "base", progress=False)
        other.add(dpo, "dpo", base="base", progress=False)
        assert store.show("dpo").stored_bytes * 3 < other.show("dpo").stored_bytes
    store.gc()
    assert dir_digests(store.export("dpo", tmp_path / "out", progress=False)) == dir_digests(dpo)
    assert store.verify(progress=False).ok


def test_checking_later_moves_the_hash_off_the_read_and_raises_at_finish(store, tmp_path):
    """In a ``checking_later`` block (what a merge uses) a read returns before its bytes are
    hashed, the caller may write into what it got at once, and ``finish`` raises for a blob
    that decodes to other bytes (naming model and tensor); an error of the block's own is the
    one that propagates; no block leaves its hashing thread running."""
    import threading

    from safetensors.torch import save_file

    def hashing() -> int:
        return sum(t.name == "mergehub-sha256" and t.is_alive() for t in threading.enumerate())

    big = torch.randn(3 << 16, generator=torch.Generator().manual_seed(2))
    (tmp_path / "m").mkdir()
    save_file({"big": big, "small": torch.arange(5.0)}, str(tmp_path / "m" / "model.safetensors"))
    store.add(tmp_path / "m", "m", progress=False)
    with store.checking_later() as finish:
        data = store.open("m").read_bytes("big")
        data[:4] = b"\0\0\0\0"  # the check hashes its own copy
        assert torch.equal(store.open("m").load("small"), torch.arange(5.0))
        finish()
    assert bytes(data[4:]) == big.numpy().tobytes()[4:]
    (blob,) = store._db.execute("SELECT blob FROM tensors WHERE name = 'big'").fetchone()
    path = store._blob_path(blob)
    _flip_byte(path, len(path.read_bytes()) // 2)
    with store.checking_later() as finish:
        store.open("m").read_bytes("big")  # decodes without complaint: checked later
        with pytest.raises(IntegrityError, match="model 'm', tensor 'big': blob .* decodes to "
                                                 "bytes whose sha256 does not match"):
            finish()
    with pytest.raises(IntegrityError, match="decodes to bytes whose sha256"):
        with store.checking_later():  # leaving the block finishes too
            store.open("m").read_bytes("big")
    with pytest.raises(RuntimeError, match="the block's own"):
        with store.checking_later():
            store.open("m").read_bytes("big")
            raise RuntimeError("the block's own")
    with pytest.raises(IntegrityError, match="decodes to bytes whose sha256"):
        store.open("m").read_bytes("big")  # outside a block: checked by the read itself
    assert hashing() == 0


def test_disk_bytes_counts_shared_blobs_once(store, models):
    store.add(models["base-bf16"], "a", progress=False)
    store.add(models["base-bf16"], "b", progress=False)  # no base: each "stores" everything
    assert store.disk_bytes() == store.show("a").stored_bytes == store.show("b").stored_bytes
    assert store.disk_bytes() == _blob_bytes(store)


def test_a_multi_chunk_blob_is_hashed_beside_its_decoding(store, tmp_path):
    """A blob of several decoded chunks is hashed on a thread while it decodes: a read gives
    the same bytes, a byte flipped in the middle of its payload is still caught (naming the
    model and tensor), and neither a finished read, nor a failed one, nor one stopped
    part-way leaves the hashing thread running."""
    import threading

    from safetensors.torch import save_file

    from mergehub.storage import codec

    n = (codec.CHUNK_BYTES * 5 // 2) // 4  # 2.5 chunks of float32
    big = torch.randn(n, generator=torch.Generator().manual_seed(1))
    (tmp_path / "m").mkdir()
    save_file({"big": big, "small": torch.ones(3)}, str(tmp_path / "m" / "model.safetensors"))
    store.add(tmp_path / "m", "m", progress=False)

    def hashing() -> int:
        return sum(t.name == "mergehub-sha256" and t.is_alive() for t in threading.enumerate())

    assert torch.equal(store.open("m").load("big"), big)
    pieces = store.open("m").iter_bytes("big")
    next(iter(pieces))
    pieces.close()  # stopped part-way
    assert hashing() == 0
    (blob,) = store._db.execute("SELECT blob FROM tensors WHERE name = 'big'").fetchone()
    path = store._blob_path(blob)
    _flip_byte(path, len(path.read_bytes()) // 2)
    with pytest.raises(IntegrityError, match="model 'm', tensor 'big': blob .* decodes to bytes "
                                             "whose sha256 does not match"):
        store.open("m").load("big")
    assert hashing() == 0
