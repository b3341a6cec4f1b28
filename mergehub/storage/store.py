"""The local store: content-addressed blobs plus a SQLite catalog, embedded, no server.

Layout of a store root::

    mergehub-store.json     marker with the layout version
    catalog.sqlite          models, their files and tensors, and the blob index (WAL mode)
    blobs/ab/cdef...        one file per blob, named by the sha256 of its bytes
    entries/<digest>.json   one record per model: its catalog rows, named by their sha256
    tmp/                    blobs being written (removed by ``gc``)
    transfers/NAME/         work folders of pushes, pulls and merges, each held under a flock
    lock                    flock: adds/exports share it, ``gc`` takes it exclusively

A model is a list of files as they were on disk: side files (config, tokenizer, index json) are
kept whole; each safetensors file is kept as its exact header plus one blob per tensor. So export
re-creates every file byte for byte. A tensor equal to one already stored (in the base, or in
any model) costs nothing; a tensor of a fine-tune that differs from the same-named tensor of its
base is stored losslessly as a delta against it (see :mod:`mergehub.storage.codec`); a fine-tune
of a fine-tune against its own base's tensor, up to ``MAX_DELTA_DEPTH`` deltas deep.

Tensors of any size are hashed, coded, written, read and decoded a chunk at a time (16 MiB, see
:mod:`mergehub.storage.codec`), so add, verify and export need a few chunks of memory, not the
largest tensor; a blob's decoding is bounded by the size the catalog declares for its tensor
(dtype x shape), whatever the blob itself says.

Crash safety: blobs are written to ``tmp/``, fsynced and renamed into place before the catalog
transaction that references them commits, so a process killed at any point leaves, at worst,
unreferenced blob files (removed by ``gc``), never a catalog row pointing at a missing or
partial blob. Every blob is checked against its id when read and every decoded tensor against
the sha256 of the original bytes.

Entry records: the catalog is the one file that holds which blobs make which model, so each
model's rows (name, kind, base, metrics, provenance, files and tensors with their blob ids) are
also written as a small JSON record, ``entries/<digest>.json``, atomically and before the
catalog transaction that adds the model commits (after its blobs, in the same crash-safe
order). The catalog keeps each model's digest: ``verify`` recomputes it from the rows (an
edited or damaged row shows) and checks the record file; ``verify --repair``
(:meth:`Store.repair`) restores edited rows, rewrites missing records and rebuilds a lost or
unreadable catalog from the records. ``rm`` deletes a model's record before its catalog rows,
so a removed model never comes back; ``gc`` removes records of no model (an add killed between
its record and its commit).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from mergehub import __version__
from mergehub.errors import (
    BaseMismatchError, CatalogDamagedError, InputError, IntegrityError, StoreError, did_you_mean, shown, spelled)
from mergehub.progress import bar_disabled
from mergehub.storage.atomic import (
    atomic_output_dir, fsync_dir, start_writeback, write_file_atomic)
from mergehub.storage.checkpoint import Checkpoint, open_checkpoint, peft_target_weight
from mergehub.storage import codec as _codec
from mergehub.storage.codec import (
    BlobFormatError, BlobHeader, Buffer, Payload, blob_needs, check_lossless_layout,
    decode_blob, decode_lossless_chunks, encode_lossless, encode_lossless_payload, encode_lossy,
    lossless_header, lossy_shape, pack_blob, read_header, sha256, unpack_blob)
from mergehub.storage.parallel import ordered_map
from mergehub.storage.paths import MARKER, TRANSFERS, inside, safe_relpath
from mergehub.storage import safetensors_format
from mergehub.storage.safetensors_format import DTYPE_WIDTH, FLOAT_DTYPES, TensorSpec, read_range
from mergehub.storage.writer import WEIGHTS_INDEX, WRITEBACK_BYTES, write_model_dir

if TYPE_CHECKING:
    import torch

LAYOUT_VERSION = 1
CATALOG = "catalog.sqlite"
#: the per-model records the catalog can be rebuilt from (see the module docstring)
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
#: a model folder of the Hugging Face cache: ``.../models--ORG--NAME/snapshots/REVISION``
_HF_CACHE_SNAPSHOT = re.compile(r"/models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")
#: decoded bytes a read may keep for reuse (:meth:`Store.reusing`); a blob of more than half
#: of it is decoded again each time
REUSE_BYTES = 256 << 20

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


#: SQL: the blobs model :m references (with the blobs they need) and those its base :b does
_MINE_AND_BASE = (
    "mine AS (SELECT blob FROM tensors WHERE model_id = :m "
    "         UNION SELECT blob FROM files WHERE model_id = :m "
    "         UNION SELECT n.needs FROM blob_needs n JOIN tensors t ON t.blob = n.blob "
    "         WHERE t.model_id = :m), "
    "base AS (SELECT blob FROM tensors WHERE model_id = :b "
    "         UNION SELECT blob FROM files WHERE model_id = :b)")


def declared_size(spec: TensorSpec) -> int | None:
    """The bytes a tensor's dtype and shape make (what its blob must decode to), or ``None``
    for a dtype of unknown width."""
    return spec.nbytes if spec.dtype in DTYPE_WIDTH else None


def _spec(row: tuple) -> TensorSpec:
    """The spec of a ``tensors`` row (name, file, offset, dtype, shape JSON, blob)."""
    return TensorSpec(row[0], row[3], tuple(json.loads(row[4])))


def _sha256_pieces(pieces: Iterable[Buffer]) -> str:
    """sha256 of the bytes of consecutive pieces."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


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


@dataclass
class VerifyReport:
    """Result of :meth:`Store.verify`: what was checked, every problem found and the models
    they affect."""

    blobs: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    affected: set[str] = field(default_factory=set)
    unreferenced_files: int = 0
    unreferenced_records: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class RepairReport:
    """Result of :meth:`Store.repair`: what was repaired, and what could not be."""

    actions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GcReport:
    """Result of :meth:`Store.gc`."""

    blobs_removed: int
    bytes_freed: int
    temp_files_removed: int
    transfers_removed: int = 0
    records_removed: int = 0


def names_entry(ref: str, store: Store | None) -> bool:
    """Whether a model reference means a store entry rather than a path: ``store`` has an entry
    of that name and the reference does not start like a path (``.``, ``/``, ``~``: store
    names cannot). So ``base`` or ``org/model`` is the store's entry even beside a folder of
    that name, and ``./base`` the folder."""
    return store is not None and not ref.startswith((".", "/", "~")) and ref in store


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


def base_reference(ref: str, store: Store | None) -> str | None:
    """What a PEFT adapter's ``base_model_name_or_path`` says for the base model reference
    ``ref`` (a store entry or a path, told apart by :func:`names_entry`): the entry's
    :meth:`Store.origin`, or the path made absolute (peft reads a relative one from the
    current directory)."""
    if names_entry(ref, store):
        return store.origin(ref)
    return os.path.abspath(os.path.expanduser(ref))


def _remove_unless_held(path: Path) -> bool:
    """Remove a transfer folder (or a stray file) unless a process holds its lock."""
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return True
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        shutil.rmtree(path)
        return True
    finally:
        os.close(fd)


class _Reuse:
    """Decoded, verified bytes of chosen blobs, kept for :meth:`Store.reusing` (least recently
    used dropped first beyond ``max_bytes``); safe to use from several threads."""

    def __init__(self, wanted: set[str], max_bytes: int):
        self.wanted, self.max_bytes = wanted, max_bytes
        self.held: OrderedDict[str, bytes] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, blob_id: str) -> bytes | None:
        with self.lock:
            data = self.held.get(blob_id)
            if data is not None:
                self.held.move_to_end(blob_id)
            return data

    def put(self, blob_id: str, data: Buffer) -> None:
        if blob_id not in self.wanted or len(data) > self.max_bytes // 2:
            return
        copy = bytes(data)  # readers get copies: a consumer may write into what it was given
        with self.lock:
            if blob_id in self.held:
                return
            self.held[blob_id] = copy
            self.size += len(copy)
            while self.size > self.max_bytes:
                self.size -= len(self.held.popitem(last=False)[1])


class StoredModel:
    """A model in the store, read like a checkpoint: specs, then one tensor at a time."""

    def __init__(self, store: "Store", info: ModelInfo, tensors: dict[str, tuple[TensorSpec, str]],
                 side_files: dict[str, str]):
        self.store = store
        self.info = info
        self._tensors = tensors
        self._side = side_files

    @property
    def name(self) -> str:
        return self.info.name

    def specs(self) -> list[TensorSpec]:
        """Specs of all tensors, in the order they were stored."""
        return [spec for spec, _ in self._tensors.values()]

    def blob(self, name: str) -> str:
        """The id of the blob holding tensor ``name``: equal ids, equal decoded tensors (the
        store is content-addressed), which is what caches of decoded tensors key on."""
        return self._lookup(name)[1]

    def read_bytes(self, name: str) -> bytearray:
        """The tensor's exact bytes, verified against their checksum."""
        spec, blob = self._lookup(name)
        return self.store._read_raw(blob, f"model {self.name!r}, tensor {name!r}",
                                    declared_size(spec))

    def iter_bytes(self, name: str) -> Iterator[Buffer]:
        """The tensor's exact bytes in consecutive pieces of at most a chunk
        (:data:`~mergehub.storage.codec.CHUNK_BYTES`), decoded as they are asked for, so a
        tensor of any size costs a few chunks of memory. The checksum of the bytes is checked
        when the last piece has been taken: a reader that acts on pieces must be ready to undo
        that when the iteration raises :class:`IntegrityError` (as an export's temp dir is)."""
        spec, blob = self._lookup(name)
        return self.store._iter_raw(blob, f"model {self.name!r}, tensor {name!r}",
                                    declared_size(spec))

    def load(self, name: str, device: "str | torch.device | None" = None) -> "torch.Tensor":
        """The tensor as a torch tensor, on the CPU or on ``device``.

        On a CUDA ``device`` a tensor stored with a lossy codec is decoded there (the base
        tensor is moved to the GPU and the delta applied by :mod:`mergehub.kernels` in one
        pass): the blob's own sha256 (which covers the payload and header) is checked as on
        every read, but not the sha256 of the decoded bytes, which would need them back on the
        CPU (and a low-rank decode on the GPU sums in another order: see
        :class:`~mergehub.storage.codecs.LossyCodec` ``exact_on_cuda``).
        """
        import torch

        TORCH_DTYPE = safetensors_format.TORCH_DTYPE
        spec, blob = self._lookup(name)
        if spec.dtype not in TORCH_DTYPE:
            raise InputError(f"model {self.name!r}: tensor {name!r} has dtype {spec.dtype}, "
                             "which torch cannot represent")
        what = f"model {self.name!r}, tensor {name!r}"
        if device is not None and torch.device(device).type == "cuda":
            decoded = self.store._decode_on(blob, what, torch.device(device))
            if decoded is not None:
                return decoded.to(TORCH_DTYPE[spec.dtype]).reshape(spec.shape)
        raw = self.store._read_raw(blob, what, declared_size(spec), copy=False)
        out = torch.frombuffer(raw, dtype=TORCH_DTYPE[spec.dtype]).reshape(spec.shape)
        return out if device is None else out.to(device)

    def side_file(self, path: str) -> bytearray:
        """Content of a kept side file (``config.json``, tokenizer files, ...)."""
        if path not in self._side:
            raise StoreError(f"model {self.name!r} has no file {path!r}")
        return self.store._read_raw(self._side[path], f"model {self.name!r}, file {path!r}")

    @property
    def side_files(self) -> list[str]:
        return list(self._side)

    def _lookup(self, name: str) -> tuple[TensorSpec, str]:
        try:
            return self._tensors[name]
        except KeyError:
            raise StoreError(f"model {self.name!r} has no tensor {name!r}") from None


