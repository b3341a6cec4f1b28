"""Hostile and huge sizes (issue 12, items 3 and 23).

A blob is untrusted until its decoded sha256 matches (a pulled one was written by whoever owns
the repo): what decoding it may allocate is bounded by the size the catalog declares for the
tensor (dtype x shape), never by what the blob says. And a tensor of any size is added,
verified and exported a chunk at a time, so memory does not grow with it.

The fixtures are built here from the blob format (``docs/hub.md``, the module docstring of
:mod:`mergehub.storage.codec`): the decompression bomb of the issue is a version-1 lossless blob
whose header says 1 GiB and whose 4 planes are zstd frames of 1 GiB of zeros each (131 kB in
all). Whatever could blow up runs in a subprocess under an address-space limit, which also
makes the unfixed code fail safely (MemoryError) instead of taking the machine's memory.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
import zstandard

from mergehub.errors import InputError
from mergehub.hub.demo import dir_digests
from mergehub.hub.remote import BLOBS, MANIFEST, pull, push
from mergehub.storage import codec
from mergehub.storage.blob_format import BlobHeader, sha256, unpack_blob
from mergehub.storage.frames import BlobFormatError
from mergehub.storage.lossy_blobs import decode_blob
from mergehub.storage.safetensors_format import TensorSpec
from mergehub.storage.store import Store
from mergehub.storage.writer import write_model_dir
from tests.test_codec import encode_v1
from tests.hub_server import new_repo_id as _repo

GIB = 1 << 30
MIB = 1 << 20
#: address-space limit of the subprocesses: far above what they need, far below a bomb's 4+ GiB
LIMIT = 3 * GIB

_RUN = """
import atexit, re, resource, sys
peak_file, chunk, limit = sys.argv.pop(1), int(sys.argv.pop(1)), int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

def record():
    with open("/proc/self/status") as f:
        kib = re.search(r"VmHWM:\\s*(\\d+) kB", f.read()).group(1)
    with open(peak_file, "w") as f:
        f.write(kib)

atexit.register(record)
if chunk:
    import mergehub.storage.codec
    mergehub.storage.codec.CHUNK_BYTES = chunk
from mergehub.hub.cli import main
main()
"""


def hub(tmp_path: Path, *args: str, chunk: int = 0) -> tuple[subprocess.CompletedProcess, int]:
    """Run the ``hub`` CLI in a subprocess under :data:`LIMIT` of address space (and with
    ``CHUNK_BYTES = chunk`` when given); returns its result and its peak RSS in bytes (VmHWM,
    which a child does not inherit from this process)."""
    peak = tmp_path / "peak"
    peak.unlink(missing_ok=True)
    result = subprocess.run([sys.executable, "-c", _RUN, str(peak), str(chunk), str(LIMIT), *args],
                            capture_output=True, text=True)
    return result, int(peak.read_text()) * 1024 if peak.exists() else -1


def zero_frame(size: int) -> bytes:
    """A zstd frame of ``size`` zero bytes that declares its size in its frame header, built
    without holding the zeros (1 GiB: 32 kB, in about 0.3 s)."""
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    zeros = bytes(4 * MIB)
    out = [cobj.compress(zeros[:min(len(zeros), size - done)])
           for done in range(0, size, len(zeros))]
    return b"".join(out) + cobj.flush()


def bomb_blob(dtype: str, nbytes: int, raw_sha256: str, planes: int = 4,
              frame_size: int = GIB) -> bytes:
    """A version-1 lossless blob whose header says ``nbytes`` of ``dtype`` and whose ``planes``
    byte planes are each a zstd frame of ``frame_size`` zeros: the issue's bomb by default."""
    header = {"codec": "lossless", "version": 1, "dtype": dtype, "nbytes": nbytes,
              "sha256": raw_sha256, "ref": None,
              "params": {"transform": "planes", "width": planes}}
    head = json.dumps(header).encode()
    frame = zero_frame(frame_size)
    payload = struct.pack(f"<I{planes}Q", planes, *[len(frame)] * planes) + frame * planes
    return b"MHB1" + struct.pack("<I", len(head)) + head + payload


def _put_blob(store: Store, data: bytes) -> str:
    """Put the blob ``data`` in the store, file and catalog row (as a pull would); its id."""
    blob_id = sha256(data)
    path = store.blob_path(blob_id)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    header = unpack_blob(data)[0]
    store._db.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?, ?)",
                      (blob_id, header.codec, header.ref, header.sha256, header.nbytes, len(data)))
    return blob_id


