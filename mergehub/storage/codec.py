"""The lossless tensor codec, ``lossless``: what most blobs of the store are (the blob format
itself is :mod:`mergehub.storage.blob_format`).

The ``lossless`` codec (sizes below measured by ``benchmarks/bench_store.py`` on synthetic
N(0, 0.02) bf16 weights and a fine-tune perturbed by 5% of each tensor's std; see
``benchmarks/RESULTS.md``):

* without a reference: for floats (f16, bf16, f32, f64) the exponent bits of every value go to
  byte planes of their own and sign + mantissa to others (``exp``); other dtypes are split into
  byte planes (``planes``); then each plane is zstd-compressed (level 1) in a frame of its own.
  Exponents of trained weights are low-entropy; sign and mantissa bits are close to random, so
  grouping like with like is what lets zstd compress (bf16 weights: ~0.68 of raw);
* against a reference tensor of the same size (a fine-tune's base): the integer difference of
  the bit patterns, zig-zag coded so small changes either way are small numbers, in byte planes,
  then zstd (``delta``). Unchanged values are zeros and a small change touches only the low
  bytes. This beat XOR of the bit patterns (0.46 vs 0.51 of raw on a bf16 fine-tune);
* a payload that would not shrink is stored as is (``none``).

Two versions of the ``lossless`` payload (the header's ``version``) are read:

* version 2, written since issue 12: the decoded bytes are cut into chunks of
  ``params["chunk"]`` bytes (:data:`CHUNK_BYTES`, 16 MiB; the last chunk shorter), each coded on
  its own: ``u32`` frame count k, k ``u64`` frame sizes, then k zstd frames, one per byte plane
  of the chunk as above; k = 0 means the chunk's bytes follow as they are (it would not shrink;
  ``none`` is a blob whose every chunk is stored so). A tensor of any size is then hashed, coded,
  written, read and decoded a chunk at a time, and peak memory is a few chunks rather than a
  few copies of the tensor (``benchmarks/bench_memory.py``). A chunk of 16 MiB is 128 zstd
  blocks, so chunking costs next to nothing: a 64 MiB N(0, 0.02) bf16 tensor takes 0.67988 of
  raw in both versions (0.45582 vs 0.45581 for a fine-tune's delta);
* version 1, written before: one zstd frame per plane over the whole tensor, or the bytes as
  they are (``none``). Still read, and a chunk at a time too: the planes' frames are
  decompressed as streams, in step.

Decoding is bounded by the size the blob must decode to, so a damaged or hostile blob (a
pulled one is untrusted until its decoded sha256 matches) cannot make a reader allocate more
than that: the store first checks the header's ``nbytes`` against the size the catalog gives the
tensor (dtype x shape); then every zstd frame must declare, in its frame header, exactly the
size of its plane, checked before it is decompressed (zstd's ``max_output_size`` alone does not
bound a frame that declares its size); the frame count must be the transform's plane count; a
chunk is at most :data:`MAX_CHUNK_BYTES` and a compressed frame at most zstd's bound for its
plane; a streamed frame's window is limited; sizes pointing past the payload are refused before
anything is read. The lossy codecs (:mod:`mergehub.storage.codecs`) check their payload sizes
against the tensor's shape the same way.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import zstandard

from mergehub.storage.blob_format import (
    BlobHeader, Buffer, Payload, drain, is_count, pack_blob, rechunk)
from mergehub.storage.frames import BlobFormatError, inflate, zstd_bound
from mergehub.storage.safetensors_format import DTYPE_WIDTH

if sys.byteorder != "little":  # safetensors data is little-endian; the bit tricks assume it
    raise ImportError("mergehub's storage codecs require a little-endian machine")

ZSTD_LEVEL = 1  # measured: level 1 compresses bf16 planes better than 3 and 9, and fastest
#: decoded bytes per chunk of a version-2 lossless blob (a multiple of every dtype's width);
#: also the piece size in which version-1 blobs are decoded and tensors are hashed
CHUNK_BYTES = 16 << 20
#: the largest chunk a blob header may declare: bounds what decoding one chunk allocates
MAX_CHUNK_BYTES = 256 << 20
#: zstd window limit for version-1 planes decompressed as streams (level-1 frames use 512 KiB)
_MAX_WINDOW = 8 << 20
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
#: (exponent bits, mantissa bits) of the IEEE-style float dtypes the ``exp`` transform splits.
_FLOAT_BITS = {"F16": (5, 10), "BF16": (8, 7), "F32": (8, 23), "F64": (11, 52)}
#: values decoded at a time: a block's planes, values and temporaries stay in the CPU's cache
#: through the dozen passes a value takes (a 16 MiB chunk decoded whole streams each pass
#: through memory: measured 1.7x slower for float32 deltas)
_BLOCK = 32768


# --- byte-level transforms ------------------------------------------------------------------

def _planes(x: np.ndarray, keep: int | None = None) -> list[bytes]:
    """Byte planes of an unsigned array: all first bytes, all second bytes, ... (``keep`` first)."""
    w = x.dtype.itemsize
    if w == 1:
        return [x.tobytes()]
    cols = x.view(np.uint8).reshape(-1, w)
    return [np.ascontiguousarray(cols[:, i]).tobytes() for i in range(keep or w)]


def _unplanes(planes: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_planes`: ``out`` (unsigned, returned) set to the values whose first
    byte planes are ``planes`` (uint8 arrays of ``len(out)``; the missing ones are zero).
    Assembled with shifts and ors on whole values, not byte by byte through a strided copy
    (several times faster)."""
    np.copyto(out, planes[-1], casting="unsafe")
    for plane in reversed(planes[:-1]):
        out <<= out.dtype.type(8)
        out |= plane
    return out


