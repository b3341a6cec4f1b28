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
partial blob. A read checks a blob once: its header against the catalog before decoding, the
decoded bytes against the sha256 of the original after (on the CPU or on a GPU alike);
``verify`` also checks every blob file against its id.

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

The code: :class:`Store` is this module's facade, one class made of a part per concern, each a
mixin in its own module (the parts reach each other through ``self``; this module keeps the
setup, listing, opening and removing of entries):

    catalog.py       the SQLite catalog: schema, opening, the store lock, shared lookups
    records.py       entry records (``entries/``) and inserting a model's rows
    blobs.py         blob files: writing, staging, opening and checking them
    reading.py       the read path: decoding blobs with their checks, :class:`StoredModel`
    folders.py       ``add`` and ``export`` of model folders
    compression.py   ``compress``, ``compress_search``, ``compress_multi`` / ``compress_tall``
    shipping.py      entry manifests and ``import_entry`` (``hub push`` / ``hub pull``)
    maintenance.py   ``gc``, work folders, ``verify``
    repair.py        ``verify --repair``
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergehub.errors import StoreError, spelled
from mergehub.storage.atomic import write_file_atomic
from mergehub.storage.blobs import StoreBlobs
from mergehub.storage.catalog import (
    CATALOG, ENTRIES, KINDS, LAYOUT_VERSION, MAX_DELTA_DEPTH, ModelInfo, StoreCatalog, _LAYOUT,
    _read_marker, _spec, declared_size, default_root)
from mergehub.storage.compression import StoreCompression
from mergehub.storage.folders import StoreFolders
from mergehub.storage.maintenance import GcReport, StoreMaintenance, VerifyReport
from mergehub.storage.paths import MARKER
from mergehub.storage.reading import (
    REUSE_BYTES, StoredModel, StoreReads, _HashThread, _Reuse)
from mergehub.storage.records import StoreRecords
from mergehub.storage.repair import RepairReport, StoreRepair
from mergehub.storage.shipping import StoreShipping, check_manifest

if TYPE_CHECKING:
    import torch

#: what this module offers, wherever it is defined (other code and users import it from here)
__all__ = ["CATALOG", "ENTRIES", "KINDS", "LAYOUT_VERSION", "MAX_DELTA_DEPTH", "REUSE_BYTES",
           "GcReport", "ModelInfo", "RepairReport", "Store", "StoredModel", "VerifyReport",
           "base_reference", "check_manifest", "declared_size", "default_root", "names_entry"]

#: a model folder of the Hugging Face cache: ``.../models--ORG--NAME/snapshots/REVISION``
_HF_CACHE_SNAPSHOT = re.compile(r"/models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")
#: SQL: the blobs model :m references (with the blobs they need) and those its base :b does
_MINE_AND_BASE = (
    "mine AS (SELECT blob FROM tensors WHERE model_id = :m "
    "         UNION SELECT blob FROM files WHERE model_id = :m "
    "         UNION SELECT n.needs FROM blob_needs n JOIN tensors t ON t.blob = n.blob "
    "         WHERE t.model_id = :m), "
    "base AS (SELECT blob FROM tensors WHERE model_id = :b "
    "         UNION SELECT blob FROM files WHERE model_id = :b)")


def names_entry(ref: str, store: Store | None) -> bool:
    """Whether a model reference means a store entry rather than a path: ``store`` has an entry
    of that name and the reference does not start like a path (``.``, ``/``, ``~``: store
    names cannot). So ``base`` or ``org/model`` is the store's entry even beside a folder of
    that name, and ``./base`` the folder."""
    return store is not None and not ref.startswith((".", "/", "~")) and ref in store


def base_reference(ref: str, store: Store | None) -> str | None:
    """What a PEFT adapter's ``base_model_name_or_path`` says for the base model reference
    ``ref`` (a store entry or a path, told apart by :func:`names_entry`): the entry's
    :meth:`Store.origin`, or the path made absolute (peft reads a relative one from the
    current directory)."""
    if names_entry(ref, store):
        return store.origin(ref)
    return os.path.abspath(os.path.expanduser(ref))


class Store(StoreCatalog, StoreRecords, StoreBlobs, StoreReads, StoreFolders, StoreShipping,
            StoreCompression, StoreMaintenance, StoreRepair):
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
        self._later: _HashThread | None = None  # StoreReads.checking_later
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def init(cls, root: str | Path | None = None) -> "Store":
        """Create (or open, if it exists) the store at ``root``."""
        return cls(root, create=True)

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



def as_store(store: Store | str | Path | None) -> Store | None:
    """The ``store`` argument of the Python API as a :class:`Store`: a path opens the store
    there (an error if there is none), a Store or ``None`` is kept."""
    return Store(store) if isinstance(store, (str, os.PathLike)) else store