def _swap_blob(store: Store, tensor: str, data: bytes) -> str:
    """Make every entry's ``tensor`` use a new blob holding ``data`` (as a damaged or edited
    store would); returns its id."""
    blob_id = _put_blob(store, data)
    store._db.execute("UPDATE tensors SET blob = ? WHERE name = ?", (blob_id, tensor))
    return blob_id


# --- the decompression bomb -------------------------------------------------------------------

def test_the_issues_bomb_is_refused_unread(store, models, tmp_path):
    """The 131 kB blob of the issue (header: 1 GiB; 4 frames of 1 GiB) in place of a 32 KiB
    tensor: verify and export refuse it from the catalog's size, without decompressing (they
    used 8.4 GB and died), and say which tensor."""
    store.add(models["base-fp32"], "base", progress=False)
    tensor = "model.embed_tokens.weight"  # 256 x 64 float32: 64 KiB
    bomb = bomb_blob("F32", GIB, "0" * 64)
    assert len(bomb) < 140_000
    _swap_blob(store, tensor, bomb)
    store.close()
    root = str(store.root)
    result, peak = hub(tmp_path, "--store", root, "verify")
    assert result.returncode == 2, result.stderr
    assert re.search(rf"error: model 'base', '{tensor}': blob \w+ says it decodes to "
                     rf"{GIB} bytes, but the tensor \(dtype x shape\) has 65536", result.stderr)
    assert peak < 400 * MIB
    result, peak = hub(tmp_path, "--store", root, "export", "base", "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "says it decodes to" in result.stderr, result.stderr
    assert peak < 400 * MIB and not (tmp_path / "out").exists()


def test_pulled_bomb_is_refused_by_verify(hf, models, tmp_path):
    """A repo whose owner swapped one blob for a bomb of the tensor's own declared size (4 frames
    of 1 GiB of zeros where 16 KiB planes belong) and rewrote the manifest to match: the pull
    takes it (it decodes nothing), ``hub verify`` refuses it without decompressing a frame."""
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

    with Store.init(tmp_path / "a") as a:
        a.add(models["base-bf16"], "base", progress=False)
        push(a, "base", repo := _repo("bomb"), fmt="mergehub", progress=False)
    manifest = json.loads(Path(hf_hub_download(repo, MANIFEST)).read_text())
    tensor = "model.embed_tokens.weight"  # 256 x 64 bf16: 32 KiB
    row = next(t for t in manifest["tensors"] if t[0] == tensor)
    meta = dict(manifest["blobs"].pop(row[5]))
    assert meta["raw_size"] == 32768
    bomb = bomb_blob("BF16", meta["raw_size"], meta["raw_sha256"], planes=2)
    bomb_id = sha256(bomb)
    row[5] = bomb_id
    manifest["blobs"][bomb_id] = {**meta, "size": len(bomb)}
    HfApi().create_commit(repo, [
        CommitOperationAdd(f"{BLOBS}/{bomb_id}", bomb),
        CommitOperationAdd(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())],
        commit_message="swap a blob for a bomb")
    with Store.init(tmp_path / "b") as b:
        pull(b, repo, progress=False)
    result, peak = hub(tmp_path, "--store", str(tmp_path / "b"), "verify")
    assert result.returncode == 2, result.stderr
    assert re.search(rf"error: model 'base', '{tensor}': blob \w+ is corrupt: it cannot be decoded \(a "
                     rf"zstd frame declares {GIB} bytes .* where 16384 belong", result.stderr)
    assert peak < 400 * MIB


def _bounded(decode) -> tuple[Exception, int]:
    """Run ``decode()``, which must raise; returns the error and the peak of Python-level
    allocations meanwhile (zstd's output buffers are Python bytes: counted)."""
    tracemalloc.start()
    try:
        with pytest.raises((BlobFormatError, ValueError)) as err:
            decode()
        return err.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_chunk_frames_declaring_more_than_their_plane_are_not_decompressed(monkeypatch):
    """A version-2 chunk whose zstd frame declares 64 MiB where a 2 KiB plane belongs, a chunk
    with more frames than its transform has planes, and a frame larger than zstd's bound:
    refused before anything is decompressed or read."""
    monkeypatch.setattr(codec, "CHUNK_BYTES", 4096)
    raw = bytes(8192)
    header, payload = unpack_blob(codec.encode_lossless(raw, "BF16", sha256(raw)))
    frame = zero_frame(64 * MIB)
    chunk = struct.pack("<I2Q", 2, len(frame), len(frame)) + frame + frame
    error, peak = _bounded(lambda: decode_blob(header, chunk + chunk, None))
    assert "declares 67108864 bytes" in str(error) and peak < 4 * MIB
    three = struct.pack("<I3Q", 3, 1, 1, 1) + b"xyz"
    error, _ = _bounded(lambda: decode_blob(header, three + three, None))
    assert "3 zstd frames; transform exp has 2" in str(error)
    huge = struct.pack("<I2Q", 2, 1 << 40, 1 << 40)
    error, peak = _bounded(lambda: decode_blob(header, huge, None))
    assert "zstd frame for a 2048-byte plane" in str(error) and peak < 4 * MIB


def test_lossy_codec_frames_are_bounded_by_the_tensor():
    """compeft's positions and tall's mask are zstd frames too: a frame declaring more than
    the tensor's bitmap is refused before it is decompressed; bit1 and lowrank payloads must
    be the size the shape makes."""
    from mergehub.storage.codecs import LOSSY

    base = torch.zeros(64, 64)
    frame = zero_frame(64 * MIB)
    compeft = {"shape": [64, 64], "density": 0.1, "alpha": 1.0, "sigma": 1.0, "kept": 8,
               "layout": "bitmap", "positions_bytes": len(frame)}
    error, peak = _bounded(lambda: LOSSY["compeft"].decode(memoryview(frame + b"\0"), compeft,
                                                           base, {}))
    assert "declares 67108864 bytes" in str(error) and peak < 4 * MIB
    tall = {"shape": [64, 64], "lambda": 0.4, "alpha": 1.0, "kept": 1, "needs": {"mtl": "x"}}
    error, peak = _bounded(lambda: LOSSY["tall"].decode(memoryview(frame), tall, base,
                                                        {"mtl": base}))
    assert "declares 67108864 bytes" in str(error) and peak < 4 * MIB
    bit1 = {"granularity": "row", "shape": [64, 64], "rows": 64}
    error, _ = _bounded(lambda: LOSSY["bit1"].decode(memoryview(bytes(10)), bit1, base, {}))
    assert "does not fit 64 rows" in str(error)
    lowrank = {"shape": [64, 64], "rank": 1 << 40}
    error, _ = _bounded(lambda: LOSSY["lowrank"].decode(memoryview(bytes(10)), lowrank, base, {}))
    assert "does not fit rank" in str(error)
    # a lossy header whose shape is not its size is refused before the codec runs
    header = BlobHeader("bit1", "F32", 16, "0" * 64, "r" * 64, {**bit1, "shape": [1 << 20, 1 << 20]})
    error, _ = _bounded(lambda: decode_blob(header, memoryview(b""), bytes(16)))
    assert "is not its 16 bytes" in str(error)


# --- a tensor of any size, a chunk at a time --------------------------------------------------

def _shared_tensor_model(out: Path, rows: int, cols: int, seed: int,
                         rel: float | None = None) -> Path:
    """A model of one bf16 N(0, 0.02) tensor (rows x cols) and a small one, written in blocks;
    with ``rel`` a fine-tune: the same tensor plus noise of ``rel`` of its spread."""
    specs = [TensorSpec("embed.weight", "BF16", (rows, cols)), TensorSpec("norm.weight", "BF16", (cols,))]

    def blocks(spec: TensorSpec):
        if spec.name == "norm.weight":
            return torch.ones(cols, dtype=torch.bfloat16)
        return (block(r0) for r0 in range(0, rows, 4096))

    def block(r0: int) -> torch.Tensor:
        n = min(4096, rows - r0)
        w = torch.randn(n, cols, generator=torch.Generator().manual_seed(seed + r0)) * 0.02
        if rel is not None:
            w += torch.randn(n, cols, generator=torch.Generator().manual_seed(-r0 - 1)) * 0.02 * rel
        return w.to(torch.bfloat16)

    return write_model_dir(out, specs, blocks, side_files={"config.json": b"{}"}, progress=False)


def test_chunked_store_round_trip(store, models, tmp_path, monkeypatch):
    """With a 4 KiB chunk every tiny-Llama matrix spans several chunks: bases and fine-tunes
    (deltas whose reference is read in step) export bit for bit, load equal, verify clean, and
    their blobs are version-2 blobs of several chunks."""
    monkeypatch.setattr(codec, "CHUNK_BYTES", 4096)
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "ft", base="base", progress=False)
    store.add(models["sharded-fp32"], "base32", progress=False)
    for name, src in (("base", "base-bf16"), ("ft", "ft-mlp"), ("base32", "sharded-fp32")):
        assert dir_digests(store.export(name, tmp_path / name, progress=False)) == \
            dir_digests(models[src])
    assert store.verify(progress=False).ok
    ft = store.open("ft")
    tensor = "model.layers.0.mlp.up_proj.weight"  # 128 x 64 bf16: 4 chunks, a delta
    blob = ft._tensors[tensor][1]
    header, _ = unpack_blob(store._blob_path(blob).read_bytes())
    assert (header.version, header.params["transform"], header.nbytes) == (2, "delta", 16384)
    pieces = list(ft.iter_bytes(tensor))
    assert [len(p) for p in pieces] == [4096] * 4
    from safetensors.torch import load_file
    want = load_file(models["ft-mlp"] / "model.safetensors")[tensor]
    assert torch.equal(ft.load(tensor), want)
    assert b"".join(pieces) == want.view(torch.uint8).numpy().tobytes()


