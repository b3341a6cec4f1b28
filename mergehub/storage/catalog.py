"""The store's SQLite catalog: its schema and layout constants, opening it (WAL mode, or
exclusive locking where WAL's index cannot be written), the store lock, and the queries the
other parts of :class:`~mergehub.storage.store.Store` share (see that module for the layout)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergehub import __version__
from mergehub.errors import CatalogDamagedError, StoreError, did_you_mean, spelled
from mergehub.storage.paths import MARKER, TRANSFERS
from mergehub.storage.safetensors_format import DTYPE_WIDTH, TensorSpec

LAYOUT_VERSION = 1
CATALOG = "catalog.sqlite"
#: the per-model records the catalog can be rebuilt from (see :mod:`mergehub.storage.records`)
ENTRIES = "entries"
#: what a store root holds (a folder of only these, with no blob, is a creation cut short)
_LAYOUT = {MARKER, CATALOG, f"{CATALOG}-wal", f"{CATALOG}-shm", "blobs", ENTRIES, "tmp",
           TRANSFERS, "lock"}
#: SQLite's primary result codes meaning "cannot write here": SQLITE_READONLY, SQLITE_IOERR,
#: SQLITE_FULL
_CANNOT_WRITE = {8, 10, 13}
#: SQLITE_CORRUPT and SQLITE_NOTADB: the catalog file is damaged
_DAMAGED = {11, 26}
KINDS = ("base", "finetune", "adapter", "merged")
#: a fine-tune's lossless delta references its base tensor's blob while that is fewer deltas
#: deep than this, else the self-contained blob it derives from (``Store._delta_ref``)
MAX_DELTA_DEPTH = 3
#: the longest reference chain a read follows (lossless deltas, one more from an import, a
#: lossy blob and what it needs); longer means a damaged store
_MAX_CHAIN = 2 * MAX_DELTA_DEPTH + 2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=/:-]{0,199}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS models(
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  kind TEXT NOT NULL CHECK (kind IN ('base', 'finetune', 'adapter', 'merged')),
  base_id INTEGER REFERENCES models(id),
  format TEXT NOT NULL CHECK (format IN ('hf', 'peft', 'safetensors')),
  metrics TEXT NOT NULL,
  provenance TEXT NOT NULL,
  created TEXT NOT NULL,
  digest TEXT);                   -- sha256 of its record (entries/<digest>.json)
CREATE TABLE IF NOT EXISTS blobs(
  id TEXT PRIMARY KEY,            -- sha256 of the blob file
  codec TEXT NOT NULL,
  ref TEXT REFERENCES blobs(id),  -- blob this one is a delta against
  raw_sha256 TEXT NOT NULL,       -- sha256 of the decoded bytes
  raw_size INTEGER NOT NULL,
  size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS blobs_by_raw ON blobs(raw_sha256);
CREATE TABLE IF NOT EXISTS blob_needs(  -- other blobs a blob's decoding reads (TALL's τMTL)
  blob TEXT NOT NULL REFERENCES blobs(id),
  needs TEXT NOT NULL REFERENCES blobs(id),
  PRIMARY KEY (blob, needs));
CREATE TABLE IF NOT EXISTS files(
  model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
  path TEXT NOT NULL,
  role TEXT NOT NULL CHECK (role IN ('weights', 'side')),
  blob TEXT NOT NULL REFERENCES blobs(id),  -- weights: the exact header; side: the content
  PRIMARY KEY (model_id, path));
CREATE TABLE IF NOT EXISTS tensors(
  model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  file TEXT NOT NULL,
  offset INTEGER NOT NULL,        -- in the file's data section
  dtype TEXT NOT NULL,
  shape TEXT NOT NULL,            -- JSON list
  blob TEXT NOT NULL REFERENCES blobs(id),
  PRIMARY KEY (model_id, name));
"""


def declared_size(spec: TensorSpec) -> int | None:
    """The bytes a tensor's dtype and shape make (what its blob must decode to), or ``None``
    for a dtype of unknown width."""
    return spec.nbytes if spec.dtype in DTYPE_WIDTH else None


def _spec(row: tuple) -> TensorSpec:
    """The spec of a ``tensors`` row (name, file, offset, dtype, shape JSON, blob)."""
    return TensorSpec(row[0], row[3], tuple(json.loads(row[4])))


def default_root() -> Path:
    """``$MERGEHUB_HOME`` if set, else ``~/.cache/mergehub``."""
    env = os.environ.get("MERGEHUB_HOME")
    return Path(env) if env else Path.home() / ".cache" / "mergehub"


@dataclass(frozen=True)
class ModelInfo:
    """Catalog entry of one model, with its sizes.

    ``logical_bytes`` is what an export writes; ``stored_bytes`` is what this model adds to the
    store on disk beyond its base (blobs it references that its base does not), broken down by
    codec in ``codecs`` (blobs, stored and decoded bytes per codec). Blobs shared by
    two models that are not base and fine-tune count for both, so for the store's real size use
    :meth:`Store.disk_bytes`.
    """

    name: str
    kind: str
    base: str | None
    format: str
    created: str
    metrics: dict[str, Any]
    provenance: dict[str, Any]
    tensors: int
    logical_bytes: int
    stored_bytes: int
    codecs: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def saving(self) -> float:
        """Fraction of the logical bytes not spent on disk (0.75 = stored in a quarter)."""
        return 1.0 - self.stored_bytes / self.logical_bytes if self.logical_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "saving": self.saving}


