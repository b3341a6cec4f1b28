"""Lossy compression of stored fine-tunes into new entries: one codec per entry
(:meth:`~StoreCompression.compress`, with a grid search), and a multi-model codec over several
fine-tunes of one base, an entry per task (:meth:`~StoreCompression.compress_tall`: TALL)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mergehub.errors import StoreError, spelled
from mergehub.progress import bar_disabled
from mergehub.storage import safetensors_format
from mergehub.storage.atomic import fsync_dir
from mergehub.storage.catalog import ModelInfo, _spec, declared_size, now_utc
from mergehub.storage.blob_format import sha256
from mergehub.storage.codec import encode_lossless
from mergehub.storage.lossy_blobs import encode_lossy
from mergehub.storage.parallel import ordered_map
from mergehub.storage.safetensors_format import FLOAT_DTYPES


class StoreCompression:
    """The compression part of :class:`~mergehub.storage.store.Store`."""

    def compress(self, name: str, codec: str, params: dict[str, Any] | None = None, *,
                 as_name: str | None = None, progress: bool | None = None) -> ModelInfo:
        """Store a lossy-compressed copy of fine-tune ``name`` as a new entry (``as_name``,
        default ``NAME-CODEC``) with the same base, files and provenance plus the codec.

        Each float tensor that differs from the base's (and that the codec applies to:
        ``lowrank`` only factors matrices, ``bit1`` by default only the attention and MLP
        projections) is encoded with ``codec`` (see
        :data:`mergehub.storage.codecs.LOSSY`) as a delta against the base tensor; the others
        keep their lossless blobs. Export and merge read the entry like any other (decoding on
        the fly). A multi-model codec (``tall``, ``rmm``) is refused, with what stores with it.
        """
        from mergehub.storage.codecs import LOSSY, resolve_params
        from mergehub.storage.codecs.multi import MULTI, multi_only

        if codec in MULTI:
            raise StoreError(multi_only(MULTI[codec]))
        model_id, kind, base_id, fmt = self._require(name)
        if base_id is None:
            raise StoreError(f"model {name!r} has no base: a lossy codec stores the difference "
                             f"to a base (add it with {spelled('base=', '--base')})")
        try:
            full = resolve_params(codec, params or {})
        except ValueError as e:
            raise StoreError(str(e)) from None
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
        return self.compress_multi(names, "tall", params, suffix=suffix, progress=progress)

    def compress_multi(self, names: list[str], codec: str, params: dict[str, Any] | None = None,
                       *, suffix: str | None = None,
                       progress: bool | None = None) -> list[ModelInfo]:
        """Store T fine-tunes of one base with the multi-model codec ``codec`` whose layout is
        an entry per task (:mod:`mergehub.storage.codecs.multi`; ``tall``:
        :meth:`compress_tall`): ``NAME + suffix`` (default ``-CODEC``) for each of ``names``,
        whose float tensors that some task changes are task blobs of the codec that need the
        tensor's shared blobs (lossless float32); the others keep their blobs. ``params``: the
        codec's, a per-task one as one value or a list in the order of ``names``. A shared
        tensor that breaks :class:`~mergehub.storage.codecs.multi.MultiCodec`'s contract
        (float32, the tensor's size) is a ``StoreError`` and nothing is added."""
        import torch

        from mergehub.storage.lossy_blobs import encode_task_blob
        from mergehub.storage.codecs.multi import MULTI, multi_only, task_params

        multi = MULTI.get(codec)
        if multi is None or multi.layout != "entries":
            raise StoreError(f"{codec!r} is not a multi-model codec that stores an entry per "
                             "task (those: " + ", ".join(
                                 sorted(n for n, c in MULTI.items() if c.layout == "entries"))
                             + ")" + (f"; {multi_only(multi)}" if multi else ""))
        given = dict(params or {})
        suffix = f"-{codec}" if suffix is None else suffix
        if len(names) < 2 or len(set(names)) != len(names):
            raise StoreError(f"{codec} compresses two or more different fine-tunes of one base")
        rows = [self._require(n) for n in names]
        bases = {r[2] for r in rows}
        if len(bases) != 1 or None in bases:
            raise StoreError(f"{codec} needs fine-tunes of one and the same base: "
                             + ", ".join(f"{n!r} (base {self.show(n).base!r})" for n in names))
        try:
            params = task_params(multi, given, len(names))
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
            current = [m[tname][5] for m in per_model]
            ref = base_blobs.get(tname)
            dtype, shape = per_model[0][tname][3], tuple(json.loads(per_model[0][tname][4]))
            if ref is None or all(b == ref for b in current) or dtype not in FLOAT_DTYPES:
                return current
            changed = [i for i, b in enumerate(current) if b != ref]  # the others keep the base's
            torch_dtype = safetensors_format.TORCH_DTYPE[dtype]
            what = f"tensor {tname!r}"
            size = declared_size(_spec(per_model[0][tname]))
            base_raw = self._read_raw(ref, what, size)
            theta0 = torch.frombuffer(bytearray(base_raw), dtype=torch_dtype).float().reshape(shape)
            taus = [torch.frombuffer(self._read_raw(current[i], f"model {names[i]!r}, {what}",
                                                    size), dtype=torch_dtype)
                    .float().reshape(shape) - theta0 for i in changed]
            encoded = multi.encode(taus, [params[i] for i in changed])
            shared = {}
            for key, tensor in encoded.shared.items():
                if tensor.dtype != torch.float32 or tensor.numel() != math.prod(shape):
                    raise StoreError(  # what reads it takes it as the tensor's float32 numbers
                        f"codec {codec!r}, {what}: shared tensor {key!r} is "
                        f"{str(tensor.dtype).removeprefix('torch.')} of {tensor.numel()} numbers; "
                        f"a multi-model codec's must be float32 of the tensor's {math.prod(shape)}")
                raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                shared[key] = (put(encode_lossless(raw, "F32", sha256(raw))), tensor)
            out = list(current)
            for i, code in zip(changed, encoded.codes):
                out[i] = put(encode_task_blob(codec, code, params[i], shape, dtype,
                                              (ref, base_raw), shared))
                needs.extend((out[i], other) for other, _ in shared.values())
            return out

        as_names = [n + suffix for n in names]
        with self._lock(exclusive=False):
            self._check_free(as_names)
            bar = tqdm(order, desc=f"compress {codec}", unit="tensor",
                       disable=bar_disabled(progress), leave=False)
            columns = [dict(zip(order, blobs)) for blobs in zip(*ordered_map(encode, bar))]
            derived = []
            for (model_id, *_), name, as_name, p, blobs in zip(rows, names, as_names, params,
                                                               columns):
                info = self.show(name)
                derived.append((model_id, name, as_name, blobs, {
                    **info.provenance, "compressed_from": name, "codec": codec,
                    "codec_params": p, f"{codec}_tasks": names}))
            self._commit_derived(dirs, new_blobs, needs, derived)
        return [self.show(n) for n in as_names]

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
        created = now_utc()
        with self._transaction() as db:
            self._insert_blobs(db, new_blobs, needs)
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

