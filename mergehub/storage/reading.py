"""The read path: a blob's decoded bytes as pieces or whole, checked once (the header against
the catalog, then the decoded bytes against the recorded sha256), reuse of decoded bytes
within a merge, lossy blobs decoded on a device, and :class:`StoredModel`, a stored model read
like a checkpoint."""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from mergehub.errors import InputError, IntegrityError, StoreError
from mergehub.storage import codec as _codec
from mergehub.storage import safetensors_format
from mergehub.storage.catalog import ModelInfo, _MAX_CHAIN, declared_size
from mergehub.storage.blob_format import BlobHeader, Buffer, Payload
from mergehub.storage.codec import decode_lossless_chunks
from mergehub.storage.frames import BlobFormatError
from mergehub.storage.lossy_blobs import blob_needs, decode_blob, lossy_shape
from mergehub.storage.safetensors_format import TensorSpec

if TYPE_CHECKING:
    import torch

    from mergehub.storage.store import Store

#: decoded bytes a read may keep for reuse (:meth:`Store.reusing`); a blob of more than half
#: of it is decoded again each time
REUSE_BYTES = 256 << 20
#: decoded pieces that may wait for their hash (:class:`_HashThread`)
_HASH_QUEUE = 4


class _Reuse:
    """Decoded, verified bytes of chosen blobs, kept for :meth:`Store.reusing` until they have
    been read as often as expected (least recently used dropped first beyond ``max_bytes``);
    safe to use from several threads.

    ``reads``: how many times each blob is expected to be decoded; the first read puts the
    bytes here, and once the others have got them they are dropped, so a merge holds a base
    tensor's bytes only while the fine-tunes of that tensor are read (a read beyond the count
    decodes the blob again)."""

    def __init__(self, reads: Mapping[str, int], max_bytes: int):
        self.left = dict(reads)
        self.max_bytes = max_bytes
        self.held: OrderedDict[str, bytes] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, blob_id: str) -> bytes | None:
        with self.lock:
            data = self.held.get(blob_id)
            if data is not None:
                self.left[blob_id] -= 1
                if self.left[blob_id] > 0:
                    self.held.move_to_end(blob_id)
                else:
                    self._drop(blob_id)
            return data

    def put(self, blob_id: str, data: Buffer) -> None:
        if self.left.get(blob_id, 0) < 2 or len(data) > self.max_bytes // 2:
            return
        copy = bytes(data)  # readers get copies: a consumer may write into what it was given
        with self.lock:
            if blob_id in self.held:
                return
            self.left[blob_id] -= 1  # this read is the first
            self.held[blob_id] = copy
            self.size += len(copy)
            while self.size > self.max_bytes:
                self._drop(next(iter(self.held)))

    def _drop(self, blob_id: str) -> None:
        self.size -= len(self.held.pop(blob_id))


class StoredModel:
    """A model in the store, read like a checkpoint: specs, then one tensor at a time."""

    def __init__(self, store: Store, info: ModelInfo, tensors: dict[str, tuple[TensorSpec, str]],
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
        pass), checked as every read is (see :meth:`Store._decode_on`).
        """
        import torch

        TORCH_DTYPE = safetensors_format.TORCH_DTYPE
        spec, blob = self._lookup(name)
        if spec.dtype not in TORCH_DTYPE:
            raise InputError(f"model {self.name!r}: tensor {name!r} has dtype {spec.dtype}, "
                             "which torch cannot represent")
        what = f"model {self.name!r}, tensor {name!r}"
        if device is not None and torch.device(device).type == "cuda":
            decoded = self.store._decode_on(blob, what, torch.device(device), declared_size(spec))
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


def _undecodable(what: str, blob_id: str, e: Exception) -> IntegrityError:
    """The error for a blob whose decoding failed (a damaged payload or header)."""
    return IntegrityError(f"{what}: blob {blob_id[:16]} is corrupt: it cannot be decoded ({e}; "
                          "`hub verify` lists what is affected)")


def _decodes_otherwise(what: str, blob_id: str) -> IntegrityError:
    """The error for a blob that decodes to other bytes than the original's."""
    return IntegrityError(f"{what}: blob {blob_id[:16]} is corrupt: it decodes to bytes whose "
                          "sha256 does not match the original (`hub verify` lists what is "
                          "affected)")


