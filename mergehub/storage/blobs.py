"""Blob files: content-addressed (named by the sha256 of their bytes), written to ``tmp/``,
fsynced and renamed into place, opened and checked against their id or the catalog."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from mergehub.errors import IntegrityError
from mergehub.storage import codec as _codec
from mergehub.storage.atomic import start_writeback
from mergehub.storage.catalog import MAX_DELTA_DEPTH, _MAX_CHAIN
from mergehub.storage.blob_format import (
    BlobHeader, Buffer, Payload, read_header, sha256, unpack_blob)
from mergehub.storage.frames import BlobFormatError
from mergehub.storage.writer import WRITEBACK_BYTES


def _sha256_pieces(pieces: Iterable[Buffer]) -> str:
    """sha256 of the bytes of consecutive pieces."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


class StoreBlobs:
    """The blob-file part of :class:`~mergehub.storage.store.Store`: where a blob lives, writing
    and staging new ones, opening one with its header checked, and finding stored ones."""

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

    def blob_path(self, blob_id: str) -> Path:
        """The file of a stored blob (named by the sha256 of its bytes)."""
        return self._blob_path(blob_id)

    def _blob_files(self) -> Iterator[Path]:
        for sub in sorted((self.root / "blobs").iterdir()):
            if sub.is_dir():
                yield from sorted(sub.iterdir())