class Store:
    """A mergehub store rooted at a directory (see the module docstring for the layout).

    ``Store(root)`` opens an existing store; ``create=True`` (or :meth:`init`) creates it.
    ``root`` defaults to ``$MERGEHUB_HOME``, else ``~/.cache/mergehub``. Safe to use from several
    processes at once: adds of different models proceed in parallel, ``gc`` waits for them.
    A store whose catalog or marker is missing, empty or unreadable raises
    :class:`~mergehub.errors.CatalogDamagedError` (never opens as an empty store);
    :meth:`repair` rebuilds it from the entry records.
    """

    def __init__(self, root: str | Path | None = None, *, create: bool = False):
        self.root = Path(root).expanduser() if root is not None else default_root()
        #: whether the catalog is open in exclusive locking mode (see :meth:`_connect`)
        self._exclusive = False
        if not (self.root / MARKER).is_file():
            if not create:
                raise StoreError(f"no mergehub store at {self.root} (" + spelled(
                    "Store.init(root) creates one; Store(root) opens another",
                    "run `hub init`, or pass --store / set MERGEHUB_HOME") + ")")
            self._create_layout()
        _read_marker(self.root)
        self._db = self._connect()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._reuse: _Reuse | None = None
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def init(cls, root: str | Path | None = None) -> "Store":
        """Create (or open, if it exists) the store at ``root``."""
        return cls(root, create=True)

    # --- setup ----------------------------------------------------------------------------

    def _create_layout(self) -> None:
        """Make the folders, the catalog and, last, the marker. Processes creating the same
        store at once take turns under the store lock: the first creates it, the others find
        its marker. A folder holding only what a creation cut short left is taken over."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root}: exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock(exclusive=True):
            if (self.root / MARKER).is_file():
                return
            if any(p.name not in _LAYOUT or (p.is_dir() and any(p.iterdir()))
                   for p in self.root.iterdir()):
                raise StoreError(f"{self.root}: directory is not empty and is not a mergehub "
                                 "store")
            for sub in ("blobs", "tmp", ENTRIES):
                (self.root / sub).mkdir(exist_ok=True)
            self._connect(create=True).close()
            write_file_atomic(self.root / MARKER, json.dumps({"layout": LAYOUT_VERSION}).encode())

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

    def close(self) -> None:
        """Close the catalog connections."""
        for db in [self._db, *self._readers]:
            db.close()

    def __reduce__(self) -> tuple[type["Store"], tuple[Path]]:
        """Pickled as its root (for a Ray task, on a node that sees the same path): the copy
        opens its own catalog connection."""
        return Store, (self.root,)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # --- blobs ----------------------------------------------------------------------------

    def _blob_path(self, blob_id: str) -> Path:
        return self.root / "blobs" / blob_id[:2] / blob_id[2:]

    def _write_blob(self, pieces: Iterable[Buffer], blob_id: str | None = None) -> tuple[str, Path]:
        """Store a blob given as consecutive pieces under the sha256 of its bytes: written to
        ``tmp/``, fsynced and renamed into place, so it is durable once the returned dir is
        fsynced. A ``blob_id`` known beforehand that is already stored is not written again."""
        if blob_id is not None and self._blob_path(blob_id).exists():
            return blob_id, self._blob_path(blob_id).parent
        tmp = self.root / "tmp" / f"blob.{uuid.uuid4().hex[:12]}"
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                flushed = 0  # bytes handed to start_writeback so far
                for piece in pieces:
                    f.write(piece)
                    digest.update(piece)
                    if f.tell() - flushed >= WRITEBACK_BYTES:
                        f.flush()
                        start_writeback(f.fileno(), flushed, f.tell() - flushed)
                        flushed = f.tell()
                f.flush()
                os.fsync(f.fileno())
            path = self._blob_path(digest.hexdigest())
            path.parent.mkdir(exist_ok=True)
            os.replace(tmp, path)  # the same bytes, if another writer stored them meanwhile
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest.hexdigest(), path.parent

    def _open_blob(self, blob_id: str, what: str,
                   check_id: bool = True) -> tuple[BlobHeader, Payload]:
        """Check a blob file against its id and parse its header. The payload stays in the
        file, read a piece at a time as decoding asks (a blob of at most a chunk is read whole:
        one read serves the check and the decoding). ``check_id=False`` skips the hash of the
        stored bytes: for a caller that checks the decoded bytes against the catalog instead
        (:meth:`_blob_stream`)."""
        try:
            f = open(self._blob_path(blob_id), "rb")
        except FileNotFoundError:
            raise IntegrityError(f"{what}: blob {blob_id[:16]} is missing from {self.root}/blobs "
                                 "(store damaged; `hub verify` lists what is affected)") from None
        size = os.fstat(f.fileno()).st_size
        if size <= _codec.CHUNK_BYTES:
            with f:
                data = f.read()
            blob, digest = Payload(data), sha256(data) if check_id else blob_id
        else:  # the file is closed when the payload is dropped
            blob = Payload(file=f, size=size)
            digest = _sha256_pieces(blob.read(start, min(_codec.CHUNK_BYTES, size - start))
                                    for start in range(0, size, _codec.CHUNK_BYTES)) \
                if check_id else blob_id
        if digest != blob_id:
            raise IntegrityError(f"{what}: blob {blob_id[:16]} is corrupt (its sha256 does not "
                                 "match; `hub verify` lists what is affected)")
        try:
            header, start = read_header(blob)
        except BlobFormatError as e:
            raise IntegrityError(f"{what}: blob {blob_id[:16]} is malformed: {e}") from e
        return header, blob.tail(start)

    def _load_blob(self, blob_id: str, what: str) -> tuple[BlobHeader, memoryview]:
        """A blob checked against its id, with its whole payload in memory (a lossy blob's)."""
        header, payload = self._open_blob(blob_id, what)
        try:
            return header, memoryview(payload.read(0, len(payload)))
        except BlobFormatError as e:
            raise IntegrityError(f"{what}: blob {blob_id[:16]} is malformed: {e}") from e

    def _stage_blob(self, data: bytes, new_blobs: dict[str, tuple], dirs: set[Path]) -> str:
        """Write a blob for an add/compress in progress: remember its catalog row and the dir
        to fsync before the transaction that references it commits."""
        return self._stage_stream(unpack_blob(data)[0], [data], new_blobs, dirs, sha256(data))

    def _stage_stream(self, header: BlobHeader, pieces: Iterable[Buffer],
                      new_blobs: dict[str, tuple], dirs: set[Path],
                      blob_id: str | None = None) -> str:
        """:meth:`_stage_blob` for a blob with ``header`` given as consecutive pieces (the
        header's bytes first), written as they come."""
        size = 0

        def counted() -> Iterator[Buffer]:
            nonlocal size
            for piece in pieces:
                size += len(piece)
                yield piece

        blob_id, parent = self._write_blob(counted(), blob_id)
        dirs.add(parent)
        if not size:  # already stored
            size = self._blob_path(blob_id).stat().st_size
        new_blobs[blob_id] = (header.codec, header.ref, header.sha256, header.nbytes, size)
        return blob_id

    def _blob_stream(self, blob_id: str, what: str, expect: int | None = None,
                     _depth: int = 0, *, check_id: bool = True
                     ) -> tuple[BlobHeader, Iterator[Buffer]]:
        """The header of a blob checked against its id, and its decoded bytes as an iterator of
        pieces of at most a chunk, decoded as they are taken.

        ``check_id=False`` (the reads of models, merges and exports): the stored bytes are not
        hashed; instead the header's hash of the decoded bytes must be the one the catalog
        recorded for the blob, and the decoded bytes are checked against it as always. A
        damaged blob file then fails to decode or decodes to other bytes, which that check
        catches; reading costs one hash instead of two (``hub verify`` still checks both). A
        blob the catalog does not know is checked against its id.

        ``expect``: the size the catalog declares for the tensor (dtype x shape); a header
        that says otherwise is refused before anything is decoded, and decoding never makes
        more than the header's size (see :mod:`mergehub.storage.codec`). The sha256 of the
        decoded bytes is checked when the last piece has been taken (the iterator raises
        :class:`IntegrityError` then): consumers write what they take somewhere they discard
        on error. ``add`` keeps chains of lossless deltas at most ``MAX_DELTA_DEPTH`` deep (an
        import may add one) and a lossy blob references its base tensor's blob, so a read
        decodes a handful of blobs however long a chain of fine-tunes of fine-tunes gets;
        longer chains mean a damaged store.
        """
        if _depth > _MAX_CHAIN:
            raise IntegrityError(f"{what}: blob {blob_id[:16]} is at the end of a reference "
                                 "chain longer than mergehub writes (store damaged?)")
        recorded = None if check_id else self._recorded_sha256(blob_id)
        header, payload = self._open_blob(blob_id, what, check_id=recorded is None)
        if recorded is not None and header.sha256 != recorded:
            raise IntegrityError(f"{what}: blob {blob_id[:16]} is corrupt (its header "
                                 "disagrees with the catalog; `hub verify` lists what is "
                                 "affected)")
        if expect is not None and header.nbytes != expect:
            raise IntegrityError(f"{what}: blob {blob_id[:16]} says it decodes to "
                                 f"{header.nbytes} bytes, but the tensor (dtype x shape) has "
                                 f"{expect}: refused without decoding it")
        return header, self._decoded(blob_id, header, payload, what, _depth)

    def _decoded(self, blob_id: str, header: BlobHeader, payload: Payload, what: str,
                 depth: int) -> Iterator[Buffer]:
        """The pieces of :meth:`_blob_stream`, the decoded bytes checked at the end."""
        digest, total = hashlib.sha256(), 0
        try:
            if header.codec == "lossless":
                ref = (self._iter_raw(header.ref, what, header.nbytes, depth + 1)
                       if header.ref else None)
                pieces: Iterable[Buffer] = decode_lossless_chunks(header, payload, ref)
            else:  # lossy codecs decode whole tensors (and read the base's whole)
                shape = lossy_shape(header)
                ref_raw = (self._read_raw(header.ref, what, header.nbytes, depth + 1)
                           if header.ref else None)
                extras = {key: self._read_raw(other, what, 4 * math.prod(shape), depth + 1)
                          for key, other in blob_needs(header).items()}
                pieces = [decode_blob(header, payload.read(0, len(payload)), ref_raw, extras)]
            for piece in pieces:
                digest.update(piece)
                total += len(piece)
                yield piece
        except (BlobFormatError, ValueError, KeyError) as e:  # codec errors are ValueErrors
            raise IntegrityError(f"{what}: blob {blob_id[:16]} is corrupt: it cannot be "
                                 f"decoded ({e}; `hub verify` lists what is affected)") from e
        if total != header.nbytes or digest.hexdigest() != header.sha256:
            raise IntegrityError(f"{what}: blob {blob_id[:16]} is corrupt: it decodes to bytes "
                                 "whose sha256 does not match the original (`hub verify` "
                                 "lists what is affected)")

    def _reused(self, blob_id: str, expect: int | None) -> bytes | None:
        """The decoded bytes of ``blob_id`` if :meth:`reusing` keeps them (and they have the
        size expected)."""
        reuse = self._reuse
        data = reuse.get(blob_id) if reuse is not None else None
        return data if data is not None and expect in (None, len(data)) else None

    def _iter_raw(self, blob_id: str, what: str, expect: int | None = None,
                  _depth: int = 0) -> Iterator[Buffer]:
        """The decoded bytes of a blob in pieces (:meth:`_blob_stream`), opened when the first
        piece is asked for."""
        kept = self._reused(blob_id, expect)
        if kept is not None:
            view = memoryview(kept)
            yield from (view[i:i + _codec.CHUNK_BYTES]
                        for i in range(0, len(kept), _codec.CHUNK_BYTES))
            return
        yield from self._blob_stream(blob_id, what, expect, _depth, check_id=False)[1]

    def _read_raw(self, blob_id: str, what: str, expect: int | None = None,
                  _depth: int = 0, *, copy: bool = True) -> bytearray | memoryview:
        """A blob decoded to the original bytes, whole, checked like :meth:`_blob_stream`: a
        bytearray, or with ``copy=False`` a writable buffer of any kind (a blob of at most a
        chunk then comes back as the piece it decodes to, without being copied again)."""
        kept = self._reused(blob_id, expect)
        if kept is not None:
            return bytearray(kept)
        header, pieces = self._blob_stream(blob_id, what, expect, _depth, check_id=False)
        if not copy and header.nbytes <= _codec.CHUNK_BYTES:
            parts = list(pieces)  # all of it: the checks at the end have run
            if len(parts) == 1 and not memoryview(parts[0]).readonly:
                whole = memoryview(parts[0]).cast("B")
                if self._reuse is not None:
                    self._reuse.put(blob_id, whole)
                return whole
            pieces = iter(parts)
        out = bytearray(header.nbytes)
        view, pos = memoryview(out), 0
        for piece in pieces:
            view[pos:pos + len(piece)] = piece
            pos += len(piece)
        if self._reuse is not None:
            self._reuse.put(blob_id, out)
        return out

    @contextmanager
    def reusing(self, blobs: Iterable[str], max_bytes: int = REUSE_BYTES) -> Iterator[None]:
        """Within the block, keep the decoded bytes of ``blobs`` once a read has decoded and
        verified them whole (up to ``max_bytes``, the least recently used dropped first), so
        that reading them again copies them instead of decoding again.

        What a merge wants for :meth:`shared_blobs`: it reads the base's tensor, then each
        fine-tune's, whose lossless delta is decoded against that same base tensor; without
        this the base tensor is decoded once for the base and once more per fine-tune.
        """
        previous, self._reuse = self._reuse, _Reuse(set(blobs), max_bytes)
        try:
            yield
        finally:
            self._reuse = previous

    def shared_blobs(self, names: Iterable[str]) -> set[str]:
        """The blobs that reading every tensor of the models ``names`` (a name listed twice is
        read twice) decodes more than once: a tensor several of them share, or a reference
        that their deltas are decoded against (each read of a delta decodes its reference)."""
        refs: dict[str, str | None] = {}
        counts: Counter[str] = Counter()
        for name in names:
            model_id = self._require(name)[0]
            for (blob,) in self._db.execute("SELECT blob FROM tensors WHERE model_id = ?",
                                            (model_id,)):
                for _ in range(_MAX_CHAIN):
                    counts[blob] += 1
                    if blob not in refs:
                        row = self._db.execute("SELECT ref FROM blobs WHERE id = ?",
                                               (blob,)).fetchone()
                        refs[blob] = row[0] if row else None
                    if refs[blob] is None:
                        break
                    blob = refs[blob]
        return {blob for blob, n in counts.items() if n > 1}

    def _decode_on(self, blob_id: str, what: str, device: "torch.device") -> "torch.Tensor | None":
        """A lossy blob decoded on ``device`` (float32), or ``None`` for a lossless blob (those
        decode on the CPU: zstd). See :meth:`StoredModel.load` for what is checked."""
        import torch

        from mergehub.storage.codecs import LOSSY

        header, payload = self._load_blob(blob_id, what)
        lossy = LOSSY.get(header.codec)
        if lossy is None or not header.ref:
            return None

        def on_device(blob: str, dtype: str, nbytes: int) -> torch.Tensor:
            raw = self._read_raw(blob, what, nbytes, 1)
            return torch.frombuffer(raw, dtype=safetensors_format.TORCH_DTYPE[dtype]).to(device)

        try:
            shape = lossy_shape(header)
            base = on_device(header.ref, header.dtype, header.nbytes).reshape(shape)
            extras = {key: on_device(other, "F32", 4 * math.prod(shape))
                      for key, other in blob_needs(header).items()}
            return lossy.decode(payload, header.params, base, extras)
        except (BlobFormatError, ValueError, KeyError) as e:
            raise IntegrityError(f"{what}: blob {blob_id[:16]} cannot be decoded: {e}") from e

    def _delta_ref(self, blob_id: str) -> str:
        """The blob a fine-tune's tensor is delta-coded against, given its base tensor's blob:
        that blob itself while it is lossless and fewer than ``MAX_DELTA_DEPTH`` deltas deep
        (a small change of a fine-tune costs only its own delta), else the self-contained blob
        at the end of its reference chain (reads stay a few decodes deep)."""
        chain, lossless = [blob_id], True
        for _ in range(_MAX_CHAIN):
            row = self._db.execute("SELECT ref, codec FROM blobs WHERE id = ?",
                                   (chain[-1],)).fetchone()
            lossless = lossless and (row is None or row[1] == "lossless")
            if row is None or row[0] is None:
                return blob_id if lossless and len(chain) <= MAX_DELTA_DEPTH else chain[-1]
            chain.append(row[0])
        raise IntegrityError(f"blob {blob_id[:16]}: reference chain too long (store damaged?)")

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

    def _recorded_sha256(self, blob_id: str) -> str | None:
        """The hash of the decoded bytes the catalog recorded for ``blob_id`` (``None``: not in
        the catalog)."""
        row = self._reader().execute("SELECT raw_sha256 FROM blobs WHERE id = ?",
                                     (blob_id,)).fetchone()
        return row[0] if row else None

    def _find_blob(self, raw_sha256: str) -> str | None:
        """A stored blob that decodes to bytes with this hash, if its file is present."""
        for (blob_id,) in self._reader().execute("SELECT id FROM blobs WHERE raw_sha256 = ?",
                                           (raw_sha256,)):
            if self._blob_path(blob_id).is_file():
                return blob_id
        return None

    # --- catalog helpers ------------------------------------------------------------------

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

    # --- entry records (see the module docstring) ------------------------------------------

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

    # --- verbs ----------------------------------------------------------------------------

    def add(self, path: str | Path, name: str, *, base: str | None = None,
            kind: str | None = None, metrics: dict[str, Any] | None = None,
            provenance: dict[str, Any] | None = None, progress: bool | None = None,
            new_tensors: Collection[str] = ()) -> ModelInfo:
        """Add the checkpoint at ``path`` under ``name``.

        A directory is kept whole: the weights as tensors, every other file at any depth
        (config, tokenizer, a sentence-transformers model's ``modules.json`` and
        ``1_Pooling/``, ...) as it is, so that an export gives the folder back bit for bit.
        Pickle files and tools' folders (``.git``, ``.cache``) are not kept: they are listed,
        with the reason, in the entry's ``provenance["not_kept"]`` (``hub add`` prints them).

        Args:
            path: an HF model dir, a PEFT adapter dir or a ``.safetensors`` file.
            name: the new model's name (unique in the store).
            base: name of a stored model this one was fine-tuned from. A fine-tune must have the
                same tensor names and shapes as its base; tensors equal to the base's cost
                nothing and the others are stored as lossless deltas against it. An adapter's
                target modules must exist in the base.
            kind: ``base``, ``finetune``, ``adapter`` or ``merged``; default: ``adapter`` for a
                PEFT dir, else ``finetune`` with a base and ``base`` without.
            metrics: JSON-able metrics (loss, accuracy, step, ...) kept with the model.
            provenance: JSON-able facts about where it came from (recipe, run, ...); the source
                path and mergehub version are always recorded.
            progress: a progress bar on stderr: None (default) on a terminal only
                (:mod:`mergehub.progress`), True always, False never.
            new_tensors: tensors of a fine-tune that its base lacks and that it may add all
                the same, stored whole: a task head (a classifier trained on an encoder,
                ``hub train``). Any other tensor the base lacks is refused.
        """
        if not _NAME.match(name):
            raise StoreError(f"invalid model name {name!r}: use letters, digits and ._@+=/:- "
                             "(at most 200 characters, starting with a letter or digit)")
        if kind is not None and kind not in KINDS:
            raise StoreError(f"invalid kind {kind!r}: one of {', '.join(KINDS)}")
        ckpt = open_checkpoint(path)
        kind = kind or ("adapter" if ckpt.format == "peft" else "finetune" if base else "base")
        for label, obj in (("metrics", metrics), ("provenance", provenance)):
            if obj is not None and not isinstance(obj, dict):
                raise StoreError(f"{label} must be a JSON object, got {type(obj).__name__}")
        with self._lock(exclusive=False):
            if self._model_row(name) is not None:
                raise StoreError(f"a model named {name!r} already exists in store {self.root} "
                                 "(choose another name, or remove it first: "
                                 f"{spelled(f'rm({name!r})', f'`hub rm {name}`')})")
            base_id, base_tensors = None, {}
            if base is not None:
                base_id = self._require(base)[0]
                base_tensors = {  # the blob each base tensor's delta is coded against
                    r[0]: (_spec(r), self._delta_ref(r[5]))
                    for r in self._tensor_rows(base_id)}
                _check_fits_base(ckpt, kind, base, base_tensors, set(new_tensors))
            return self._add_locked(ckpt, name, kind, base, base_id, base_tensors, metrics or {},
                                    provenance or {}, progress)

    def _add_locked(self, ckpt: Checkpoint, name: str, kind: str, base: str | None,
                    base_id: int | None, base_tensors: dict[str, tuple[TensorSpec, str]],
                    metrics: dict[str, Any], provenance: dict[str, Any],
                    progress: bool | None) -> ModelInfo:
        new_blobs: dict[str, tuple[str, str | None, str, int, int]] = {}
        dirs: set[Path] = set()

        def put(nbytes: int, read: Callable[[int, int], Buffer], dtype: str, what: str,
                ref_blob: str | None = None) -> str:
            """Store the ``nbytes`` bytes that ``read(start, stop)`` gives unless already
            stored (a delta against ``ref_blob`` when given); runs on worker threads.

            Up to a chunk is read once and coded in memory. A larger source is read a chunk
            at a time, twice: hashed first (to find it if stored), then coded and written as
            a blob while hashed again, so that a file changed in between is caught before the
            blob is renamed into place.
            """
            if nbytes <= _codec.CHUNK_BYTES:
                raw = read(0, nbytes)
                digest = sha256(raw)
                blob_id = self._find_blob(digest)
                if blob_id is None:
                    ref = (ref_blob, self._read_raw(ref_blob, f"base of {name!r}", nbytes)
                           ) if ref_blob else None
                    data = encode_lossless(raw, dtype, digest, ref)
                    blob_id = self._stage_blob(data, new_blobs, dirs)
                return blob_id

            def pieces() -> Iterator[Buffer]:
                for start in range(0, nbytes, _codec.CHUNK_BYTES):
                    yield read(start, min(start + _codec.CHUNK_BYTES, nbytes))

            digest = _sha256_pieces(pieces())
            blob_id = self._find_blob(digest)
            if blob_id is None:
                def same_pieces() -> Iterator[Buffer]:
                    again = hashlib.sha256()
                    for piece in pieces():
                        again.update(piece)
                        yield piece
                    if again.hexdigest() != digest:
                        raise InputError(f"{what}: changed while it was being added")

                header = lossless_header(dtype, nbytes, digest, ref_blob)
                ref = self._iter_raw(ref_blob, f"base of {name!r}", nbytes) if ref_blob else None
                payload = encode_lossless_payload(header, same_pieces(), ref)
                blob_id = self._stage_stream(header, itertools.chain([header.pack()], payload),
                                             new_blobs, dirs)
            return blob_id

        def put_tensor(item: tuple[str, Any]) -> str:
            tname, info = item
            base_entry = base_tensors.get(tname)
            ref = (base_entry[1] if base_entry and base_entry[0].dtype == info.spec.dtype
                   and base_entry[0].shape == info.spec.shape else None)
            return put(info.nbytes, lambda start, stop: ckpt.read_bytes(tname, start, stop),
                       info.spec.dtype, f"{ckpt.path}: tensor {tname!r}", ref)

        tensor_rows = []
        items = list(ckpt.tensors.items())
        with tqdm(total=sum(t.nbytes for _, t in items), unit="B", unit_scale=True,
                  desc=f"add {name}", disable=bar_disabled(progress), leave=False) as bar:
            for (tname, info), blob_id in zip(items, ordered_map(put_tensor, items)):
                offset = info.offset - ckpt.headers[info.file].data_start
                tensor_rows.append((tname, info.file, offset, info.spec.dtype,
                                    json.dumps(list(info.spec.shape)), blob_id))
                bar.update(info.nbytes)
        file_rows = [(rel, "weights", put(len(h.raw), lambda start, stop, h=h: h.raw[start:stop],
                                          "U8", str(ckpt.root / rel)))
                     for rel, h in ckpt.headers.items()]
        for rel in ckpt.side_files:
            path = ckpt.root / rel

            def read_side(start: int, stop: int, path: Path = path) -> bytearray:
                try:
                    with open(path, "rb") as f:
                        return read_range(f, start, stop - start)
                except OSError as e:
                    raise InputError(f"{path}: cannot read: {e.strerror or e}") from e

            try:
                size = path.stat().st_size
            except OSError as e:
                raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
            file_rows.append((rel, "side", put(size, read_side, "U8", str(path))))
        for d in dirs:
            fsync_dir(d)
        prov = {"source": str(Path(ckpt.path).absolute()), "source_format": ckpt.format,
                "mergehub_version": __version__, **provenance}
        if ckpt.adapter_config and ckpt.adapter_config.get("base_model_name_or_path"):
            prov.setdefault("base_model_name_or_path", ckpt.adapter_config["base_model_name_or_path"])
        if ckpt.not_kept:
            given = prov.get("not_kept")
            prov["not_kept"] = {**(given if isinstance(given, dict) else {}), **ckpt.not_kept}
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO blobs(id, codec, ref, raw_sha256, raw_size, size)"
                           " VALUES (?, ?, ?, ?, ?, ?)", [(k, *v) for k, v in new_blobs.items()])
            self._insert_entry(db, name, kind, base, base_id, ckpt.format, json.dumps(metrics),
                               json.dumps(prov), created, file_rows, tensor_rows)
        return self.show(name)

    def compress(self, name: str, codec: str, params: dict[str, Any] | None = None, *,
                 as_name: str | None = None, progress: bool | None = None) -> ModelInfo:
        """Store a lossy-compressed copy of fine-tune ``name`` as a new entry (``as_name``,
        default ``NAME-CODEC``) with the same base, files and provenance plus the codec.

        Each float tensor that differs from the base's (and that the codec applies to:
        ``lowrank`` only factors matrices, ``bit1`` by default only the attention and MLP
        projections) is encoded with ``codec`` (see
        :data:`mergehub.storage.codecs.LOSSY`) as a delta against the base tensor; the others
        keep their lossless blobs. Export and merge read the entry like any other (decoding on the fly).
        """
        from mergehub.storage.codecs import LOSSY, resolve_params

        model_id, kind, base_id, fmt = self._require(name)
        if base_id is None:
            raise StoreError(f"model {name!r} has no base: a lossy codec stores the difference "
                             f"to a base (add it with {spelled('base=', '--base')})")
        try:
            full = resolve_params(codec, params or {})
        except ValueError as e:
            raise StoreError(str(e)) from None
        if codec == "tall":
            raise StoreError("tall compresses several fine-tunes together: use " + spelled(
                "compress_tall([A, B, ...])", "hub compress A B ... --codec tall"))
        as_name = as_name or f"{name}-{codec}"
        info = self.show(name)
        base_blobs = {r[0]: r[5] for r in self._tensor_rows(base_id)}
        rows = self._tensor_rows(model_id)
        new_blobs: dict[str, tuple[str, str | None, str, int, int]] = {}
        dirs: set[Path] = set()

        def encode(row: tuple) -> str:
            tname, _, _, dtype, shape, blob = row
            ref = base_blobs.get(tname)
            if (ref is None or ref == blob or dtype not in FLOAT_DTYPES
                    or not LOSSY[codec].applies(tname, tuple(json.loads(shape)), full)):
                return blob
            what = f"model {name!r}, tensor {tname!r}"
            size = declared_size(_spec(row))
            data = encode_lossy(self._read_raw(blob, what, size), dtype, tuple(json.loads(shape)),
                                codec, full, (ref, self._read_raw(ref, what, size)))
            return self._stage_blob(data, new_blobs, dirs)

        with self._lock(exclusive=False):
            self._check_free([as_name])
            bar = tqdm(rows, desc=f"compress {name}", unit="tensor", disable=bar_disabled(progress),
                       leave=False)
            blobs = {row[0]: blob for row, blob in zip(rows, ordered_map(encode, bar))}
            if not new_blobs:
                raise StoreError(f"model {name!r}: no tensor to compress with {codec} (none "
                                 "that it applies to differs from a same-named base tensor: an "
                                 "adapter's LoRA factors are kept as they are; compress a "
                                 "merged model)")
            provenance = {**info.provenance, "compressed_from": name, "codec": codec,
                          "codec_params": full}
            self._commit_derived(dirs, new_blobs, [],
                                 [(model_id, name, as_name, blobs, provenance)])
        return self.show(as_name)

    def compress_search(self, name: str, codec: str, grid: dict[str, list[Any]],
                        evaluate: Callable[[Path], float], params: dict[str, Any] | None = None,
                        *, as_name: str | None = None,
                        progress: bool | None = None) -> tuple[ModelInfo, list[tuple[dict, float]]]:
        """:meth:`compress` with the best codec parameters of a small grid.

        Every combination of ``grid`` (e.g. ``{"alpha": [0.5, 1, 2, 4]}`` for compeft) is
        compressed, exported to a temp dir and scored by ``evaluate(dir)`` (higher is better,
        e.g. validation accuracy); the best is kept as ``as_name`` and the others are removed.
        Returns its info and every (parameters, score) tried.
        """
        import itertools

        keys = sorted(grid)
        if not keys or any(not grid[k] for k in keys):
            raise StoreError("compress_search needs a non-empty grid of parameter values")
        final = as_name or f"{name}-{codec}"
        self._check_free([final])
        tried: list[tuple[dict, float]] = []
        best: tuple[float, str] | None = None
        for i, values in enumerate(itertools.product(*(grid[k] for k in keys))):
            trial = {**(params or {}), **dict(zip(keys, values))}
            candidate = f"{final}.search{i}"
            self.compress(name, codec, trial, as_name=candidate, progress=progress)
            with self.work_folder("search") as tmp:
                score = float(evaluate(self.export(candidate, tmp / "model", progress=False)))
            tried.append((trial, score))
            if best is None or score > best[0]:
                if best is not None:
                    self.rm(best[1])
                best = (score, candidate)
            else:
                self.rm(candidate)
        with self._transaction() as db:
            self._check_free([final])
            model_id, old = db.execute("SELECT id, digest FROM models WHERE name = ?",
                                       (best[1],)).fetchone()
            db.execute("UPDATE models SET name = ? WHERE id = ?", (final, model_id))
            self._record(db, model_id)
            self._drop_record(old)
        return self.show(final), tried

    def compress_tall(self, names: list[str], params: dict[str, Any] | None = None, *,
                      suffix: str = "-tall", progress: bool | None = None) -> list[ModelInfo]:
        """Store T fine-tunes of one base with TALL masks: per tensor the multi-task vector
        τMTL = Σt τt once, plus one bitmask per task (see :mod:`mergehub.storage.codecs.tall`).

        Creates ``NAME + suffix`` for each of ``names``. ``params``: ``lambda`` (one number, or
        one per task, in the order of ``names``; default 0.4) and ``alpha`` (default 1).
        """
        from mergehub.storage.codec import encode_tall_task
        from mergehub.storage.codecs import resolve_params

        if len(names) < 2 or len(set(names)) != len(names):
            raise StoreError("tall compresses two or more different fine-tunes of one base")
        rows = [self._require(n) for n in names]
        bases = {r[2] for r in rows}
        if len(bases) != 1 or None in bases:
            raise StoreError("tall needs fine-tunes of one and the same base: "
                             + ", ".join(f"{n!r} (base {self.show(n).base!r})" for n in names))
        given = dict(params or {})
        lambdas = given.pop("lambda", 0.4)
        lambdas = list(lambdas) if isinstance(lambdas, (list, tuple)) else [lambdas] * len(names)
        if len(lambdas) != len(names):
            raise StoreError(f"tall: {len(lambdas)} lambdas for {len(names)} fine-tunes")
        try:
            full = resolve_params("tall", {**given, "lambda": lambdas[0]})
        except ValueError as e:
            raise StoreError(str(e)) from None
        base_id = bases.pop()
        base_blobs = {r[0]: r[5] for r in self._tensor_rows(base_id)}
        per_model = [{r[0]: r for r in self._tensor_rows(row[0])} for row in rows]
        order = [r[0] for r in self._tensor_rows(rows[0][0])]
        new_blobs: dict[str, tuple[str, str | None, str, int, int]] = {}
        needs: list[tuple[str, str]] = []
        dirs: set[Path] = set()

        def put(data: bytes) -> str:
            return self._stage_blob(data, new_blobs, dirs)

        def encode(tname: str) -> list[str]:
            import torch

            current = [m[tname][5] for m in per_model]
            ref = base_blobs.get(tname)
            dtype, shape = per_model[0][tname][3], tuple(json.loads(per_model[0][tname][4]))
            if ref is None or all(b == ref for b in current) or dtype not in FLOAT_DTYPES:
                return current
            torch_dtype = safetensors_format.TORCH_DTYPE[dtype]
            what = f"tensor {tname!r}"
            size = declared_size(_spec(per_model[0][tname]))
            base_raw = self._read_raw(ref, what, size)
            theta0 = torch.frombuffer(bytearray(base_raw), dtype=torch_dtype).float().reshape(shape)
            taus = [torch.frombuffer(self._read_raw(b, f"model {n!r}, {what}", size),
                                     dtype=torch_dtype)
                    .float().reshape(shape) - theta0 for b, n in zip(current, names)]
            mtl = sum(taus)
            mtl_raw = mtl.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            mtl_blob = put(encode_lossless(mtl_raw, "F32", sha256(mtl_raw)))
            out = []
            for b, tau, lam in zip(current, taus, lambdas):
                if b == ref:
                    out.append(b)
                    continue
                blob = put(encode_tall_task(tau, mtl, dtype, {**full, "lambda": float(lam)},
                                            (ref, base_raw), mtl_blob))
                needs.append((blob, mtl_blob))
                out.append(blob)
            return out

        as_names = [n + suffix for n in names]
        with self._lock(exclusive=False):
            self._check_free(as_names)
            bar = tqdm(order, desc="compress tall", unit="tensor", disable=bar_disabled(progress),
                       leave=False)
            columns = [dict(zip(order, blobs)) for blobs in zip(*ordered_map(encode, bar))]
            derived = []
            for (model_id, *_), name, as_name, lam, blobs in zip(rows, names, as_names, lambdas,
                                                                 columns):
                info = self.show(name)
                derived.append((model_id, name, as_name, blobs, {
                    **info.provenance, "compressed_from": name, "codec": "tall",
                    "codec_params": {**full, "lambda": float(lam)}, "tall_tasks": names}))
            self._commit_derived(dirs, new_blobs, needs, derived)
        return [self.show(n) for n in as_names]

    def _check_free(self, names: list[str]) -> None:
        for name in names:
            if not _NAME.match(name):
                raise StoreError(f"invalid model name {name!r}")
            if self._model_row(name) is not None:
                raise StoreError(f"a model named {name!r} already exists in store {self.root}")

    def _commit_derived(self, dirs: set[Path], new_blobs: dict[str, tuple],
                        needs: list[tuple[str, str]],
                        derived: list[tuple[int, str, str, dict[str, str], dict[str, Any]]],
                        ) -> None:
        """Catalog new entries derived from stored models (same kind, base, format, files and
        metrics; new tensor blobs by tensor name, and provenance) in one transaction, after
        the blobs are durable. ``derived``: (source model id, its name, new name, blob by tensor
        name, provenance) each."""
        for d in dirs:
            fsync_dir(d)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO blobs(id, codec, ref, raw_sha256, raw_size, "
                           "size) VALUES (?, ?, ?, ?, ?, ?)",
                           [(k, *v) for k, v in new_blobs.items()])
            db.executemany("INSERT OR IGNORE INTO blob_needs(blob, needs) VALUES (?, ?)", needs)
            for source_id, source, as_name, blobs, provenance in derived:
                row = db.execute(
                    "SELECT m.name, m.kind, b.name, m.base_id, m.format, m.metrics FROM models m "
                    "LEFT JOIN models b ON b.id = m.base_id WHERE m.id = ?",
                    (source_id,)).fetchone()
                if row is None or row[0] != source:
                    raise StoreError(f"model {source!r} was removed while {as_name!r} was being "
                                     "made from it; nothing was added")
                _, kind, base, base_id, fmt, metrics = row
                files = db.execute("SELECT path, role, blob FROM files WHERE model_id = ?",
                                   (source_id,)).fetchall()
                tensors = [(*r[:5], blobs[r[0]]) for r in self._tensor_rows(source_id)]
                self._insert_entry(db, as_name, kind, base, base_id, fmt, metrics,
                                   json.dumps(provenance), created, files, tensors)

    # --- shipping an entry's own blobs to another store (hub push / pull) -------------------

    def fingerprint(self, name: str) -> str:
        """sha256 over the sorted (name, dtype, shape, sha256 of the bytes) of every tensor of
        ``name``: what identifies a base across stores, whatever the encoding of its blobs."""
        lines = sorted(f"{t}\t{dtype}\t{shape}\t{raw}\n"
                       for t, (dtype, shape, raw) in self.tensor_digests(name).items())
        return sha256("".join(lines).encode())

    def tensor_digests(self, name: str) -> dict[str, tuple[str, str, str]]:
        """Each tensor of ``name``: (dtype, shape as JSON, sha256 of its bytes), as recorded
        when it was added."""
        model_id = self._require(name)[0]
        rows = self._db.execute("SELECT t.name, t.dtype, t.shape, b.raw_sha256 FROM tensors t "
                                "JOIN blobs b ON b.id = t.blob WHERE t.model_id = ?", (model_id,))
        return {t: (dtype, shape, raw) for t, dtype, shape, raw in rows}

    def find_fingerprint(self, fingerprint: str) -> list[str]:
        """Names of the stored models whose :meth:`fingerprint` is ``fingerprint``."""
        names = [r[0] for r in self._db.execute("SELECT name FROM models ORDER BY id")]
        return [name for name in names if self.fingerprint(name) == fingerprint]

    def blob_path(self, blob_id: str) -> Path:
        """The file of a stored blob (named by the sha256 of its bytes)."""
        return self._blob_path(blob_id)

    def entry_manifest(self, name: str) -> dict[str, Any]:
        """Everything but the bytes of entry ``name``, for rebuilding it in another store that
        holds the same base: kind, format, metrics, provenance, files and tensors (by blob),
        the base's name and :meth:`fingerprint`, and two blob tables. ``blobs`` are the blobs
        to ship (each blob file, under its id, decodes with what ships and the base); ``external``
        maps the base tensor blobs the entry references (as a tensor, a delta reference or a
        need) to the sha256 of their bytes, which the receiving store finds in its own copy
        of the base. See :meth:`import_entry`.
        """
        model_id, kind, base_id, fmt = self._require(name)
        info = self.show(name)
        base_rows = self._tensor_rows(base_id) if base_id is not None else []
        base_blobs = {r[5] for r in base_rows}
        files, tensors = self._entry_rows(model_id)
        blobs: dict[str, dict[str, Any]] = {}
        external: dict[str, str] = {}
        todo = [r[5] for r in tensors] + [f[2] for f in files]
        while todo:
            blob_id = todo.pop()
            if blob_id in blobs or blob_id in external:
                continue
            codec, ref, raw, raw_size, size = self._db.execute(
                "SELECT codec, ref, raw_sha256, raw_size, size FROM blobs WHERE id = ?",
                (blob_id,)).fetchone()
            if blob_id in base_blobs:
                external[blob_id] = raw
                continue
            needs = [n for (n,) in self._db.execute(
                "SELECT needs FROM blob_needs WHERE blob = ? ORDER BY needs", (blob_id,))]
            blobs[blob_id] = {"codec": codec, "ref": ref, "raw_sha256": raw,
                              "raw_size": raw_size, "size": size, "needs": needs}
            todo += [b for b in (ref, *needs) if b]
        base = None
        if base_id is not None:
            base_name = info.base
            base = {"name": base_name, "fingerprint": self.fingerprint(base_name),
                    "tensors": len(base_rows),
                    "hub": self.show(base_name).provenance.get("hub")}
        return {"mergehub_manifest": 1, "mergehub_version": __version__, "name": name,
                "kind": kind, "format": fmt, "metrics": info.metrics,
                "provenance": info.provenance, "base": base,
                "files": files, "tensors": tensors,
                "blobs": blobs, "external": external}

    def import_entry(self, manifest: dict[str, Any], blob_dir: str | Path, name: str, *,
                     base: str | None = None, provenance: dict[str, Any] | None = None,
                     progress: bool | None = None) -> ModelInfo:
        """Add the entry an :meth:`entry_manifest` describes, from its blob files in
        ``blob_dir`` (each named by its id), without decoding anything.

        Every blob file is read once, as it is written, and checked against its id and its
        header against the manifest (one blob in memory at a time, plus those it references);
        a bad one stops the import before the catalog transaction. ``external`` blobs are found,
        by the sha256 of their bytes, among the tensors of ``base``, which must have the
        manifest's base fingerprint. Where the local copy of a base tensor is another blob than
        the sender's (another encoding of the same bytes), the delta blobs that reference it get
        a header naming the local blob (payload unchanged, so a new id). Blobs are written and fsynced before the one catalog
        transaction that adds the entry: an interruption leaves no entry, at most unreferenced
        blob files that ``gc`` removes, and the next import succeeds.
        """
        blob_dir = Path(blob_dir)
        if not _NAME.match(name):
            raise StoreError(f"invalid model name {name!r}")
        manifest = check_manifest(manifest, f"manifest of entry {name!r}")
        kind, fmt = manifest["kind"], manifest["format"]
        want = manifest["base"]
        base_id = None
        mapping: dict[str, str] = {}
        if want is not None:
            if base is None:
                raise BaseMismatchError(f"{manifest['name']!r} is stored against base "
                                        f"{want['name']!r}: pass the base")
            if self.fingerprint(base) != want["fingerprint"]:
                raise BaseMismatchError(
                    f"{manifest['name']!r} was stored against base {want['name']!r} "
                    f"(fingerprint {want['fingerprint'][:16]}), but {base!r} in this store has "
                    f"other tensors (fingerprint {self.fingerprint(base)[:16]})")
            base_id = self._require(base)[0]
            local: dict[str, str] = {}
            for blob_id, raw, ref in self._db.execute(
                    "SELECT b.id, b.raw_sha256, b.ref FROM tensors t JOIN blobs b ON b.id = t.blob "
                    "WHERE t.model_id = ?", (base_id,)):
                if raw not in local or ref is None:  # prefer a self-contained blob
                    local[raw] = blob_id
            for blob_id, raw in manifest["external"].items():
                if raw not in local:
                    raise BaseMismatchError(f"{manifest['name']!r} references a tensor of base "
                                            f"{want['name']!r} that {base!r} lacks")
                mapping[blob_id] = local[raw]
        shipped: dict[str, dict[str, Any]] = manifest["blobs"]
        known = set(shipped) | set(mapping)
        for row in manifest["tensors"]:
            if row[5] not in known:
                raise IntegrityError(f"manifest of {manifest['name']!r}: tensor {row[0]!r} "
                                     f"has blob {row[5][:16]}, which is neither shipped nor "
                                     "a base tensor")
        for path, _, blob in manifest["files"]:
            if blob not in known:
                raise IntegrityError(f"manifest of {manifest['name']!r}: file {path!r} has "
                                     f"blob {blob[:16]}, which is not shipped")
        new_blobs: dict[str, tuple] = {}
        needs: list[tuple[str, str]] = []
        dirs: set[Path] = set()

        def put(blob_id: str) -> str:
            """Check and write shipped blob ``blob_id`` (after the blobs it references) under its
            local id."""
            if blob_id in mapping:
                return mapping[blob_id]
            path = blob_dir / blob_id
            if blob_id not in shipped:
                raise IntegrityError(f"manifest of {manifest['name']!r}: blob {blob_id[:16]} "
                                     "is referenced but neither shipped nor a base tensor")
            meta = shipped[blob_id]
            try:  # its size first: a blob larger than the manifest says is not read at all
                size = path.stat().st_size
                if size != meta["size"]:
                    raise IntegrityError(f"blob {blob_id[:16]}: {path} is {size} bytes, the "
                                         f"manifest says {meta['size']}")
                data = path.read_bytes()
            except OSError as e:
                raise IntegrityError(f"{path}: blob of {manifest['name']!r} cannot be read: "
                                     f"{e.strerror or e}") from e
            if sha256(data) != blob_id:
                raise IntegrityError(f"{path}: content does not match its sha256 name "
                                     f"(corrupted blob of {manifest['name']!r})")
            try:
                header, payload = unpack_blob(data)
                if header.codec == "lossless":
                    check_lossless_layout(header, payload)
            except BlobFormatError as e:
                raise IntegrityError(f"{path}: malformed blob: {e}") from e
            if (header.codec, header.ref, header.sha256) != (meta["codec"], meta["ref"],
                                                             meta["raw_sha256"]):
                raise IntegrityError(f"{path}: blob header disagrees with the manifest")
            if header.nbytes != meta["raw_size"]:
                raise IntegrityError(f"blob {blob_id[:16]}: decodes to {header.nbytes} bytes, "
                                     f"the manifest says {meta['raw_size']}")
            ref = put(header.ref) if header.ref else None
            need = {k: put(v) for k, v in (header.params.get("needs") or {}).items()}
            if ref != header.ref or need != (header.params.get("needs") or {}):
                params = {**header.params, **({"needs": need} if need else {})}
                data = pack_blob(replace(header, ref=ref, params=params), payload)
            mapping[blob_id] = local_id = self._stage_blob(data, new_blobs, dirs)
            needs.extend((local_id, n) for n in need.values())
            return local_id

        with self._lock(exclusive=False):
            self._check_free([name])
            for blob_id in tqdm(shipped, desc=f"import {name}", unit="blob",
                                disable=bar_disabled(progress), leave=False):
                put(blob_id)
            for d in dirs:
                fsync_dir(d)
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            prov = {**manifest["provenance"], **(provenance or {})}
            with self._transaction() as db:
                db.executemany("INSERT OR IGNORE INTO blobs(id, codec, ref, raw_sha256, "
                               "raw_size, size) VALUES (?, ?, ?, ?, ?, ?)",
                               [(k, *v) for k, v in new_blobs.items()])
                db.executemany("INSERT OR IGNORE INTO blob_needs(blob, needs) VALUES (?, ?)",
                               needs)
                self._insert_entry(
                    db, name, kind, base, base_id, fmt, json.dumps(manifest["metrics"]),
                    json.dumps(prov), created,
                    [(p, role, mapping[b]) for p, role, b in manifest["files"]],
                    [(t, f, off, dt, json.dumps(shape), mapping[b])
                     for t, f, off, dt, shape, b in manifest["tensors"]])
        return self.show(name)

    def ls(self) -> list[ModelInfo]:
        """All models, oldest first."""
        names = [r[0] for r in self._db.execute("SELECT name FROM models ORDER BY id")]
        return [self.show(n) for n in names]

    def show(self, name: str) -> ModelInfo:
        """One model's catalog entry and sizes."""
        model_id, kind, base_id, fmt = self._require(name)
        _, _, metrics, provenance, created = self._db.execute(
            "SELECT name, kind, metrics, provenance, created FROM models WHERE id = ?",
            (model_id,)).fetchone()
        base = (self._db.execute("SELECT name FROM models WHERE id = ?", (base_id,)).fetchone()[0]
                if base_id is not None else None)
        count, tensor_bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(b.raw_size), 0) FROM tensors t "
            "JOIN blobs b ON b.id = t.blob WHERE t.model_id = ?", (model_id,)).fetchone()
        (file_bytes,) = self._db.execute(
            "SELECT COALESCE(SUM(b.raw_size), 0) FROM files f JOIN blobs b ON b.id = f.blob "
            "WHERE f.model_id = ?", (model_id,)).fetchone()
        (stored,) = self._db.execute(
            f"WITH {_MINE_AND_BASE} "
            "SELECT COALESCE(SUM(size), 0) FROM blobs "
            "WHERE id IN (SELECT blob FROM mine EXCEPT SELECT blob FROM base)",
            {"m": model_id, "b": base_id}).fetchone()
        codecs = {codec: {"blobs": n, "stored_bytes": size, "raw_bytes": raw}
                  for codec, n, size, raw in self._db.execute(
                      f"WITH {_MINE_AND_BASE} "
                      "SELECT codec, COUNT(*), SUM(size), SUM(raw_size) FROM blobs "
                      "WHERE id IN (SELECT blob FROM mine EXCEPT SELECT blob FROM base) "
                      "GROUP BY codec ORDER BY codec", {"m": model_id, "b": base_id})}
        return ModelInfo(name, kind, base, fmt, created, json.loads(metrics),
                         json.loads(provenance), count, tensor_bytes + file_bytes, stored, codecs)

    def origin(self, name: str) -> str | None:
        """Where stored model ``name`` came from, as transformers and peft find it (what an
        adapter's ``base_model_name_or_path`` should say rather than the store's name, which
        they would look up on the Hub): the Hub repo it was pulled from, the repo of the
        Hugging Face cache folder it was added from, else the path it was added from; ``None``
        when it came from none (a merge or training result, added from the store's own work
        folders)."""
        provenance = self.show(name).provenance
        hub = provenance.get("hub")
        if isinstance(hub, dict) and isinstance(hub.get("repo_id"), str):
            return hub["repo_id"]
        source = provenance.get("source")
        if not isinstance(source, str) or not source.startswith("/"):
            return None
        cached = _HF_CACHE_SNAPSHOT.search(source)
        if cached:
            return f"{cached['org']}/{cached['name']}"
        return None if Path(source).is_relative_to(self.root.absolute()) else source

    def __contains__(self, name: object) -> bool:
        """``name in store``: whether a model of that name exists."""
        return isinstance(name, str) and self._model_row(name) is not None

    def disk_bytes(self) -> int:
        """Bytes of all blobs in the store (each counted once, however many models share it)."""
        return self._db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]

    def open(self, name: str) -> StoredModel:
        """Open a stored model for reading tensor by tensor."""
        model_id = self._require(name)[0]
        tensors = {r[0]: (_spec(r), r[5])
                   for r in self._tensor_rows(model_id)}
        side = dict(self._db.execute(
            "SELECT path, blob FROM files WHERE model_id = ? AND role = 'side' ORDER BY path",
            (model_id,)).fetchall())
        return StoredModel(self, self.show(name), tensors, side)

    def load_model(self, name: str, *, device: "str | torch.device" = "cpu",
                   dtype: "torch.dtype | None" = None, model_class: type | None = None) -> Any:
        """Model ``name`` as a ready ``transformers`` model on ``device``:
        :func:`mergehub.loading.load` with this store."""
        from mergehub.loading import load

        return load(name, self, device=device, dtype=dtype, model_class=model_class)

    def export(self, name: str, out: str | Path, *, max_shard_size: int | str | None = None,
               overwrite: bool = False, progress: bool | None = None) -> Path:
        """Write model ``name`` to the directory ``out``, atomically.

        By default the files are re-created exactly as they were added (same names, same
        bytes). With ``max_shard_size`` an HF model is re-sharded instead (new shard files and
        index; every other file kept as it was).
        """
        model_id, _, _, fmt = self._require(name)
        with self._lock(exclusive=False):
            rows = self._tensor_rows(model_id)
            files = self._db.execute("SELECT path, role, blob FROM files WHERE model_id = ? "
                                     "ORDER BY path", (model_id,)).fetchall()
            if max_shard_size is not None:
                if fmt == "peft":
                    raise StoreError(f"model {name!r} is a PEFT adapter: it cannot be re-sharded")
                return self._export_resharded(name, out, rows, files, max_shard_size, overwrite,
                                              progress)
            total = sum(declared_size(_spec(r)) or 0 for r in rows)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"export {name}",
                      disable=bar_disabled(progress), leave=False) as bar:
                return self._export_exact(name, out, rows, files, overwrite, bar)

    def _export_exact(self, name: str, out: str | Path, rows: list, files: list,
                      overwrite: bool, bar: tqdm) -> Path:
        by_file: dict[str, list] = {}
        for r in rows:
            by_file.setdefault(r[1], []).append(r)

        def decode(row: tuple) -> Iterable[Buffer]:
            """A tensor's bytes: up to a chunk decoded whole (on a worker thread), a larger one
            as pieces decoded while they are written (checked at its end: a failure leaves
            nothing, the temp dir is removed)."""
            size = declared_size(_spec(row))
            what = f"model {name!r}, tensor {row[0]!r}"
            if size is not None and size <= _codec.CHUNK_BYTES:
                return [self._read_raw(row[5], what, size)]
            return self._iter_raw(row[5], what, size)

        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            for path, role, blob in files:
                dest = inside(tmp, path, f"model {name!r}: a file path in the catalog")
                with open(dest, "wb") as f:
                    for piece in self._iter_raw(blob, f"model {name!r}, file {path!r}"):
                        f.write(piece)
                    if role == "weights":
                        for pieces in ordered_map(decode, by_file.get(path, [])):
                            for piece in pieces:
                                f.write(piece)
                                bar.update(len(piece))
        return Path(out)

    def _export_resharded(self, name: str, out: str | Path, rows: list, files: list,
                          max_shard_size: int | str, overwrite: bool,
                          progress: bool | None) -> Path:
        blobs = {r[0]: r[5] for r in rows}
        specs = [_spec(r) for r in rows]
        side = {p: self._read_raw(b, f"model {name!r}, file {p!r}")
                for p, role, b in files if role == "side" and not WEIGHTS_INDEX.match(p)}
        return write_model_dir(
            out, specs, lambda s: self._iter_raw(blobs[s.name], f"model {name!r}, tensor "
                                                 f"{s.name!r}", declared_size(s)),
            max_shard_size=max_shard_size, side_files=side, overwrite=overwrite,
            progress=progress)

    def rm(self, name: str) -> None:
        """Remove a model from the catalog (``gc`` then frees its blobs), and its record.

        Refused while other models are stored against it as their base. The record is deleted
        before the catalog transaction commits, so that a removed model never comes back from
        ``verify --repair``; if the commit fails, the record is written again.
        """
        model_id = self._require(name)[0]
        dropped = None
        try:
            with self._transaction() as db:
                dependents = [r[0] for r in db.execute(
                    "SELECT name FROM models WHERE base_id = ? ORDER BY name", (model_id,))]
                if dependents:
                    raise StoreError(f"cannot remove {name!r}: it is the base of "
                                     f"{', '.join(map(repr, dependents))}; remove those first")
                (dropped,) = db.execute("SELECT digest FROM models WHERE id = ?",
                                        (model_id,)).fetchone()
                db.execute("DELETE FROM models WHERE id = ?", (model_id,))
                self._drop_record(dropped)
        except BaseException:
            if dropped is not None and self._model_row(name) is not None:
                with suppress(OSError):  # as on a full disk: `hub verify` reports it missing
                    write_file_atomic(self.root / ENTRIES / f"{dropped}.json",
                                      self._entry_record(model_id))
            raise

    def gc(self) -> GcReport:
        """Delete blobs no model references, leftovers of interrupted adds (temp files, blob
        files and records of no model), and work folders no running command holds (an
        interrupted pull's partial download).

        Leftovers that need no catalog change go first, so that on a full disk the catalog
        transaction finds room. Refused when the catalog lists no model but records exist
        (a catalog lost and replaced by an empty one: ``verify --repair`` restores them).
        """
        with self._lock(exclusive=True):
            records = self._record_files()
            if records and self._db.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 0:
                raise StoreError(
                    f"{self.root}: refused: the catalog lists no model but {ENTRIES}/ holds "
                    f"{len(records)} entry records (was the catalog lost and replaced?): "
                    "`hub verify --repair` restores them; delete them to empty the store")
            temps = list((self.root / "tmp").iterdir())  # left by killed adds
            for t in temps:
                if t.is_dir() and not t.is_symlink():
                    shutil.rmtree(t)
                else:
                    t.unlink()
            transfers = self.root / TRANSFERS
            stale = sum(_remove_unless_held(t) for t in
                        (sorted(transfers.iterdir()) if transfers.is_dir() else []))
            with self._transaction() as db:  # records are written in transactions
                digests = {r[0] for r in db.execute("SELECT digest FROM models")}
                folder = self.root / ENTRIES
                records = self._record_files()
                strays = [p for p in (folder.iterdir() if folder.is_dir() else [])
                          if records.get(p.stem) != p or p.stem not in digests]
                for p in strays:
                    p.unlink()
                if strays:
                    fsync_dir(folder)
            removed, freed = self._remove_unknown_blobs()
            with self._transaction() as db:
                # dead blobs reference dead blobs (a removed fine-tune's deltas, its removed
                # base's blobs): checked at the commit, when all are gone, not row by row
                db.execute("PRAGMA defer_foreign_keys = ON")
                dead = db.execute(
                    "WITH RECURSIVE live(id) AS ("
                    "  SELECT blob FROM tensors UNION SELECT blob FROM files"
                    "  UNION SELECT b.ref FROM blobs b JOIN live ON b.id = live.id"
                    "  WHERE b.ref IS NOT NULL"
                    "  UNION SELECT n.needs FROM blob_needs n JOIN live ON n.blob = live.id) "
                    "SELECT id, size FROM blobs WHERE id NOT IN (SELECT id FROM live)").fetchall()
                db.executemany("DELETE FROM blob_needs WHERE blob = ?", [(d[0],) for d in dead])
                db.executemany("DELETE FROM blobs WHERE id = ?", [(d[0],) for d in dead])
            more, more_freed = self._remove_unknown_blobs()
        return GcReport(removed + more, freed + more_freed, len(temps), stale, len(strays))

    def _remove_unknown_blobs(self) -> tuple[int, int]:
        """Delete the blob files the catalog has no row for; returns (count, bytes)."""
        known = {r[0] for r in self._db.execute("SELECT id FROM blobs")}
        removed, freed = 0, 0
        for path in self._blob_files():
            if path.parent.name + path.name not in known:
                freed += path.stat().st_size
                path.unlink()
                removed += 1
        return removed, freed

    @contextmanager
    def work_folder(self, kind: str) -> Iterator[Path]:
        """A new work folder ``transfers/KIND-<random>`` for a command that writes into the
        store (a merge's output before it is added, a push's export): held like a
        :meth:`transfer`, so that ``gc`` leaves it alone, and removed on the way out."""
        with self.transfer(f"{kind}-{uuid.uuid4().hex[:16]}") as folder:
            try:
                yield folder
            finally:
                shutil.rmtree(folder, ignore_errors=True)

    @contextmanager
    def transfer(self, name: str) -> Iterator[Path]:
        """The work folder ``transfers/NAME`` (created if missing), held under a lock while in
        use. It outlives the process, so an interrupted download resumes from what it holds;
        ``gc`` removes only folders no process holds. The caller removes it when done."""
        folder = self.root / TRANSFERS / name
        while True:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)  # another process on the same transfer: wait
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(folder))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # removed (by its owner or gc) while we waited: make it anew
        try:
            yield folder
        finally:
            os.close(fd)

    def _declared_sizes(self) -> dict[str, int]:
        """What each blob must decode to, as the catalog's tensors declare it (dtype x shape),
        carried over to the blobs they are deltas against (the same size) and to the τMTL a
        TALL blob needs (float32 of the same shape). Blobs of files declare nothing."""
        sizes: dict[str, tuple[int, int]] = {}  # blob -> (elements, bytes per element)
        for blob, dtype, shape in self._db.execute("SELECT blob, dtype, shape FROM tensors"):
            if dtype in DTYPE_WIDTH:
                sizes.setdefault(blob, (math.prod(json.loads(shape)), DTYPE_WIDTH[dtype]))
        refs = self._db.execute("SELECT id, ref FROM blobs WHERE ref IS NOT NULL").fetchall()
        needs = self._db.execute("SELECT blob, needs FROM blob_needs").fetchall()
        for _ in range(_MAX_CHAIN):
            for blob, ref in refs:
                if blob in sizes:
                    sizes.setdefault(ref, sizes[blob])
            for blob, need in needs:
                if blob in sizes:
                    sizes.setdefault(need, (sizes[blob][0], 4))
        return {blob: n * width for blob, (n, width) in sizes.items()}

    def _blob_files(self) -> Iterator[Path]:
        for sub in sorted((self.root / "blobs").iterdir()):
            if sub.is_dir():
                yield from sorted(sub.iterdir())

    def verify(self, progress: bool | None = None) -> VerifyReport:
        """Check the catalog, then every blob against its hash, decode it and check the
        decoded bytes' hash.

        The catalog: SQLite's integrity and foreign key checks, and each model's rows against
        the digest recorded when it was added and against its record file (an edited or damaged
        row, a lost record). Problems name every model a damaged blob affects. Blob files and
        records no catalog row references (left by an interrupted add) are counted, not
        reported: ``gc`` removes them.
        """
        report = VerifyReport()
        with self._lock(exclusive=False):
            try:
                users = self._verify_catalog(report)
                rows = self._db.execute("SELECT id, ref, raw_sha256, size FROM blobs").fetchall()
            except sqlite3.DatabaseError as e:
                report.problems.append(f"catalog: {e}; {_repair_hint(self.root)}")
                return report

            def what(blob: str) -> str:
                uses = users.get(blob)
                if not uses:
                    return f"blob {blob[:16]} (base of a stored delta)"
                models = list(dict.fromkeys(m for m, _ in uses))
                also = (f" (also used by {', '.join(f'model {m!r}' for m in models[1:])})"
                        if len(models) > 1 else "")
                return f"model {uses[0][0]!r}, {uses[0][1]!r}{also}"

            def damaged(blob: str, problem: str) -> None:
                report.problems.append(problem)
                report.affected.update(m for m, _ in users.get(blob, []))

            known = {r[0] for r in rows}
            for blob in sorted(set(users) - known):
                damaged(blob, f"{what(blob)}: blob {blob[:16]} has no catalog entry")
            declared = self._declared_sizes()
            for blob_id, ref, raw_sha, size in tqdm(rows, desc="verify", unit="blob",
                                                    disable=bar_disabled(progress), leave=False):
                try:
                    header, pieces = self._blob_stream(blob_id, what(blob_id),
                                                       declared.get(blob_id))
                    if header.sha256 != raw_sha or header.ref != ref:
                        damaged(blob_id, f"{what(blob_id)}: blob {blob_id[:16]} disagrees with "
                                         "its catalog entry")
                    for _ in pieces:  # decoded a chunk at a time, checked at the end
                        pass
                except IntegrityError as e:
                    damaged(blob_id, str(e))
                report.blobs += 1
                report.bytes += size
            report.unreferenced_files = sum(
                1 for p in self._blob_files() if p.parent.name + p.name not in known)
        return report

    def _verify_catalog(self, report: VerifyReport) -> dict[str, list[tuple[str, str]]]:
        """The catalog checks of :meth:`verify`; returns the users (model, tensor or file) of
        each blob that tensors and files reference."""
        for (msg,) in self._db.execute("PRAGMA integrity_check"):
            if msg != "ok":
                report.problems.append(f"catalog: {msg}; {_repair_hint(self.root)}")
        for table, rowid, parent, _ in self._db.execute("PRAGMA foreign_key_check"):
            report.problems.append(f"catalog: row {rowid} of table {table} references a "
                                   f"missing row of {parent} (catalog edited or damaged)")
        digests = set()
        for model_id, name, recorded in self._db.execute(
                "SELECT id, name, digest FROM models ORDER BY id").fetchall():
            try:
                actual = sha256(self._entry_record(model_id))
            except IntegrityError as e:
                actual = str(e)
            digests.add(recorded)
            problem = None
            if recorded is None:
                problem = ("no digest is recorded for its catalog rows (added by an older "
                           "mergehub, or the catalog was edited): check it, then `hub verify "
                           "--repair` records them")
            elif actual != recorded:
                problem = ("its catalog rows (files, tensors, offsets, blob ids, ...) differ "
                           "from those recorded when it was stored (catalog edited or damaged)"
                           + ("; `hub verify --repair` restores them from its record"
                              if self._read_record(recorded) else "; its record is gone too"))
            elif self._read_record(recorded) is None:
                problem = (f"its record {ENTRIES}/{recorded}.json is missing or damaged; "
                           "`hub verify --repair` writes it again")
            if problem:
                report.problems.append(f"model {name!r}: {problem}")
                report.affected.add(name)
        report.unreferenced_records = len(set(self._record_files()) - digests)
        users: dict[str, list[tuple[str, str]]] = {}
        for model, item, blob in self._db.execute(
                "SELECT m.name, t.name, t.blob FROM tensors t JOIN models m ON m.id = t.model_id "
                "UNION ALL SELECT m.name, f.path, f.blob FROM files f "
                "JOIN models m ON m.id = f.model_id ORDER BY 1, 2"):
            users.setdefault(blob, []).append((model, item))
        return users

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


