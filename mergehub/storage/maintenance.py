"""Store maintenance: ``gc`` (unreferenced blobs, leftovers of interrupted commands), the
work folders of transfers and merges, and ``verify`` (catalog, records, every blob)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from mergehub.errors import IntegrityError, StoreError
from mergehub.progress import bar_disabled
from mergehub.storage.atomic import fsync_dir
from mergehub.storage.catalog import ENTRIES, _MAX_CHAIN, _repair_hint
from mergehub.storage.blob_format import sha256
from mergehub.storage.paths import TRANSFERS
from mergehub.storage.safetensors_format import DTYPE_WIDTH


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


@dataclass(frozen=True)
class GcReport:
    """Result of :meth:`Store.gc`."""

    blobs_removed: int
    bytes_freed: int
    temp_files_removed: int
    transfers_removed: int = 0
    records_removed: int = 0


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


class StoreMaintenance:
    """The gc / verify part of :class:`~mergehub.storage.store.Store`."""

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