def now_utc() -> str:
    """The time now as the catalog's ``created`` column keeps it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextmanager
def _flock(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold a flock on the file ``path`` (created if missing), shared or exclusive."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the flock (the kernel also does on SIGKILL)


def _read_marker(root: Path) -> None:
    """Check the store marker: the JSON mergehub writes, of a layout this version reads."""
    path = root / MARKER
    try:
        marker = json.loads(path.read_bytes())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        marker = None
    if not isinstance(marker, dict) or "layout" not in marker:
        raise CatalogDamagedError(f"{path}: store marker damaged (not the JSON mergehub "
                                  "writes); `hub verify --repair` rewrites it")
    if marker["layout"] != LAYOUT_VERSION:
        raise StoreError(f"{root}: store layout {marker['layout']!r} is not supported by "
                         f"mergehub {__version__} (layout {LAYOUT_VERSION})")


#: SQLite's messages for the result codes :func:`_sqlite_code` needs (Python < 3.11 gives
#: only the message)
_SQLITE_MESSAGES = {"attempt to write a readonly database": 8, "disk I/O error": 10,
                    "database disk image is malformed": 11, "database or disk is full": 13,
                    "file is not a database": 26}


def _sqlite_code(e: sqlite3.Error) -> int:
    """The primary SQLite result code of ``e`` (0 if unknown)."""
    code = getattr(e, "sqlite_errorcode", None)
    return (code if code is not None else _SQLITE_MESSAGES.get(str(e), 0)) & 0xFF


def _repair_hint(root: Path) -> str:
    """What to do about a lost or damaged catalog, given the entry records ``root`` holds."""
    records = len(list((root / ENTRIES).glob("*.json"))) if (root / ENTRIES).is_dir() else 0
    if not records:
        return ("this store holds no entry records to rebuild it from (written by an older "
                "mergehub?): restore catalog.sqlite from a backup; `hub gc` is refused")
    return (f"`hub verify --repair` rebuilds it from the {records} entry records in "
            f"{root / ENTRIES}; until then every command but that one is refused")


def _catalog_error(root: Path, e: sqlite3.Error) -> StoreError:
    """The one-line error for an SQLite error while opening the catalog of ``root``."""
    code = _sqlite_code(e)
    if code in _DAMAGED:
        return CatalogDamagedError(f"{root / CATALOG}: store damaged: the catalog is unreadable "
                                   f"({e}); {_repair_hint(root)}")
    return StoreError(f"{root / CATALOG}: cannot open the catalog: {e}"
                      + (" (disk full?)" if code in _CANNOT_WRITE else ""))


def _catalog_uri(root: Path, create: bool = False) -> str:
    mode = "rwc" if create else "rw"  # opening never creates a missing catalog
    return f"{(root / CATALOG).absolute().as_uri()}?mode={mode}"


def _open_catalog(root: Path, create: bool = False) -> tuple[sqlite3.Connection, bool]:
    """Open the catalog of the store at ``root`` in WAL mode (``create``: create it with its
    tables); also returns whether it is open in exclusive locking mode.

    Where WAL mode's shared index file (``catalog.sqlite-shm``) cannot be written, as on a
    full disk, the catalog is opened in exclusive locking mode instead, in which SQLite keeps
    that index in memory: reading commands work, and this process holds the catalog alone
    until it closes it. A catalog that is missing, empty, not a database or without its tables
    raises :class:`CatalogDamagedError`: opening never replaces a lost catalog by an empty one
    (``verify --repair`` rebuilds it from the entry records).
    """
    path = root / CATALOG
    if not create:
        try:
            state = "empty" if path.stat().st_size == 0 else None
        except FileNotFoundError:
            state = "missing"
        if state is not None:
            raise CatalogDamagedError(f"{root}: store damaged: its catalog ({CATALOG}) is "
                                      f"{state}; {_repair_hint(root)}")

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(_catalog_uri(root, create), uri=True, timeout=120,
                               isolation_level=None, check_same_thread=False)

    db, exclusive = connect(), False
    try:
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as e:
            if create or _sqlite_code(e) not in _CANNOT_WRITE:
                raise
            db.close()
            db, exclusive = connect(), True
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # takes the lock now
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        if create:
            db.executescript(_SCHEMA)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        db.close()
        raise _catalog_error(root, e) from e
    missing = {"models", "blobs", "blob_needs", "files", "tensors"} - tables
    if missing:
        db.close()
        raise CatalogDamagedError(f"{path}: store damaged: the catalog lacks its tables "
                                  f"({', '.join(sorted(missing))}); {_repair_hint(root)}")
    return db, exclusive


class StoreCatalog:
    """The catalog part of :class:`~mergehub.storage.store.Store`: its connections, the store