def _check_fits_base(ckpt: Checkpoint, kind: str, base: str,
                     base_tensors: dict[str, tuple[TensorSpec, str]],
                     new_tensors: set[str] = frozenset()) -> None:
    """Raise :class:`BaseMismatchError` naming the first tensor that does not fit ``base``
    (``new_tensors`` may be absent from it). An adapter of a task model (a classifier built
    on a bare encoder) names its targets with the task model's prefix (``bert.encoder...``):
    a target fits when the base has it with or without that first component."""
    if ckpt.format == "peft" or kind == "adapter":
        for name in ckpt.tensors:
            target = peft_target_weight(name)
            if target is not None and target not in base_tensors and \
                    target.partition(".")[2] not in base_tensors:
                raise BaseMismatchError(
                    f"{ckpt.path}: adapter tensor {name!r} targets {target!r}, which base "
                    f"{base!r} does not have")
        return
    for name in sorted(set(ckpt.tensors) | set(base_tensors)):
        if name not in base_tensors and name in new_tensors:
            continue
        if name not in base_tensors:
            raise BaseMismatchError(f"{ckpt.path}: tensor {name!r} is not in base {base!r} "
                                    "(different architecture, or resized/extra layers?)")
        if name not in ckpt.tensors:
            raise BaseMismatchError(f"{ckpt.path}: tensor {name!r} of base {base!r} is missing")
        mine, theirs = ckpt.tensors[name].spec.shape, base_tensors[name][0].shape
        if mine != theirs:
            raise BaseMismatchError(f"{ckpt.path}: tensor {name!r} has shape {list(mine)} but "
                                    f"{list(theirs)} in base {base!r}")