class _HashThread:
    """sha256 of decoded pieces on a thread of its own, so that decoding goes on beside it
    (``hashlib`` releases the GIL for large buffers). Each piece is hashed into the digest it
    was given with; :meth:`expect` queues a comparison behind a blob's pieces, and
    :meth:`finish` waits for everything queued and raises the first mismatch.

    ``copy=False``: pieces are hashed as given, so the caller must not change a piece until
    :meth:`finish` returns (one multi-chunk blob read whole). ``copy=True``: each piece is
    copied first, a chunk at a time, so the caller may reuse or write into it at once (the
    reads of a :meth:`StoreReads.checking_later` block, whose buffers a merge consumes long
    before the check). At most ``_HASH_QUEUE`` pieces wait (the memory they hold)."""

    def __init__(self, copy: bool) -> None:
        self._copy = copy
        self._queue: queue.Queue = queue.Queue(_HASH_QUEUE)
        self._failure: IntegrityError | None = None
        self._thread = threading.Thread(target=self._run, name="mergehub-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            digest, data, error = item
            if error is None:
                digest.update(data)
            elif digest.hexdigest() != data and self._failure is None:
                self._failure = error

    def update(self, digest: "hashlib._Hash", piece: Buffer) -> None:
        if not self._copy:
            self._queue.put((digest, piece, None))
            return
        view = memoryview(piece).cast("B")
        for start in range(0, len(view), _codec.CHUNK_BYTES):
            self._queue.put((digest, bytes(view[start:start + _codec.CHUNK_BYTES]), None))

    def expect(self, digest: "hashlib._Hash", sha256: str, error: IntegrityError) -> None:
        """Once the pieces queued before have been hashed, ``error`` unless ``digest`` is
        ``sha256``."""
        self._queue.put((digest, sha256, error))

    def finish(self, check: bool = True) -> None:
        """End the thread once everything queued is hashed; raise the first mismatch (unless
        ``check`` is false: a block that already fails for another reason)."""
        self._queue.put(None)
        self._thread.join()
        if check and self._failure is not None:
            raise self._failure


class StoreReads:
    """The read part of :class:`~mergehub.storage.store.Store`: decoding blobs (on the CPU, or a
    lossy one on a device) with the checks described in :meth:`_blob_stream`."""

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
        header, payload = self._open_for_read(blob_id, what, expect, _depth, check_id)
        return header, self._decoded(blob_id, header, payload, what, _depth)

    def _open_for_read(self, blob_id: str, what: str, expect: int | None, depth: int,
                       check_id: bool) -> tuple[BlobHeader, Payload]:
        """The checks of :meth:`_blob_stream` that come before decoding (the chain's depth,
        the blob's id or its header against the catalog, the size ``expect``), and the blob's
        header and payload."""
        if depth > _MAX_CHAIN:
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
        return header, payload

    def _decoded(self, blob_id: str, header: BlobHeader, payload: Payload, what: str,
                 depth: int, into: memoryview | None = None) -> Iterator[Buffer]:
        """The pieces of :meth:`_blob_stream`, the decoded bytes checked at the end (or, in a
        :meth:`checking_later` block, by the block's hashing thread); a lossless blob's decoded
        into ``into`` (``header.nbytes`` writable bytes) when given, the pieces views of it."""
        later = self._later
        own = (_HashThread(copy=False) if later is None and header.nbytes > _codec.CHUNK_BYTES
               else None)
        hasher = later or own
        digest, total = hashlib.sha256(), 0
        try:
            if header.codec == "lossless":
                ref = (self._iter_raw(header.ref, what, header.nbytes, depth + 1)
                       if header.ref else None)
                pieces: Iterable[Buffer] = decode_lossless_chunks(header, payload, ref,
                                                                   into)
            else:  # lossy codecs decode whole tensors (and read the base's whole)
                shape = lossy_shape(header)
                # read-only inputs of the decode: kept bytes as they are, others not copied
                ref_raw = (self._reused(header.ref, header.nbytes)
                           or self._read_raw(header.ref, what, header.nbytes, depth + 1,
                                             copy=False) if header.ref else None)
                extras = {key: self._read_raw(other, what, 4 * math.prod(shape), depth + 1,
                                              copy=False)
                          for key, other in blob_needs(header).items()}
                pieces = [decode_blob(header, payload.read(0, len(payload)), ref_raw, extras)]
            for piece in pieces:
                if hasher is None:
                    digest.update(piece)
                else:
                    hasher.update(digest, piece)
                total += len(piece)
                yield piece
        except (BlobFormatError, ValueError, KeyError) as e:  # codec errors are ValueErrors
            raise _undecodable(what, blob_id, e) from e
        finally:  # also when the reader stops early: the thread ends
            if own is not None:
                own.finish()
        if total != header.nbytes:
            raise _decodes_otherwise(what, blob_id)
        if later is not None:
            later.expect(digest, header.sha256, _decodes_otherwise(what, blob_id))
        elif digest.hexdigest() != header.sha256:
            raise _decodes_otherwise(what, blob_id)

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
        header, payload = self._open_for_read(blob_id, what, expect, _depth, False)
        parts = None
        # a lossy blob decodes whole, into a buffer of its own: taken as it is, like a small one
        if not copy and (header.nbytes <= _codec.CHUNK_BYTES or header.codec != "lossless"):
            parts = list(self._decoded(blob_id, header, payload, what, _depth))  # checked
            if len(parts) == 1 and not memoryview(parts[0]).readonly:
                whole = memoryview(parts[0]).cast("B")
                if self._reuse is not None:
                    self._reuse.put(blob_id, whole)
                return whole
        out = _codec.new_buffer(header.nbytes)  # the bytearray a copy is; not numpy memory
        view = memoryview(out).cast("B")
        if parts is None and header.codec == "lossless":  # each chunk decoded in its place
            for _ in self._decoded(blob_id, header, payload, what, _depth, view):
                pass  # taking every piece runs the checks at the end
        else:
            pos = 0
            for piece in parts if parts is not None else self._decoded(blob_id, header,
                                                                       payload, what, _depth):
                view[pos:pos + len(piece)] = piece
                pos += len(piece)
        if self._reuse is not None:
            self._reuse.put(blob_id, out)
        return out

    @contextmanager
    def reusing(self, reads: Mapping[str, int],
                max_bytes: int = REUSE_BYTES) -> Iterator[None]:
        """Within the block, keep the decoded bytes of the blobs of ``reads`` (blob id -> how
        many times the block decodes it) once a read has decoded and verified them whole, until
        they have been read that often (up to ``max_bytes``, the least recently used dropped
        first), so that reading them again copies them instead of decoding again.

        What a merge wants for :meth:`shared_blobs`: it reads the base's tensor, then each
        fine-tune's, whose lossless delta is decoded against that same base tensor; without
        this the base tensor is decoded once for the base and once more per fine-tune.
        """
        previous, self._reuse = self._reuse, _Reuse(reads, max_bytes)
        try:
            yield
        finally:
            self._reuse = previous

    @contextmanager
    def checking_later(self) -> Iterator[Callable[[], None]]:
        """Within the block, reads check the sha256 of the bytes they decode on a thread of
        their own, off the read path (decoding the next tensor goes on beside it), instead of
        before their last piece is taken; yields ``finish``, which waits for those checks and
        raises :class:`IntegrityError` for the first blob that decoded to other bytes than
        its original. For a merge, which writes its output to a temp folder: it calls
        ``finish`` before the folder is renamed into place, so nothing made from a damaged
        blob appears (the hash, about an eighth of a lossless store read's CPU time, runs
        beside the merge where a core is free: `benchmarks/RESULTS.md`, issue 15).

        Leaving the block calls ``finish`` if the block did not; leaving it by an exception
        only stops the thread. Decoded bytes a :meth:`reusing` block keeps are verified by
        the same ``finish``. Every other check (headers, sizes, the catalog) stays where it
        is."""
        previous, hasher = self._later, _HashThread(copy=True)
        self._later = hasher
        done = False

        def finish(check: bool = True) -> None:
            nonlocal done
            if not done:
                done = True
                self._later = previous
                hasher.finish(check)

        try:
            yield finish
        except BaseException:
            finish(check=False)
            raise
        finish()

    def shared_blobs(self, names: Iterable[str]) -> dict[str, int]:
        """The blobs that reading every tensor of the models ``names`` (a name listed twice is
        read twice) decodes more than once, with how many times: a tensor several of them
        share, or a reference that their deltas are decoded against (each read of a delta
        decodes its reference)."""
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
        return {blob: n for blob, n in counts.items() if n > 1}

    def _decode_on(self, blob_id: str, what: str, device: torch.device,
                   expect: int | None = None) -> torch.Tensor | None:
        """A lossy blob decoded on ``device``, flat, in its tensor's dtype, or ``None`` for a
        lossless blob (those decode on the CPU: zstd).

        Checked once: its header against the catalog (and ``expect``) first, so a lossless
        blob is passed on unread; then a lossy blob's stored bytes against its id. Unlike the
        CPU read, which hashes the decoded bytes it has on the CPU anyway, this hashes the
        stored blob, which is small (1/16 of the tensor for bit1, a few % for compeft), where
        the decoded tensor would have to come back from the device whole: the same guarantee
        (decoding is deterministic), for a fraction of the bytes.
        """
        import torch

        from mergehub.storage.codecs import LOSSY

        header, payload = self._open_for_read(blob_id, what, expect, 0, check_id=False)
        lossy = LOSSY.get(header.codec)
        if lossy is None or not header.ref:
            return None
        header, payload = self._open_blob(blob_id, what)

        def on_device(blob: str, dtype: str, nbytes: int) -> torch.Tensor:
            raw = self._read_raw(blob, what, nbytes, 1)
            return torch.frombuffer(raw, dtype=safetensors_format.TORCH_DTYPE[dtype]).to(device)

        try:
            shape = lossy_shape(header)
            base = on_device(header.ref, header.dtype, header.nbytes).reshape(shape)
            extras = {key: on_device(other, "F32", 4 * math.prod(shape))
                      for key, other in blob_needs(header).items()}
            decoded = lossy.decode(payload.read(0, len(payload)), header.params, base, extras)
        except (BlobFormatError, ValueError, KeyError) as e:  # codec errors are ValueErrors
            raise _undecodable(what, blob_id, e) from e
        out = decoded.to(safetensors_format.TORCH_DTYPE[header.dtype]).contiguous().reshape(-1)
        return out
