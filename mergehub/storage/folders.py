"""Adding model folders to the store (tensors content-addressed, deltas against the base)
and exporting them again, byte for byte or re-sharded."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mergehub import __version__
from mergehub.errors import BaseMismatchError, InputError, StoreError, spelled
from mergehub.progress import bar_disabled
from mergehub.storage import codec as _codec
from mergehub.storage.atomic import atomic_output_dir, fsync_dir
from mergehub.storage.blobs import _sha256_pieces
from mergehub.storage.catalog import KINDS, ModelInfo, _NAME, _spec, declared_size, now_utc
from mergehub.storage.checkpoint import Checkpoint, open_checkpoint, peft_target_weight
from mergehub.storage.blob_format import Buffer, sha256
from mergehub.storage.codec import encode_lossless, encode_lossless_payload, lossless_header
from mergehub.storage.parallel import ordered_map
from mergehub.storage.paths import inside
from mergehub.storage.safetensors_format import TensorSpec, read_range
from mergehub.storage.writer import WEIGHTS_INDEX, write_model_dir


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


class StoreFolders:
    """The add / export part of :class:`~mergehub.storage.store.Store`."""

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
        with self._transaction() as db:
            self._insert_blobs(db, new_blobs)
            self._insert_entry(db, name, kind, base, base_id, ckpt.format, json.dumps(metrics),
                               json.dumps(prov), now_utc(), file_rows, tensor_rows)
        return self.show(name)

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