def _exp_split(x: np.ndarray, e: int, m: int) -> list[bytes]:
    """Byte planes of the exponents, then byte planes of (sign, mantissa), of a float array."""
    t = x.dtype.type
    exp = (x >> t(m)) & t((1 << e) - 1)
    rest = ((x >> t(8 * x.dtype.itemsize - 1)) << t(m)) | (x & t((1 << m) - 1))
    return _planes(exp, keep=-(-e // 8)) + _planes(rest, keep=-(-(m + 1) // 8))


def _exp_join(planes: list[np.ndarray], out: np.ndarray, e: int, m: int) -> np.ndarray:
    """Inverse of :func:`_exp_split`, into ``out`` (returned; ``planes`` as
    :func:`_unplanes` takes them).

    For an 8-bit exponent under a mantissa of 8k - 1 bits (bfloat16, float32), the value's
    bytes are the (sign, mantissa) planes but the last, then two bytes that mix the last
    (sign, mantissa) plane with the exponent's: computed on those byte planes alone, then
    interleaved once (a third of the passes over whole values)."""
    if e == 8 and m % 8 == 7:
        exp, top = planes[0], planes[-1]  # top: the sign bit, then the mantissa's top 7
        low = top & np.uint8(0x7F)
        low |= exp << np.uint8(7)
        high = top & np.uint8(0x80)
        high |= exp >> np.uint8(1)
        return _unplanes([*planes[1:-1], low, high], out)
    t = out.dtype.type
    split = -(-e // 8)
    exp = _unplanes(planes[:split], np.empty_like(out))
    rest = _unplanes(planes[split:], out)
    sign = rest >> t(m)
    sign <<= t(8 * out.itemsize - 1)
    exp <<= t(m)
    sign |= exp
    rest &= t((1 << m) - 1)
    rest |= sign
    return rest


def _zigzag_delta(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    s = (x - ref).view(_INT[x.dtype.itemsize])  # wraps: exact for any bit patterns
    return ((s << 1) ^ (s >> (8 * x.dtype.itemsize - 1))).view(x.dtype)


def _unzigzag_delta(z: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_zigzag_delta`, computed in ``z`` (which it returns)."""
    t = z.dtype.type
    sign = z & t(1)
    signed = sign.view(_INT[z.dtype.itemsize])
    np.negative(signed, out=signed)  # all ones where the difference is negative
    z >>= t(1)
    z ^= sign
    z += ref  # wraps, as the difference did
    return z


def _width(dtype: str, nbytes: int) -> int:
    w = DTYPE_WIDTH.get(dtype, 1)
    return w if nbytes % w == 0 else 1


def _plane_count(transform: str, w: int, dtype: str) -> int:
    """How many byte planes (zstd frames) a chunk of this transform has."""
    if transform == "exp":
        e, m = _FLOAT_BITS[dtype]
        return -(-e // 8) + -(-(m + 1) // 8)
    return w


def _compress_planes(planes: list[bytes]) -> bytes:
    """One zstd frame per plane, so each gets entropy tables of its own.

    (In one frame, a 128 KiB block that mixes a low-entropy exponent plane with a near-random
    mantissa plane compresses to nothing: measured 1.01x on 50k fp16 weights vs 0.88x.)
    """
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    frames = [compressor.compress(p) for p in planes]
    return struct.pack(f"<I{len(frames)}Q", len(frames), *map(len, frames)) + b"".join(frames)


def _join(transform: str, planes: list[Buffer], w: int, n: int, dtype: str,
          ref: Buffer | None, into: memoryview | None = None) -> memoryview:
    """The ``n`` values of width ``w`` whose byte planes are ``planes`` (inverse of the
    transform), decoded :data:`_BLOCK` values at a time, into ``into`` (``n * w`` writable
    bytes) or a new buffer."""
    bytes_ = [np.frombuffer(p, np.uint8, n) for p in planes]
    refs = np.frombuffer(ref, _UINT[w], n) if transform == "delta" else None
    out = np.frombuffer(new_buffer(n * w) if into is None else into, _UINT[w], n)
    for start in range(0, n, _BLOCK):
        part, block = [p[start:start + _BLOCK] for p in bytes_], out[start:start + _BLOCK]
        if transform == "exp":
            _exp_join(part, block, *_FLOAT_BITS[dtype])
        else:
            _unplanes(part, block)
            if refs is not None:
                _unzigzag_delta(block, refs[start:start + _BLOCK])
    return memoryview(out).cast("B")


def new_buffer(nbytes: int) -> bytearray:
    """A new buffer for ``nbytes`` decoded bytes (zeros until written).

    A ``bytearray``, not a numpy array: numpy asks the kernel to back arrays of 4 MiB and
    more with transparent huge pages, and where the kernel's huge-page defrag setting is
    ``madvise`` (a common default) the first write to such memory can wait while the kernel
    compacts memory to make a huge page. Measured on the first merge of store entries in a
    process (`benchmarks/RESULTS.md`, issue 15): 1.27-1.74 s with numpy's arrays, a steady
    0.75-0.86 s with these. A bytearray comes from malloc's heap, where ``hub``'s settings
    (:func:`mergehub.host_memory.keep_freed_memory`) reuse freed memory; zeroing it costs a
    pass at memory speed.
    """
    return bytearray(nbytes)


def _stored(piece: Buffer, into: memoryview | None) -> Buffer:
    """A chunk stored as is: ``piece``, or copied into ``into`` when the caller gave a place."""
    if into is None:
        return piece
    into[:] = piece
    return into


# --- the lossless codec ---------------------------------------------------------------------

def lossless_header(dtype: str, nbytes: int, raw_sha256: str,
                    ref_id: str | None = None) -> BlobHeader:
    """The header of a (version 2, chunked) lossless blob of ``nbytes`` bytes of ``dtype``,
    a delta against blob ``ref_id`` (a tensor of the same size) when given."""
    w = _width(dtype, nbytes)
    if ref_id is not None:
        transform = "delta"
    elif dtype in _FLOAT_BITS and w == DTYPE_WIDTH[dtype]:
        transform = "exp"
    else:
        transform = "planes"
    return BlobHeader("lossless", dtype, nbytes, raw_sha256, ref_id,
                      {"transform": transform, "width": w, "chunk": CHUNK_BYTES}, version=2)


def _lossless_params(header: BlobHeader) -> tuple[str, int, int]:
    """(transform, width, chunk) of a lossless header, checked to fit its ``nbytes``; the chunk
    of a version-1 blob is the piece size it is decoded in."""
    p = header.params
    transform, w = p.get("transform"), p.get("width")
    if header.version not in (1, 2):
        raise BlobFormatError(f"unknown codec 'lossless' version {header.version}")
    if (transform not in ("none", "planes", "exp", "delta") or w not in _UINT
            or header.nbytes % w):
        raise BlobFormatError(f"lossless transform {transform!r} of width {w!r} does not fit "
                              f"{header.nbytes} bytes")
    if transform == "exp" and (header.dtype not in _FLOAT_BITS or DTYPE_WIDTH[header.dtype] != w):
        raise BlobFormatError(f"transform exp does not fit dtype {header.dtype}")
    if transform == "delta" and not header.ref:
        raise BlobFormatError("a delta blob without a reference")
    chunk = p.get("chunk") if header.version == 2 else CHUNK_BYTES
    if not (is_count(chunk) and 0 < chunk <= MAX_CHUNK_BYTES and chunk % w == 0):
        raise BlobFormatError(f"bad chunk size {chunk!r}")
    return transform, w, chunk


def _encode_chunk(raw: Buffer, transform: str, w: int, dtype: str,
                  ref: Buffer | None) -> bytes:
    """One chunk as version 2 stores it: its planes' zstd frames behind their count and sizes,
    or (count 0) its bytes as they are when that is not larger."""
    x = np.frombuffer(raw, _UINT[w])
    if transform == "delta":
        body = _planes(_zigzag_delta(x, np.frombuffer(ref, _UINT[w])))
    elif transform == "exp":
        body = _exp_split(x, *_FLOAT_BITS[dtype])
    elif transform == "planes":
        body = _planes(x)
    else:
        body = None
    coded = _compress_planes(body) if body is not None else None
    if coded is None or len(coded) >= 4 + len(raw):
        return struct.pack("<I", 0) + bytes(raw)
    return coded


def encode_lossless_payload(header: BlobHeader, raw: Iterable[Buffer],
                            ref: Iterable[Buffer] | None = None) -> Iterator[bytes]:
    """The payload of a version-2 lossless blob with ``header``, a chunk at a time.

    Args:
        header: from :func:`lossless_header`.
        raw: the tensor's ``header.nbytes`` bytes, in pieces of any size.
        ref: for a delta header, the reference tensor's bytes in pieces of any size.
    Both are read a chunk at a time and run to their end (more or fewer bytes than
    ``header.nbytes`` is a :class:`BlobFormatError`).
    """
    transform, w, chunk = _lossless_params(header)
    if transform == "delta" and ref is None:
        raise BlobFormatError("a delta blob encoded without its reference")
    refs = rechunk(ref, chunk, header.nbytes) if transform == "delta" else None
    for piece in rechunk(raw, chunk, header.nbytes):
        yield _encode_chunk(piece, transform, w, header.dtype, next(refs) if refs else None)
    drain(refs)


def encode_lossless(raw: Buffer, dtype: str, raw_sha256: str,
                    ref: tuple[str, Buffer] | None = None) -> bytes:
    """Encode a tensor's raw bytes losslessly into a (version 2) blob, in memory.

    Args:
        raw: the tensor's bytes as in the safetensors file.
        dtype: its safetensors dtype (chooses the element width and the transform).
        raw_sha256: ``sha256(raw)``, recorded so decoding can be verified end to end.
        ref: ``(blob id, raw bytes)`` of a same-sized reference tensor (the base's) to store a
            delta against, or ``None``.

    A blob none of whose chunks shrinks is stored as ``none``, without its reference.
    """
    nbytes = len(memoryview(raw).cast("B"))
    use_ref = ref is not None and len(memoryview(ref[1]).cast("B")) == nbytes
    header = lossless_header(dtype, nbytes, raw_sha256, ref[0] if use_ref else None)
    chunks = list(encode_lossless_payload(header, [raw], [ref[1]] if use_ref else None))
    if all(c[:4] == b"\0\0\0\0" for c in chunks):
        header = BlobHeader("lossless", dtype, nbytes, raw_sha256, None,
                            {**header.params, "transform": "none"}, version=2)
    return pack_blob(header, b"".join(chunks))


def _v2_layout(header: BlobHeader, payload: Payload, transform: str, w: int,
               chunk: int) -> Iterator[tuple[int, int, tuple[int, ...]]]:
    """The chunks of a version-2 payload, read from their frame tables and checked without
    decompressing anything: per chunk its decoded size, where its bytes (or frames) start and
    its zstd frames' sizes (none: stored as is). Every chunk has the transform's plane count of
    frames, each within zstd's bound for its plane, and the chunks end where the payload does."""
    planes = _plane_count(transform, w, header.dtype)
    pos = 0
    for start in range(0, header.nbytes, chunk):
        size = min(chunk, header.nbytes - start)
        (k,) = struct.unpack("<I", payload.read(pos, 4))
        pos += 4
        if k == 0:
            yield size, pos, ()
            pos += size
            continue
        if transform == "none" or k != planes:
            raise BlobFormatError(f"chunk at byte {start} has {k} zstd frames; transform "
                                  f"{transform} has {planes if transform != 'none' else 0}")
        sizes = struct.unpack(f"<{k}Q", payload.read(pos, 8 * k))
        pos += 8 * k
        for frame_size in sizes:
            if frame_size > zstd_bound(size // w):
                raise BlobFormatError(f"a {frame_size}-byte zstd frame for a {size // w}-byte "
                                      "plane")
        yield size, pos, sizes
        pos += sum(sizes)
    if pos != len(payload):
        raise BlobFormatError(f"{len(payload) - pos} bytes after the last chunk")


def _decode_v2(header: BlobHeader, payload: Payload, refs: Iterator[memoryview] | None,
               transform: str, w: int, chunk: int,
               into: memoryview | None) -> Iterator[Buffer]:
    start = 0
    for size, pos, sizes in _v2_layout(header, payload, transform, w, chunk):
        ref = next(refs) if refs is not None else None
        dest = None if into is None else into[start:start + size]
        start += size
        if not sizes:
            yield _stored(payload.read(pos, size), dest)
            continue
        n = size // w
        planes = []
        for frame_size in sizes:
            planes.append(inflate(payload.read(pos, frame_size), n))
            pos += frame_size
        yield _join(transform, planes, w, n, header.dtype, ref, dest)
    drain(refs)


def _read_exactly(reader: Any, size: int) -> bytearray:
    out = bytearray()
    while len(out) < size:
        got = reader.read(size - len(out))
        if not got:
            raise BlobFormatError("a zstd frame ends before its plane")
        out += got
    return out


def _v1_layout(header: BlobHeader, payload: Payload, transform: str,
               w: int) -> tuple[int, tuple[int, ...]]:
    """Where the zstd frames of a version-1 payload (not ``none``) start and their sizes, read
    from its frame table: the transform's plane count of frames, ending where the payload
    does."""
    planes = _plane_count(transform, w, header.dtype)
    (count,) = struct.unpack("<I", payload.read(0, 4))
    if count != planes:
        raise BlobFormatError(f"{count} zstd frames; transform {transform} has {planes}")
    sizes = struct.unpack(f"<{count}Q", payload.read(4, 8 * count))
    pos = 4 + 8 * count
    if pos + sum(sizes) != len(payload):
        raise BlobFormatError("plane sizes do not add up")
    return pos, sizes


def _decode_v1(header: BlobHeader, payload: Payload, refs: Iterator[memoryview] | None,
               transform: str, w: int, chunk: int,
               into: memoryview | None) -> Iterator[Buffer]:
    nbytes = header.nbytes

    def dest(start: int, size: int) -> memoryview | None:
        return None if into is None else into[start:start + size]

    if transform == "none":
        if len(payload) != nbytes:
            raise BlobFormatError(f"{len(payload)} bytes stored for {nbytes}")
        for start in range(0, nbytes, chunk):
            size = min(chunk, nbytes - start)
            yield _stored(payload.read(start, size), dest(start, size))
        return
    n = nbytes // w
    pos, sizes = _v1_layout(header, payload, transform, w)
    readers = []
    for frame_size in sizes:
        declared = zstandard.frame_content_size(payload.read(pos, min(frame_size, 18)))
        if declared != n:
            raise BlobFormatError(f"a zstd frame declares {declared} bytes (-1: unknown) where "
                                  f"{n} belong")
        dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
        readers.append(dctx.stream_reader(payload.stream(pos, frame_size)))
        pos += frame_size
    values = chunk // w
    for start in range(0, n, values):
        c = min(values, n - start)
        planes = [_read_exactly(r, c) for r in readers]
        yield _join(transform, planes, w, c, header.dtype,
                    next(refs) if refs is not None else None, dest(start * w, c * w))
    if any(r.read(1) for r in readers):
        raise BlobFormatError("a zstd frame holds more than its plane")
    drain(refs)


def check_lossless_layout(header: BlobHeader, payload: Buffer | Payload) -> None:
    """Check a ``lossless`` blob's payload against its header without decompressing anything
    (what an import does before it stores a shipped blob): the transform fits the dtype and
    size, every chunk (version 2) or the blob (version 1) has as many zstd frames as the
    transform has planes, and the frame sizes end where the payload does; a version-1 blob
    stored as is must be its decoded size. Raises :class:`BlobFormatError`."""
    if not isinstance(payload, Payload):
        payload = Payload(payload)
    transform, w, chunk = _lossless_params(header)
    if header.version == 2:
        for _ in _v2_layout(header, payload, transform, w, chunk):
            pass
    elif transform != "none":
        _v1_layout(header, payload, transform, w)
    elif len(payload) != header.nbytes:
        raise BlobFormatError(f"{len(payload)} bytes stored for {header.nbytes}")


def decode_lossless_chunks(header: BlobHeader, payload: Payload, ref: Iterable[Buffer] | None,
                           into: memoryview | None = None) -> Iterator[Buffer]:
    """A ``lossless`` blob's decoded bytes, a chunk at a time, not yet verified (the caller
    hashes them). ``ref`` yields the reference tensor's bytes (in pieces of any size) for a
    delta blob; it is read in step and run to its end. With ``into`` (``header.nbytes``
    writable bytes) every chunk is decoded into its place there, and the pieces are views of
    it: a whole tensor without a copy of each piece."""
    transform, w, chunk = _lossless_params(header)
    if transform == "delta" and ref is None:
        raise BlobFormatError("delta blob decoded without its reference")
    refs = rechunk(ref, chunk, header.nbytes) if transform == "delta" else None
    decode = _decode_v2 if header.version == 2 else _decode_v1
    try:
        yield from decode(header, payload, refs, transform, w, chunk, into)
    except zstandard.ZstdError as e:
        raise BlobFormatError(f"bad zstd frame: {e}") from e


def decode_lossless(header: BlobHeader, payload: Buffer | Payload,
                    ref_raw: Buffer | None) -> bytes:
    """Decode a ``lossless`` blob's payload to the tensor's raw bytes (not yet verified)."""
    if not isinstance(payload, Payload):
        payload = Payload(payload)
    out = bytearray()
    for piece in decode_lossless_chunks(header, payload,
                                        [ref_raw] if ref_raw is not None else None):
        out += piece
    return bytes(out)