_BLOB_ID = re.compile(r"^[0-9a-f]{64}$")
#: the fields of an entry manifest (see :meth:`Store.entry_manifest`), checked in this order
_MANIFEST_FIELDS = ("name", "kind", "format", "metrics", "provenance", "base", "files",
                    "tensors", "blobs", "external")


def check_manifest(manifest: object, what: str) -> dict[str, Any]:
    """``manifest`` if it is a well-formed entry manifest (:meth:`Store.entry_manifest`), else
    :class:`IntegrityError` ``"{what}: FIELD: problem"`` for the first problem found.

    A pulled manifest is written by whoever owns the repo: every field is checked for its
    type before anything uses it, every file path with
    :func:`~mergehub.storage.paths.safe_relpath`, every blob id for its form (it names a
    file), and the sizes for agreement (a tensor's dtype and shape with the decoded size of
    its shipped blob). An entry needs a weights file, and every tensor lies in one.
    """
    def fail(field: str, problem: str) -> IntegrityError:
        return IntegrityError(f"{what}: {field}: {problem}")

    def count(value: object, field: str) -> int:
        if type(value) is not int or value < 0:
            raise fail(field, f"{shown(value)} is not a non-negative integer")
        return value

    def blob_id(value: object, field: str) -> str:
        if not isinstance(value, str) or not _BLOB_ID.match(value):
            raise fail(field, f"{shown(value)} is not a blob id (64 hex digits)")
        return value

    def row(value: object, field: str, columns: str) -> list:
        if not isinstance(value, list) or len(value) != len(columns.split(", ")):
            raise fail(field, f"{shown(value)} is not a [{columns}] row")
        return value

    if not isinstance(manifest, dict):
        raise IntegrityError(f"{what}: not a JSON object")
    if manifest.get("mergehub_manifest") != 1:
        raise fail("mergehub_manifest", f"version {shown(manifest.get('mergehub_manifest'))} "
                                         "is not one this mergehub reads (1)")
    for key in _MANIFEST_FIELDS:
        if key not in manifest:
            raise fail(key, "missing")
    name = manifest["name"]
    if not isinstance(name, str) or not name:
        raise fail("name", f"{shown(name)} is not a model name")
    if manifest["kind"] not in KINDS:
        raise fail("kind", f"{shown(manifest['kind'])} is not one of {', '.join(KINDS)}")
    if manifest["format"] not in ("hf", "peft", "safetensors"):
        raise fail("format", f"{shown(manifest['format'])} is not one of hf, peft, safetensors")
    for key in ("metrics", "provenance", "blobs", "external"):
        if not isinstance(manifest[key], dict):
            raise fail(key, "not a JSON object")
    base = manifest["base"]
    if base is not None:
        if not isinstance(base, dict):
            raise fail("base", "neither null nor a JSON object")
        for key in ("name", "fingerprint", "tensors"):
            if key not in base:
                raise fail(f"base.{key}", "missing")
        if not isinstance(base["name"], str):
            raise fail("base.name", f"{shown(base['name'])} is not a model name")
        blob_id(base["fingerprint"], "base.fingerprint")
        count(base["tensors"], "base.tensors")
        if not isinstance(base.get("hub") or {}, dict):
            raise fail("base.hub", "not a JSON object")
    blobs = manifest["blobs"]
    for key, meta in blobs.items():
        blob_id(key, "blobs")
        field = f"blobs[{key[:16]}]"
        if not isinstance(meta, dict):
            raise fail(field, "not a JSON object")
        for sub in ("codec", "ref", "raw_sha256", "raw_size", "size", "needs"):
            if sub not in meta:
                raise fail(f"{field}.{sub}", "missing")
        if not isinstance(meta["codec"], str):
            raise fail(f"{field}.codec", f"{shown(meta['codec'])} is not a codec name")
        if meta["ref"] is not None:
            blob_id(meta["ref"], f"{field}.ref")
        blob_id(meta["raw_sha256"], f"{field}.raw_sha256")
        count(meta["raw_size"], f"{field}.raw_size")
        count(meta["size"], f"{field}.size")
        if not isinstance(meta["needs"], list):
            raise fail(f"{field}.needs", "not a list")
        for need in meta["needs"]:
            blob_id(need, f"{field}.needs")
    for key, raw in manifest["external"].items():
        blob_id(key, "external")
        blob_id(raw, f"external[{key[:16]}]")
    if not isinstance(manifest["files"], list):
        raise fail("files", "not a list")
    roles: dict[str, str] = {}
    for i, file in enumerate(manifest["files"]):
        path, role, blob = row(file, f"files[{i}]", "path, role, blob")
        safe_relpath(path, f"{what}: files[{i}][0]")
        if path in roles:
            raise fail(f"files[{i}][0]", f"{shown(path)} is listed twice")
        if role not in ("weights", "side"):
            raise fail(f"files[{i}][1]", f"{shown(role)} is neither weights nor side")
        blob_id(blob, f"files[{i}][2]")
        roles[path] = role
    for path in roles:  # a path cannot be both a file and a folder of another
        parts = path.split("/")
        for n in range(1, len(parts)):
            if "/".join(parts[:n]) in roles:
                raise fail("files", f"{shown(path)} lies in {shown('/'.join(parts[:n]))}, "
                                    "which is a file")
    if "weights" not in roles.values():
        raise fail("files", "no weights file: an entry has at least one")
    if not isinstance(manifest["tensors"], list):
        raise fail("tensors", "not a list")
    names: set[str] = set()
    for i, tensor in enumerate(manifest["tensors"]):
        tname, file, offset, dtype, shape, blob = row(
            tensor, f"tensors[{i}]", "name, file, offset, dtype, shape, blob")
        if not isinstance(tname, str) or not tname or tname in names:
            raise fail(f"tensors[{i}][0]", f"{shown(tname)} is not a new tensor name")
        names.add(tname)
        if roles.get(file) != "weights":
            raise fail(f"tensors[{i}][1]", f"{shown(file)} is not a weights file of the "
                                           "manifest")
        count(offset, f"tensors[{i}][2]")
        if dtype not in safetensors_format.DTYPE_WIDTH:
            raise fail(f"tensors[{i}][3]", f"{shown(dtype)} is not a safetensors dtype")
        if not isinstance(shape, list) or len(shape) > 64:
            raise fail(f"tensors[{i}][4]", f"{shown(shape)} is not a shape")
        for size in shape:
            count(size, f"tensors[{i}][4]")
        blob_id(blob, f"tensors[{i}][5]")
        nbytes = TensorSpec(tname, dtype, tuple(shape)).nbytes
        if blob in blobs and blobs[blob]["raw_size"] != nbytes:
            raise fail(f"tensors[{i}]", f"tensor {tname!r}: {dtype} {shape} is {nbytes} "
                                        f"bytes, its blob decodes to {blobs[blob]['raw_size']}")
    return manifest
