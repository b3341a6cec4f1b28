"""``verify --repair``: make the catalog agree with the entry records again, rebuilding a
lost or damaged catalog from them."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergehub.errors import CatalogDamagedError, IntegrityError, StoreError
from mergehub.storage.atomic import fsync_dir, write_file_atomic
from mergehub.storage.catalog import (
    CATALOG, ENTRIES, LAYOUT_VERSION, _flock, _open_catalog, _read_marker, default_root)
from mergehub.storage.blob_format import sha256
from mergehub.storage.frames import BlobFormatError
from mergehub.storage.lossy_blobs import blob_needs
from mergehub.storage.paths import MARKER, safe_relpath


@dataclass
class RepairReport:
    """Result of :meth:`Store.repair`: what was repaired, and what could not be."""

    actions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class StoreRepair:
    """The repair part of :class:`~mergehub.storage.store.Store`."""

    @classmethod
    def repair(cls, root: str | Path | None = None) -> RepairReport:
        """Make the catalog agree with the entry records again (``hub verify --repair``).

        A damaged marker is written again. A catalog that is missing, empty, unreadable or
        fails SQLite's integrity check is set aside (``catalog.sqlite.damaged-<time>``) and
        rebuilt from the records. Then, per model: rows that differ from its recorded digest
        are restored from its record; a missing record is written again from rows that match
        the digest; rows without a digest (an older mergehub's) are recorded as they are.
        Records of no model (a lost catalog's, or an add interrupted just before its commit)
        are restored where their blobs are all present and the name is free. Removed models
        do not come back: ``rm`` deletes the record first. Holds the store lock exclusively.
        """
        root = Path(root).expanduser() if root is not None else default_root()
        if not (root / MARKER).exists() and not (root / "blobs").is_dir():
            raise StoreError(f"no mergehub store at {root}")
        report = RepairReport()
        with _flock(root / "lock", exclusive=True):
            try:
                _read_marker(root)
            except CatalogDamagedError:
                write_file_atomic(root / MARKER, json.dumps({"layout": LAYOUT_VERSION}).encode())
                report.actions.append(f"wrote the damaged store marker {MARKER} again")
            why = None
            try:
                store = cls(root)
            except CatalogDamagedError as e:
                why = str(e)
            else:
                try:
                    bad = [m for (m,) in store._db.execute("PRAGMA integrity_check") if m != "ok"]
                except sqlite3.DatabaseError as e:
                    bad = [str(e)]
                if bad:
                    store.close()
                    why = f"the catalog fails SQLite's integrity check: {bad[0]}"
            if why is not None:
                cls._set_catalog_aside(root, why, report)
                store = cls(root)
            with store:
                store._repair_entries(report)
        return report

    @staticmethod
    def _set_catalog_aside(root: Path, why: str, report: RepairReport) -> None:
        """Rename a damaged catalog (and its WAL files) aside and create an empty one."""
        folder = root / ENTRIES
        records = list(folder.glob("*.json")) if folder.is_dir() else []
        if not records and any((root / "blobs").rglob("*")):
            raise StoreError(f"{root}: {why}; and there are no entry records to rebuild it "
                             "from (a store written by an older mergehub?): restore "
                             f"{CATALOG} from a backup. Nothing was changed")
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for suffix in ("", "-wal", "-shm"):
            path = root / f"{CATALOG}{suffix}"
            if path.exists():
                os.replace(path, root / f"{CATALOG}.damaged-{stamp}{suffix}")
        fsync_dir(root)
        _open_catalog(root, create=True)[0].close()
        report.actions.append(f"{why.split('; ')[0]}: set it aside as {CATALOG}.damaged-{stamp} "
                              f"and rebuilt the catalog from the {len(records)} entry records")

    def _repair_entries(self, report: RepairReport) -> None:
        """The per-model part of :meth:`repair`, in one transaction."""
        records = {d: r for d in self._record_files() if (r := self._read_record(d)) is not None}
        with self._transaction() as db:
            db.execute("PRAGMA defer_foreign_keys = ON")
            for model_id, name, recorded in db.execute(
                    "SELECT id, name, digest FROM models ORDER BY id").fetchall():
                try:
                    actual = sha256(self._entry_record(model_id))
                except IntegrityError:
                    actual = None
                if recorded is None:
                    if actual is None:
                        report.problems.append(f"model {name!r}: catalog rows unreadable and "
                                               "no record: `hub rm` it")
                        continue
                    self._record(db, model_id)
                    report.actions.append(f"model {name!r}: recorded the digest of its rows")
                elif actual == recorded:
                    if recorded not in records:
                        self._record(db, model_id)
                        report.actions.append(f"model {name!r}: wrote its record again")
                elif recorded in records:
                    try:
                        if self._restore(db, records[recorded], model_id) != recorded:
                            self._drop_record(recorded)  # restored under this model's id
                    except (IntegrityError, StoreError) as e:
                        report.problems.append(f"model {name!r}: cannot restore its rows: {e}")
                    else:
                        report.actions.append(f"model {name!r}: restored its catalog rows "
                                              "from its record")
                elif actual in records:
                    db.execute("UPDATE models SET digest = ? WHERE id = ?", (actual, model_id))
                    report.actions.append(f"model {name!r}: its digest was changed: set it "
                                          "back from its record")
                else:
                    report.problems.append(
                        f"model {name!r}: its catalog rows differ from their recorded digest "
                        "and no record matches them: `hub rm` it or restore a backup")
            self._restore_unlisted(db, records, report)
        for digest in self._record_files():
            if self._read_record(digest) is None:
                report.problems.append(f"{ENTRIES}/{digest}.json is damaged (not a record whose "
                                       "sha256 is its name): not used; `hub gc` removes it")

    def _restore_unlisted(self, db: sqlite3.Connection, records: dict[str, dict[str, Any]],
                          report: RepairReport) -> None:
        """Add the models of records no catalog row lists (bases first, in the order they
        were added; of two records of one name, the newer), where the name is free and every
        blob is present."""
        listed = {r[0] for r in db.execute("SELECT digest FROM models")}
        newest: dict[str, tuple[str, dict[str, Any]]] = {}
        for digest, record in sorted(records.items(), key=lambda kv: (
                kv[1]["created"], kv[1]["id"], kv[0])):
            if digest not in listed:
                newest[record["name"]] = (digest, record)
        todo = []
        for digest, record in sorted(newest.values(), key=lambda dr: dr[1]["id"]):
            if record["name"] in self:
                report.problems.append(f"record {ENTRIES}/{digest}.json of {record['name']!r} "
                                       "not restored: the catalog has a model of that name "
                                       "(`hub gc` removes the record)")
            else:
                todo.append((digest, record))
        while todo:
            ready = [dr for dr in todo if dr[1]["base"] is None or dr[1]["base"] in self]
            if not ready:
                for _, record in todo:
                    report.problems.append(f"record of {record['name']!r} not restored: its "
                                           f"base {record['base']!r} is in no record")
                break
            for digest, record in ready:
                todo.remove((digest, record))
                taken = db.execute("SELECT 1 FROM models WHERE id = ?", (record["id"],)).fetchone()
                try:
                    new = self._restore(db, record, None if taken else record["id"])
                except (IntegrityError, StoreError) as e:
                    report.problems.append(f"record of {record['name']!r} not restored: {e}")
                    continue
                if new != digest:  # under another id: the new record replaces the old
                    self._drop_record(digest)
                report.actions.append(f"model {record['name']!r}: restored from its record")

    def _restore(self, db: sqlite3.Connection, record: dict[str, Any],
                 model_id: int | None = None) -> str:
        """Insert the rows of ``record`` under ``model_id`` (replacing the rows of that id if
        any; a new id if ``None``), and the catalog rows of its blobs, read from their files;
        returns the digest. Raises if a blob is missing or corrupt or the base is not in the
        catalog, leaving the transaction as it was."""
        db.execute("SAVEPOINT restore")
        try:
            for path in [f[0] for f in record["files"]] + [t[1] for t in record["tensors"]]:
                safe_relpath(path, f"record of {record['name']!r}")  # as any manifest's
            base_id = None
            if record["base"] is not None:
                row = self._model_row(record["base"])
                if row is None:
                    raise StoreError(f"its base {record['base']!r} is not in the catalog")
                base_id = row[0]
            self._catalog_blobs(db, [f[2] for f in record["files"]]
                                + [t[5] for t in record["tensors"]], record["name"])
            db.execute("DELETE FROM models WHERE id = ?", (model_id,))
            model_id = self._insert_entry(
                db, record["name"], record["kind"], record["base"], base_id, record["format"],
                json.dumps(record["metrics"]), json.dumps(record["provenance"]),
                record["created"], [tuple(f) for f in record["files"]],
                [(t[0], t[1], t[2], t[3], json.dumps(t[4]), t[5]) for t in record["tensors"]],
                model_id)
        except BaseException:
            db.execute("ROLLBACK TO restore")
            raise
        finally:
            db.execute("RELEASE restore")
        return db.execute("SELECT digest FROM models WHERE id = ?", (model_id,)).fetchone()[0]

    def _catalog_blobs(self, db: sqlite3.Connection, blob_ids: list[str], name: str) -> None:
        """Add the catalog rows of blobs (and of the blobs they reference) that have none,
        from their files' headers; each file is checked against its id."""
        todo = list(blob_ids)
        while todo:
            blob_id = todo.pop()
            if db.execute("SELECT 1 FROM blobs WHERE id = ?", (blob_id,)).fetchone():
                continue
            header = self._open_blob(blob_id, f"model {name!r}")[0]
            try:
                needs = list(blob_needs(header).values())
            except BlobFormatError as e:
                raise IntegrityError(f"model {name!r}: blob {blob_id[:16]} is malformed: "
                                     f"{e}") from e
            db.execute("INSERT INTO blobs(id, codec, ref, raw_sha256, raw_size, size) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (blob_id, header.codec, header.ref, header.sha256, header.nbytes,
                        self._blob_path(blob_id).stat().st_size))
            db.executemany("INSERT OR IGNORE INTO blob_needs(blob, needs) VALUES (?, ?)",
                           [(blob_id, n) for n in needs])
            todo += [b for b in (header.ref, *needs) if b]


