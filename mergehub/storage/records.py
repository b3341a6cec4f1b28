"""Entry records: each model's catalog rows, also written as ``entries/<digest>.json``
before the transaction that adds the model commits, so that ``verify`` can check the rows
and ``verify --repair`` rebuild them (see :mod:`mergehub.storage.store`)."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mergehub.errors import IntegrityError, StoreError
from mergehub.storage.atomic import fsync_dir, write_file_atomic
from mergehub.storage.catalog import ENTRIES, KINDS, _NAME
from mergehub.storage.blob_format import sha256


def _well_formed_record(record: Any) -> bool:
    """Whether ``record`` has the fields and types of an entry record (``Store._record``)."""
    def rows(items: Any, types: tuple[type, ...]) -> bool:
        return isinstance(items, list) and all(
            isinstance(row, list) and len(row) == len(types)
            and all(isinstance(v, t) for v, t in zip(row, types)) for row in items)

    return (isinstance(record, dict) and record.get("mergehub_entry") == 1
            and isinstance(record.get("id"), int)
            and isinstance(record.get("name"), str) and bool(_NAME.match(record["name"]))
            and record.get("kind") in KINDS and isinstance(record.get("format"), str)
            and isinstance(record.get("base"), (str, type(None)))
            and isinstance(record.get("created"), str)
            and isinstance(record.get("metrics"), dict)
            and isinstance(record.get("provenance"), dict)
            and rows(record.get("files"), (str, str, str))
            and rows(record.get("tensors"), (str, str, int, str, list, str)))


class StoreRecords:
    """The entry-record part of :class:`~mergehub.storage.store.Store`: inserting a model's rows
    with its record, and reading, listing and dropping records."""

    def _insert_entry(self, db: sqlite3.Connection, name: str, kind: str, base: str | None,
                      base_id: int | None, fmt: str, metrics: str, provenance: str,
                      created: str, files: Iterable[tuple[str, str, str]],
                      tensors: Iterable[tuple[str, str, int, str, str, str]],
                      model_id: int | None = None) -> int:
        """Insert a model's catalog rows in the open transaction ``db`` and write its record
        (:meth:`_record`); returns its id. ``metrics`` and ``provenance`` are JSON text,
        ``tensors`` rows as :meth:`_tensor_rows` gives them.

        The name and the base are checked here, in the transaction that inserts: another
        process may have taken the name, or removed the base (whose id a new model could then
        get, making an entry its own base), since they were first looked up.
        """
        if self._model_row(name) is not None:
            raise StoreError(f"a model named {name!r} already exists in store {self.root}")
        if base_id is not None:
            row = db.execute("SELECT name FROM models WHERE id = ?", (base_id,)).fetchone()
            if row is None or row[0] != base:
                raise StoreError(f"base {base!r} of {name!r} was removed from store {self.root} "
                                 f"while {name!r} was being stored; nothing was added")
        model_id = db.execute(
            "INSERT INTO models(id, name, kind, base_id, format, metrics, provenance, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (model_id, name, kind, base_id, fmt, metrics, provenance, created)).lastrowid
        db.executemany("INSERT INTO files(model_id, path, role, blob) VALUES (?, ?, ?, ?)",
                       [(model_id, *f) for f in files])
        db.executemany("INSERT INTO tensors(model_id, name, file, offset, dtype, shape, blob) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", [(model_id, *t) for t in tensors])
        self._record(db, model_id)
        return model_id

    def _entry_record(self, model_id: int) -> bytes:
        """A model's record: its catalog rows (id, name, kind, base name, format, metrics,
        provenance, created, files, tensors) as canonical JSON, whose sha256 is its digest."""
        name, kind, base, fmt, metrics, provenance, created = self._db.execute(
            "SELECT m.name, m.kind, b.name, m.format, m.metrics, m.provenance, m.created "
            "FROM models m LEFT JOIN models b ON b.id = m.base_id WHERE m.id = ?",
            (model_id,)).fetchone()
        try:
            files, tensors = self._entry_rows(model_id)
            record = {"mergehub_entry": 1, "id": model_id, "name": name, "kind": kind, "base": base,
                      "format": fmt, "metrics": json.loads(metrics),
                      "provenance": json.loads(provenance), "created": created,
                      "files": files, "tensors": tensors}
        except (ValueError, TypeError) as e:
            raise IntegrityError(f"model {name!r}: catalog rows unreadable ({e})") from e
        return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()

    def _record(self, db: sqlite3.Connection, model_id: int) -> str:
        """Write the record of model ``model_id`` (durably) and set its digest, in the open
        transaction ``db``; the record is on disk before the transaction commits."""
        data = self._entry_record(model_id)
        digest = sha256(data)
        folder = self.root / ENTRIES
        if not folder.is_dir():  # a store made by an older mergehub
            folder.mkdir()
            fsync_dir(self.root)
        write_file_atomic(folder / f"{digest}.json", data)
        db.execute("UPDATE models SET digest = ? WHERE id = ?", (digest, model_id))
        return digest

    def _record_files(self) -> dict[str, Path]:
        """The record files in ``entries/`` by digest (others there: temp files)."""
        folder = self.root / ENTRIES
        return {p.stem: p for p in (sorted(folder.iterdir()) if folder.is_dir() else [])
                if p.suffix == ".json" and re.fullmatch(r"[0-9a-f]{64}", p.stem)}

    def _read_record(self, digest: str) -> dict[str, Any] | None:
        """The record ``entries/<digest>.json`` if present, intact (its sha256 is its name)
        and well-formed, else ``None``."""
        try:
            data = (self.root / ENTRIES / f"{digest}.json").read_bytes()
        except OSError:
            return None
        if sha256(data) != digest:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return None
        return record if _well_formed_record(record) else None

    def _drop_record(self, digest: str | None) -> None:
        """Delete a record file (durably), before the transaction that removes its model
        commits: a removed model must not come back from its record."""
        if digest is not None:
            path = self.root / ENTRIES / f"{digest}.json"
            if path.exists():
                path.unlink()
                fsync_dir(path.parent)