def test_version_1_blobs_in_a_store_still_export(store, models, tmp_path, monkeypatch):
    """A store whose blobs were written before chunking (version 1, here by the encoder of that
    time) reads, verifies and exports bit for bit, decoded a piece at a time."""
    monkeypatch.setattr(codec, "CHUNK_BYTES", 4096)
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "ft", base="base", progress=False)
    old = {}  # new blob id -> version-1 blob id, base blobs first (deltas reference them)
    rows = store._db.execute("SELECT id, ref FROM blobs ORDER BY ref IS NOT NULL").fetchall()
    for blob_id, ref in rows:
        header, _ = unpack_blob(store._blob_path(blob_id).read_bytes())
        raw = bytes(store._read_raw(blob_id, "test"))
        v1_ref = (old[ref], bytes(store._read_raw(ref, "test"))) if ref else None
        old[blob_id] = _put_blob(store, encode_v1(raw, header.dtype, header.sha256, v1_ref))
    with store._transaction() as db:
        for table in ("tensors", "files"):
            for blob_id, v1_id in old.items():
                db.execute(f"UPDATE {table} SET blob = ? WHERE blob = ?", (v1_id, blob_id))
        for (model_id,) in db.execute("SELECT id FROM models").fetchall():
            store._record(db, model_id)  # as the store that wrote them recorded its rows
    assert any(unpack_blob(store._blob_path(b).read_bytes())[0].params["transform"] == "delta"
               for b in old.values())
    used = {b for (b,) in store._db.execute("SELECT blob FROM tensors UNION SELECT blob FROM files")}
    assert used <= set(old.values())
    assert store.verify(progress=False).ok
    for name, src in (("base", "base-bf16"), ("ft", "ft-mlp")):
        assert dir_digests(store.export(name, tmp_path / name, progress=False)) == \
            dir_digests(models[src])