lock, transactions, and the lookups of models and their rows. A mixin: the other parts
reach it through ``self``."""

    def _connect(self, create: bool = False) -> sqlite3.Connection:
        """Open (``create``: create) the catalog: see :func:`_open_catalog`."""
        db, self._exclusive = _open_catalog(self.root, create)
        return db

    def _migrate(self) -> None:
        """Give a catalog written by an older mergehub the digest column, and record every
        model in it (:meth:`_record`), once, when this version first opens it."""
        def has_digests() -> bool:
            return any(r[1] == "digest" for r in self._db.execute("PRAGMA table_info(models)"))

        if has_digests():
            return
        if self._exclusive:
            raise StoreError(f"{self.root}: the catalog, written by an older mergehub, needs a "
                             "one-time upgrade that cannot be written now (disk full?): free "
                             "some space and run the command again")
        with self._transaction() as db:
            if has_digests():  # another process upgraded it meanwhile
                return
            db.execute("ALTER TABLE models ADD COLUMN digest TEXT")
            for (model_id,) in db.execute("SELECT id FROM models ORDER BY id").fetchall():
                self._record(db, model_id)

    def catalog_version(self) -> tuple[int, int]:
        """A value that changes whenever the catalog does, by a commit of this store object or
        of any other connection (another Store, another process): for callers that remember
        what they read from the catalog (:class:`mergehub.compose.Composer`'s plans)."""
        (changed_elsewhere,), = self._db.execute("PRAGMA data_version").fetchall()
        return changed_elsewhere, self._db.total_changes

    def _lock(self, exclusive: bool) -> AbstractContextManager[None]:
        """The store lock: adds, imports, exports and verify share it; ``gc`` and ``repair``
        take it exclusively."""
        return _flock(self.root / "lock", exclusive)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # also after a failed COMMIT (a full disk)
                self._db.execute("ROLLBACK")
            raise

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only catalog connection (sqlite connections are per thread);
        the one connection where the catalog is open in exclusive locking mode."""
        if self._exclusive:
            return self._db
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(_catalog_uri(self.root), uri=True, timeout=120,
                                 check_same_thread=False)
            self._local.db = db
            self._readers.append(db)
        return db

    def _model_row(self, name: str) -> tuple[int, str, int | None, str] | None:
        return self._db.execute("SELECT id, kind, base_id, format FROM models WHERE name = ?",
                                (name,)).fetchone()

    def _require(self, name: str) -> tuple[int, str, int | None, str]:
        row = self._model_row(name)
        if row is None:
            raise StoreError(f"no model named {name!r} in store {self.root}"
                             + (self.did_you_mean(name) or spelled(
                                 " (Store.ls() lists them)", " (`hub ls` lists them)")))
        return row

    def did_you_mean(self, name: str) -> str:
        """`` (did you mean 'x'?)`` for the stored name closest to ``name``, or ``""``: for
        messages about a name the store lacks."""
        return did_you_mean(name, [r[0] for r in self._db.execute("SELECT name FROM models")])

    def _tensor_rows(self, model_id: int) -> list[tuple[str, str, int, str, str, str]]:
        return self._db.execute(
            "SELECT name, file, offset, dtype, shape, blob FROM tensors WHERE model_id = ? "
            "ORDER BY file, offset, name", (model_id,)).fetchall()

    def _entry_rows(self, model_id: int) -> tuple[list[list[Any]], list[list[Any]]]:
        """A model's files ``[path, role, blob]`` (by path) and tensors ``[name, file, offset,
        dtype, shape, blob]`` (in file order), as JSON lists: what its record and its
        :meth:`entry_manifest` list."""
        files = self._db.execute("SELECT path, role, blob FROM files WHERE model_id = ? "
                                 "ORDER BY path", (model_id,)).fetchall()
        return ([list(f) for f in files],
                [[r[0], r[1], r[2], r[3], json.loads(r[4]), r[5]]
                 for r in self._tensor_rows(model_id)])

    @staticmethod
    def _insert_blobs(db: sqlite3.Connection, new_blobs: dict[str, tuple],
                      needs: Iterable[tuple[str, str]] = ()) -> None:
        """Catalog newly written blobs (id -> codec, ref, sha256 and size of the decoded
        bytes, size) and which blobs their decoding needs, in the open transaction ``db``; a
        blob already catalogued keeps its row."""
        db.executemany("INSERT OR IGNORE INTO blobs(id, codec, ref, raw_sha256, raw_size, size)"
                       " VALUES (?, ?, ?, ?, ?, ?)", [(k, *v) for k, v in new_blobs.items()])
        db.executemany("INSERT OR IGNORE INTO blob_needs(blob, needs) VALUES (?, ?)", needs)

    def _check_free(self, names: list[str]) -> None:
        for name in names:
            if not _NAME.match(name):
                raise StoreError(f"invalid model name {name!r}")
            if self._model_row(name) is not None:
                raise StoreError(f"a model named {name!r} already exists in store {self.root}")

