"""A lost, emptied, garbled or edited catalog; a damaged marker; a full disk; races of rm, gc
and store creation with writers; and verify naming every model a damaged blob affects.

The oracles are the models' source files (exports must equal them bit for bit), the exports
taken before the damage, and the catalog's state before it (names, kinds, bases, metrics).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergehub.errors import StoreError
from mergehub.hub.cli import cli
from mergehub.hub.demo import dir_digests
from mergehub.storage.catalog import _open_catalog
from mergehub.storage.store import Store


def _hub(root: Path, *args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--store", str(root), *map(str, args)])
    return result.exit_code, result.output


def _one_line_error(code: int, output: str, *fragments: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, output)
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def _entries(root: Path) -> list[tuple]:
    with Store(root) as store:
        return [(m.name, m.kind, m.base, m.format, m.created, m.metrics, m.provenance,
                 m.tensors, m.logical_bytes) for m in store.ls()]


def _exports(root: Path, out: Path) -> dict[str, dict[str, str]]:
    with Store(root) as store:
        return {m.name: dir_digests(store.export(m.name, out / m.name, progress=False))
                for m in store.ls()}


def _blob_files(root: Path) -> int:
    return sum(1 for p in (root / "blobs").rglob("*") if p.is_file())


@pytest.fixture
def filled(tmp_path, models) -> Path:
    """A store with a base, a fine-tune (deltas), a LoRA, a lossy copy of the fine-tune, and
    a model added then removed; closed (its WAL checkpointed)."""
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add(models["base-bf16"], "base", metrics={"loss": 1.5}, progress=False)
        store.add(models["ft-mlp"], "ft", base="base", provenance={"run": "r1"}, progress=False)
        store.add(models["lora"], "lora", base="base", progress=False)
        store.compress("ft", "bit1", progress=False)
        store.add(models["ft-attn"], "gone", base="base", progress=False)
        store.rm("gone")
    return root


_COMMANDS = [("ls",), ("show", "base"), ("verify",), ("gc",), ("rm", "lora"),
             ("export", "base", "-o", "{out}"), ("init",), ("compress", "ft", "-c", "compeft")]


def _every_command_refused(root: Path, tmp_path: Path, *fragments: str) -> None:
    blobs = _blob_files(root)
    for args in _COMMANDS:
        code, output = _hub(root, *(a.format(out=tmp_path / "x") for a in args))
        _one_line_error(code, output, *fragments)
    code, output = _hub(root, "add", tmp_path / "nowhere", "--name", "n")
    assert code == 2 and "Traceback" not in output
    assert _blob_files(root) == blobs  # gc refused: no blob was deleted
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_lost_catalog_refused_then_rebuilt_bit_exact(filled, tmp_path, models, damage):
    """Item 4: a store whose catalog is gone or emptied says so (every command, one line,
    exit 2), `hub gc` deletes nothing, and `hub verify --repair` rebuilds the catalog from the
    entry records: the same models (not the removed one), exports bit for bit as before."""
    before, exported = _entries(filled), _exports(filled, tmp_path / "before")
    catalog = filled / "catalog.sqlite"
    if damage == "missing":
        catalog.unlink()
    else:
        catalog.write_bytes(b"")
    _every_command_refused(filled, tmp_path, "store damaged", f"is {damage}", "verify --repair")
    assert not catalog.exists() or catalog.stat().st_size == 0  # nothing made a new empty one

    code, output = _hub(filled, "verify", "--repair")
    assert code == 0, output
    assert "rebuilt the catalog from the 4 entry records" in output and "OK" in output
    assert _entries(filled) == before  # 'gone' stays removed
    assert _exports(filled, tmp_path / "after") == exported
    for name in ("base", "ft", "lora"):
        assert exported[name] == dir_digests(models[{"base": "base-bf16", "ft": "ft-mlp",
                                                     "lora": "lora"}[name]])
    assert _hub(filled, "gc")[0] == 0 and _exports(filled, tmp_path / "gc") == exported


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no-tables"])
def test_unreadable_catalog_one_line_then_rebuilt(filled, tmp_path, damage):
    """Item 14: a catalog that is not a database, cut short or without its tables: one line
    and exit 2 from every command; `verify --repair` sets it aside and rebuilds it."""
    before, exported = _entries(filled), _exports(filled, tmp_path / "before")
    catalog = filled / "catalog.sqlite"
    if damage == "garbage":
        catalog.write_bytes(b"this is not a database" * 100)
    elif damage == "truncated":
        with open(catalog, "r+b") as f:
            f.truncate(catalog.stat().st_size // 3)
    else:
        db = sqlite3.connect(catalog)
        db.executescript("DROP TABLE tensors; DROP TABLE files;")
        db.close()
    _every_command_refused(filled, tmp_path, "catalog")
    code, output = _hub(filled, "verify", "--repair")
    assert code == 0, output
    assert "set it aside as catalog.sqlite.damaged-" in output
    assert list(filled.glob("catalog.sqlite.damaged-*"))
    assert _entries(filled) == before
    assert _exports(filled, tmp_path / "after") == exported


@pytest.mark.parametrize("damage", [b"", b"{not json", b"[1, 2]", b"\xff\xfe\x00"])
def test_damaged_marker_one_line_then_rewritten(filled, tmp_path, damage):
    """Item 14: a damaged store marker: one line and exit 2; `verify --repair` rewrites it."""
    (filled / "mergehub-store.json").write_bytes(damage)
    _every_command_refused(filled, tmp_path, "store marker damaged")
    code, output = _hub(filled, "verify", "--repair")
    assert code == 0 and "marker" in output and "OK" in output, output
    assert json.loads((filled / "mergehub-store.json").read_text()) == {"layout": 1}


def _edit(root: Path, sql: str, *params: object) -> None:
    db = sqlite3.connect(root / "catalog.sqlite")
    db.execute(sql, params)
    db.commit()
    db.close()


def _ft_tensors(root: Path) -> list[tuple]:
    db = sqlite3.connect(root / "catalog.sqlite")
    rows = db.execute("SELECT t.name, t.offset, t.blob, t.dtype, t.shape FROM tensors t "
                      "JOIN models m ON m.id = t.model_id WHERE m.name = 'ft' "
                      "ORDER BY t.file, t.offset").fetchall()
    db.close()
    return rows


@pytest.mark.parametrize("edit", ["swap-blobs", "offset", "drop-row", "base", "metrics"])
def test_edited_catalog_rows_fail_verify_and_are_restored(filled, tmp_path, models, edit):
    """Item 7: rows edited behind mergehub's back (every blob still intact, so the blob checks
    alone pass) fail `verify`, naming the model; `verify --repair` restores them from the
    record and the export is bit for bit the source again."""
    rows = _ft_tensors(filled)
    changed = [r for r in rows if "mlp" in r[0]]  # two tensors of one shape with other blobs
    a, b = next((x, y) for x in changed for y in changed
                if x[0] != y[0] and x[3:] == y[3:] and x[2] != y[2])
    if edit == "swap-blobs":
        _edit(filled, "UPDATE tensors SET blob = ? WHERE name = ? AND blob = ?", b[2], a[0], a[2])
        _edit(filled, "UPDATE tensors SET blob = ? WHERE name = ? AND blob = ?", a[2], b[0], b[2])
    elif edit == "offset":
        _edit(filled, "UPDATE tensors SET offset = offset + 2 WHERE name = ? AND blob = ?",
              a[0], a[2])
    elif edit == "drop-row":
        _edit(filled, "DELETE FROM tensors WHERE name = ? AND blob = ?", a[0], a[2])
    elif edit == "base":
        _edit(filled, "UPDATE models SET base_id = NULL, kind = 'base' WHERE name = 'ft'")
    else:
        _edit(filled, "UPDATE models SET metrics = '{\"acc\": 0.99}' WHERE name = 'ft'")
    code, output = _hub(filled, "verify")
    assert code == 2 and "model 'ft': its catalog rows" in output, output
    assert "affected models: ft" in output
    code, output = _hub(filled, "verify", "--repair")
    assert code == 0 and "model 'ft': restored its catalog rows from its record" in output, output
    assert _ft_tensors(filled) == rows
    with Store(filled) as store:
        out = store.export("ft", tmp_path / "ft", progress=False)
        assert store.show("ft").base == "base" and store.show("ft").metrics == {}
    assert dir_digests(out) == dir_digests(models["ft-mlp"])


def test_foreign_key_violation_fails_verify(filled):
    """Item 7: rows pointing at a model that does not exist (written with foreign keys off):
    `PRAGMA foreign_key_check` catches them."""
    db = sqlite3.connect(filled / "catalog.sqlite")
    blob = db.execute("SELECT blob FROM files LIMIT 1").fetchone()[0]
    db.execute("INSERT INTO files(model_id, path, role, blob) VALUES (999, 'x.json', 'side', ?)",
               (blob,))
    db.commit()
    db.close()
    code, output = _hub(filled, "verify")
    assert code == 2 and "of table files references a missing row of models" in output, output


def test_store_of_an_older_mergehub_is_upgraded(filled, tmp_path):
    """A catalog without the digest column and without records (an older mergehub's) opens:
    the digests and records are written once, and from then on a lost catalog is rebuilt."""
    before, exported = _entries(filled), _exports(filled, tmp_path / "before")
    db = sqlite3.connect(filled / "catalog.sqlite")
    db.execute("ALTER TABLE models DROP COLUMN digest")
    db.close()
    shutil.rmtree(filled / "entries")
    assert _entries(filled) == before
    assert len(list((filled / "entries").glob("*.json"))) == 4
    code, output = _hub(filled, "verify")
    assert code == 0 and "OK" in output, output
    (filled / "catalog.sqlite").unlink()
    assert _hub(filled, "verify", "--repair")[0] == 0
    assert _entries(filled) == before and _exports(filled, tmp_path / "after") == exported


def test_old_store_with_lost_catalog_is_not_emptied(filled, tmp_path):
    """No records to rebuild from (an older mergehub's store): repair refuses, changes
    nothing, and says to restore a backup."""
    shutil.rmtree(filled / "entries")
    (filled / "catalog.sqlite").unlink()
    blobs = _blob_files(filled)
    code, output = _hub(filled, "verify", "--repair")
    _one_line_error(code, output, "no entry records", "backup")
    assert not (filled / "catalog.sqlite").exists() and _blob_files(filled) == blobs


def test_records_of_no_model(filled, tmp_path, models):
    """A record whose model is not in the catalog (an add killed between its record and its
    commit) is counted by verify, restored by repair, removed by gc; a catalog replaced by an
    empty one makes gc refuse instead of deleting every blob."""
    with Store(filled) as store:
        store.add(models["ft-attn"], "late", base="base", progress=False)
        (digest,) = store._db.execute("SELECT digest FROM models WHERE name = 'late'").fetchone()
    record = filled / "entries" / f"{digest}.json"
    saved = record.read_bytes()
    with Store(filled) as store:
        store.rm("late")
    assert not record.exists()  # rm deleted it (before its commit)
    record.write_bytes(saved)  # as an add killed just before its commit leaves it
    code, output = _hub(filled, "verify")
    assert code == 0 and "1 entry records of no model" in output, output
    code, output = _hub(filled, "verify", "--repair")
    assert code == 0 and "model 'late': restored from its record" in output, output
    with Store(filled) as store:
        out = store.export("late", tmp_path / "late", progress=False)
        assert dir_digests(out) == dir_digests(models["ft-attn"])
        store.rm("late")
    record.write_bytes(saved)
    code, output = _hub(filled, "gc")
    assert code == 0 and "1 records of no model" in output and not record.exists(), output

    # a lost catalog replaced by an empty one (as an older mergehub's `hub ls` made)
    names = [e[0] for e in _entries(filled)]
    (filled / "catalog.sqlite").unlink()
    _open_catalog(filled, create=True)[0].close()
    blobs = _blob_files(filled)
    code, output = _hub(filled, "gc")
    _one_line_error(code, output, "refused", "verify --repair")
    assert _blob_files(filled) == blobs
    assert _hub(filled, "verify", "--repair")[0] == 0
    assert [e[0] for e in _entries(filled)] == names


def test_verify_names_every_model_a_damaged_blob_affects(store, models):
    """Item 17: a corrupt blob shared by two models (and the base of a third's deltas): verify
    names all three."""
    store.add(models["base-bf16"], "a", progress=False)
    store.add(models["base-bf16"], "b", progress=False)  # every blob shared with 'a'
    store.add(models["ft-mlp"], "ft", base="a", progress=False)
    (blob,) = store._db.execute(
        "SELECT b.ref FROM tensors t JOIN models m ON m.id = t.model_id JOIN blobs b "
        "ON b.id = t.blob WHERE m.name = 'ft' AND b.ref IS NOT NULL LIMIT 1").fetchone()
    path = store.root / "blobs" / blob[:2] / blob[2:]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    report = store.verify(progress=False)
    shared = [p for p in report.problems if blob[:16] in p and "is corrupt" in p]
    assert shared and "model 'a'" in shared[0] and "model 'b'" in shared[0], report.problems
    assert report.affected == {"a", "b", "ft"}


def test_rm_of_the_base_during_an_add_is_refused(tmp_path, models, monkeypatch):
    """Item 11: `hub rm BASE` lands while `hub add --base BASE` is encoding: the add's commit
    sees the base gone and adds nothing (it used to become its own base, with the base's id)."""
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add(models["base-bf16"], "base", progress=False)
        real = Store._transaction
        fired = []

        def racing(self):
            if self is store and not fired:
                fired.append(True)
                with Store(root) as other:
                    other.rm("base")
            return real(self)

        monkeypatch.setattr(Store, "_transaction", racing)
        with pytest.raises(StoreError, match="base 'base' of 'ft' was removed"):
            store.add(models["ft-mlp"], "ft", base="base", progress=False)
        monkeypatch.undo()
        assert fired and store.ls() == []
        assert store.verify(progress=False).ok


def test_gc_leaves_a_running_merge_alone(tmp_path, models, monkeypatch):
    """Item 12: `hub gc` while `hub merge --to-store` has written its output but not yet added
    it: the merge's work folder is held, gc leaves it, the merge lands intact."""
    import mergehub.merge.engine as engine

    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["ft-mlp"], "mlp", base="base", progress=False)
        store.add(models["ft-attn"], "attn", base="base", progress=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                      "  - model: mlp\n    parameters: {weight: 0.5}\n"
                      "  - model: attn\n    parameters: {weight: 0.5}\n")
    real = engine.execute
    removed = []

    def execute_then_gc(*args, **kwargs):
        result = real(*args, **kwargs)
        with Store(root) as other:
            removed.append(other.gc().transfers_removed)
        return result

    monkeypatch.setattr(engine, "execute", execute_then_gc)
    with Store(root) as store:
        engine.merge(recipe, None, store=store, to_store="merged", progress=False)
    monkeypatch.undo()
    with Store(root) as store:
        engine.merge(recipe, tmp_path / "direct", store=store, progress=False)
        out = store.export("merged", tmp_path / "merged", progress=False)
        assert store.verify(progress=False).ok
    assert removed == [0]
    assert dir_digests(out) == dir_digests(tmp_path / "direct")
    assert not list((root / "transfers").iterdir())  # the merge removed its work folder


_FULL_DISK = r'''
import json, sys
from pathlib import Path
from click.testing import CliRunner
from mergehub.hub.cli import cli
from mergehub.storage.catalog import _open_catalog
from mergehub.storage.store import Store

mount, base, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
root = mount / "store"
with Store.init(root) as store:
    store.add(base, "base", progress=False)
(root / "tmp" / "leftover").write_bytes(b"x" * 200_000)  # as a killed add leaves
try:
    with open(mount / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
except OSError as e:
    assert e.errno == 28, e
results = {}
for key, args in (("ls", ["ls"]), ("show", ["show", "base"]), ("verify", ["verify"]),
                  ("export", ["export", "base", "-o", str(out)]),
                  ("add", ["add", base, "--name", "other"]), ("gc", ["gc"]),
                  ("ls after gc", ["ls"])):
    r = CliRunner().invoke(cli, ["--store", str(root), *args])
    results[key] = [r.exit_code, r.output, repr(r.exception)]
print(json.dumps(results))
'''


def test_read_only_commands_work_on_a_full_disk(tmp_path, models):
    """Item 15: on a real full file system (a 4 MB tmpfs in a user namespace) ls, show, verify
    and export work; add fails with one line; gc frees a leftover first and succeeds."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c",
                            f"mount -t tmpfs -o size=4m tmpfs {mount}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace: {probe.stderr.decode()[:200]}")
    script = tmp_path / "full.py"
    script.write_text(_FULL_DISK)
    proc = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", f'mount -t tmpfs -o size=4m tmpfs "{mount}" && '
         f'exec "{sys.executable}" "{script}" "{mount}" "{models["base-bf16"]}" '
         f'"{tmp_path / "export"}"'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    for key in ("ls", "show", "verify", "export", "ls after gc"):
        assert results[key][0] == 0, (key, results[key])
    assert "base" in results["ls"][1] and "OK" in results["verify"][1]
    assert dir_digests(tmp_path / "export") == dir_digests(models["base-bf16"])
    code, output, _ = results["add"]
    _one_line_error(code, output)
    assert results["gc"][0] == 0 and "1 temporary files" in results["gc"][1], results["gc"]
    assert results["ls after gc"][1] == results["ls"][1]