def test_a_file_changed_while_added_is_refused(store, tmp_path, monkeypatch):
    """A tensor larger than a chunk is read twice (hashed, then coded): bytes that change in
    between are refused before the blob is stored, and nothing is added."""
    monkeypatch.setattr(codec, "CHUNK_BYTES", 4096)
    src = _shared_tensor_model(tmp_path / "m", 64, 128, 0)
    from mergehub.storage.checkpoint import Checkpoint

    reads: dict[tuple, int] = {}
    original = Checkpoint.read_bytes

    def flaky(self, name, start=0, stop=None, into=None):
        data = original(self, name, start, stop, into)
        reads[(name, start)] = reads.get((name, start), 0) + 1
        if name == "embed.weight" and start == 4096 and reads[(name, start)] == 2:
            data[0] ^= 1  # the second read of the second chunk sees other bytes
        return data

    monkeypatch.setattr(Checkpoint, "read_bytes", flaky)
    with pytest.raises(InputError, match=r"tensor 'embed.weight': changed while it was being added"):
        store.add(src, "m", progress=False)
    assert store.ls() == [] and list((store.root / "tmp").iterdir()) == []
    assert all(unpack_blob(p.read_bytes())[0].nbytes != 64 * 128 * 2  # other files may be in
               for p in store._blob_files())                          # (gc removes them)
    monkeypatch.setattr(Checkpoint, "read_bytes", original)
    store.add(src, "m", progress=False)
    assert dir_digests(store.export("m", tmp_path / "out", progress=False)) == dir_digests(src)


