"""Shipping an entry's own blobs to another store (``hub push`` / ``hub pull``): base
fingerprints, entry manifests and their checks, and importing an entry from its blob files."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mergehub import __version__
from mergehub.errors import BaseMismatchError, IntegrityError, StoreError, shown
from mergehub.progress import bar_disabled
from mergehub.storage.atomic import fsync_dir
from mergehub.storage.catalog import KINDS, ModelInfo, _NAME, now_utc
from mergehub.storage.blob_format import pack_blob, sha256, unpack_blob
from mergehub.storage.codec import check_lossless_layout
from mergehub.storage.frames import BlobFormatError
from mergehub.storage.paths import safe_relpath
from mergehub.storage.safetensors_format import DTYPE_WIDTH, TensorSpec

#: a blob id as a manifest gives it (it names a file)
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
        if dtype not in DTYPE_WIDTH:
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


class StoreShipping:
    """The push / pull part of :class:`~mergehub.storage.store.Store`."""

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
            prov = {**manifest["provenance"], **(provenance or {})}
            with self._transaction() as db:
                self._insert_blobs(db, new_blobs, needs)
                self._insert_entry(
                    db, name, kind, base, base_id, fmt, json.dumps(manifest["metrics"]),
                    json.dumps(prov), now_utc(),
                    [(p, role, mapping[b]) for p, role, b in manifest["files"]],
                    [(t, f, off, dt, json.dumps(shape), mapping[b])
                     for t, f, off, dt, shape, b in manifest["tensors"]])
        return self.show(name)