def test_memory_stays_a_few_chunks_whatever_the_tensor(tmp_path):
    """hub add / add --base / verify / export of a model with one 192 MiB tensor, in
    subprocesses with 4 MiB chunks: each peaks less than a third of the tensor above the
    same command on a 256 KiB tensor (the whole-tensor code needed 4.5 to 6.7 times the
    tensor: benchmarks/RESULTS.md)."""
    cols = 2048
    size = 49152 * cols * 2  # 192 MiB of bf16
    peaks = {}
    for rows in (64, 49152):
        work = tmp_path / str(rows)
        base = _shared_tensor_model(work / "base", rows, cols, 0)
        ft = _shared_tensor_model(work / "ft", rows, cols, 0, rel=0.05)
        store = str(work / "store")
        steps = {"add": ["add", str(base), "-n", "base"],
                 "add --base": ["add", str(ft), "-n", "ft", "-b", "base"],
                 "verify": ["verify"], "export": ["export", "ft", "-o", str(work / "out")]}
        for step, args in steps.items():
            result, peaks[rows, step] = hub(work, "--store", store, *args, chunk=4 * MIB)
            assert result.returncode == 0, result.stderr
        assert dir_digests(work / "out") == dir_digests(ft)
    for step in steps:
        growth = peaks[49152, step] - peaks[64, step]
        assert growth < size // 3, f"hub {step}: peak RSS {growth / MIB:.0f} MiB above the small model's"


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_merge_reads_large_store_tensors_a_chunk_at_a_time(store, models, tmp_path, monkeypatch,
                                                           method):
    """Store inputs above STREAM_BYTES are decoded in order a chunk at a time for each pass
    over their rows (TIES makes a statistics pass first, so each tensor is read twice): the
    merge equals the same merge of the model dirs, bit for bit, and reads no tensor whole."""
    import mergehub
    from mergehub.merge import inputs, tensors
    from mergehub.storage.store import StoredModel

    monkeypatch.setattr(codec, "CHUNK_BYTES", 4096)
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "mlp", base="base", progress=False)
    store.add(models["ft-attn"], "attn", base="base", progress=False)
    monkeypatch.setattr(inputs, "STREAM_BYTES", 0)
    monkeypatch.setattr(tensors, "CHUNK_ELEMENTS", {"cpu": 1000})  # several row ranges a tensor
    monkeypatch.setattr(StoredModel, "load", None)  # no whole tensor is read
    params = "{weight: 1.0, density: 0.5}" if method == "ties" else "{weight: 0.7}"

    def recipe(base: object, mlp: object, attn: object) -> str:
        return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
                f"  - {{model: {mlp}, parameters: {params}}}\n"
                f"  - {{model: {attn}, parameters: {params}}}\n")

    mergehub.merge(recipe("base", "mlp", "attn"), out=tmp_path / "from-store", store=store,
                   progress=False)
    mergehub.merge(recipe(models["base-bf16"], models["ft-mlp"], models["ft-attn"]),
                   out=tmp_path / "from-files", progress=False)
    assert dir_digests(tmp_path / "from-store") == dir_digests(tmp_path / "from-files")


def test_merge_of_a_streamed_store_tensor_checks_its_bytes(store, models, tmp_path, monkeypatch):
    """A streamed store input whose blob decodes to other bytes than recorded fails the merge
    at the end of that tensor (its checksum), naming it, and leaves no output."""
    from dataclasses import replace

    import mergehub
    from mergehub.errors import IntegrityError
    from mergehub.merge import inputs

    monkeypatch.setattr(codec, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(inputs, "STREAM_BYTES", 0)
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "mlp", base="base", progress=False)
    tensor = "model.layers.1.mlp.down_proj.weight"
    mlp = store.open("mlp")
    header, payload = unpack_blob(store.blob_path(mlp._tensors[tensor][1]).read_bytes())
    forged = codec.pack_blob(replace(header, sha256="0" * 64), bytes(payload))
    blob = _put_blob(store, forged)
    store._db.execute("UPDATE tensors SET blob = ? WHERE name = ? AND model_id = "
                      "(SELECT id FROM models WHERE name = 'mlp')", (blob, tensor))
    text = "merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: mlp}]\n"
    with pytest.raises(IntegrityError, match=rf"model 'mlp', tensor '{tensor}': blob \w+ "
                                             "is corrupt: it decodes to bytes whose sha256 "
                                             "does not match"):
        mergehub.merge(text, out=tmp_path / "out", store=store, progress=False)
    assert not (tmp_path / "out").exists()
