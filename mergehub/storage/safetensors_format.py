"""The safetensors file layout, read and written without loading tensor data.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header + a data section in
which every tensor occupies ``data_offsets = [begin, end)``. We parse the header ourselves
(rather than through ``safetensors.safe_open``) because the store needs the exact header bytes
and byte offsets to reproduce files bit for bit, and the streaming writer needs to emit a header
before the tensors exist. Tensor *values* are still loaded with the ``safetensors`` library.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mergehub.errors import InputError, shown
from mergehub.safejson import parse_json

#: Bytes per element of each safetensors dtype mergehub reads and stores. Any other dtype
#: string in a header is refused (a made-up one, or the sub-byte F4/F6 formats, whose sizes
#: this table cannot express): the file could be stored but never checked or written back.
DTYPE_WIDTH: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

def _torch_tables() -> tuple[dict[str, Any], dict[Any, str]]:
    import torch

    names = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "F16": "float16",
             "BF16": "bfloat16", "I32": "int32", "F32": "float32", "I64": "int64",
             "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
             "U16": "uint16", "U32": "uint32", "U64": "uint64"}
    table = {k: getattr(torch, v) for k, v in names.items() if hasattr(torch, v)}
    return table, {v: k for k, v in table.items()}


def __getattr__(name: str) -> Any:
    """``TORCH_DTYPE`` (safetensors name -> torch dtype) and ``SAFETENSORS_DTYPE`` (the
    inverse), built on first use so that reading headers never imports torch (~1 s)."""
    if name in ("TORCH_DTYPE", "SAFETENSORS_DTYPE"):
        table, inverse = _torch_tables()
        globals().update(TORCH_DTYPE=table, SAFETENSORS_DTYPE=inverse)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: the float dtypes merge methods and lossy codecs work on
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (safetensors spelling, e.g. ``"BF16"``) and shape of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes (requires a dtype with a known width)."""
        return math.prod(self.shape) * DTYPE_WIDTH[self.dtype]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its spec and byte range in the data section."""

    spec: TensorSpec
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed safetensors header.

    ``raw`` is the header exactly as stored (including the 8-byte length prefix and padding), so
    that writing ``raw`` followed by each tensor's bytes in offset order reproduces the file.
    """

    raw: bytes
    entries: dict[str, TensorEntry]
    metadata: dict[str, str] | None

    @property
    def data_start(self) -> int:
        return len(self.raw)

    @property
    def data_size(self) -> int:
        return max((e.end for e in self.entries.values()), default=0)


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of the safetensors file at ``path``.

    Raises :class:`InputError` naming the file (and tensor) when the file is not a valid
    safetensors file: truncated, header not JSON, unknown fields, offsets that overlap, leave
    gaps, disagree with shape and dtype, or run past the end of the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            return parse_header(str(path), size, read)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e


def parse_header(where: str, size: int, read: Callable[[int, int], bytes]) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file of ``size`` bytes whose bytes
    ``read(offset, n)`` returns (a local file, or a file on a server read by range requests),
    as :func:`read_header` does; errors name ``where``."""
    prefix = read(0, 8)
    if len(prefix) < 8:
        raise InputError(f"{where}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", prefix)
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise InputError(
            f"{where}: not a safetensors file (header length {n} does not fit a "
            f"{size}-byte file)")
    header_bytes = read(8, n)
    if len(header_bytes) < n:
        raise InputError(f"{where}: not a safetensors file (the header ends after "
                         f"{len(header_bytes)} of {n} bytes)")
    obj = parse_json(header_bytes, f"{where}: not a safetensors file: header")
    if not isinstance(obj, dict):
        raise InputError(f"{where}: not a safetensors file (header is not a JSON object)")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (
            isinstance(metadata, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise InputError(f"{where}: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        entries[name] = _parse_entry(where, name, info, data_size)
    _check_contiguous(where, entries, data_size)
    return SafetensorsHeader(raw=prefix + header_bytes, entries=entries, metadata=metadata)


def _parse_entry(path: str, name: str, info: object, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {shown(name)}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{where}: header entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_WIDTH:
        raise InputError(f"{where}: unknown dtype {shown(dtype)} (mergehub reads "
                         f"{', '.join(DTYPE_WIDTH)})")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise InputError(f"{where}: shape {shown(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise InputError(f"{where}: bad data_offsets {shown(offsets)}")
    begin, end = offsets
    if end > data_size:
        raise InputError(f"{where}: data ends at byte {end} but the file has only "
                         f"{data_size} data bytes (truncated file?)")
    spec = TensorSpec(name, dtype, tuple(shape))
    if spec.nbytes != end - begin:
        raise InputError(f"{where}: {dtype} shape {tuple(shape)} needs {spec.nbytes} bytes "
                         f"but data_offsets span {end - begin}")
    return TensorEntry(spec, begin, end)


def _check_contiguous(path: str, entries: dict[str, TensorEntry], data_size: int) -> None:
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else "leaves a gap before it"
            raise InputError(f"{path}: tensor {e.spec.name!r} {what} (offset {e.begin}, "
                             f"expected {pos})")
        pos = e.end
    if pos != data_size:
        raise InputError(f"{path}: {data_size - pos} trailing bytes after the last tensor")


def build_header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """Serialize a header for ``specs`` laid out contiguously in the given order.

    Returns the length prefix plus JSON padded with spaces to a multiple of 8 bytes, the
    alignment the safetensors library uses.
    """
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = metadata
    pos = 0
    for s in specs:
        obj[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    text = json.dumps(obj, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def read_range(f: BinaryIO, offset: int, size: int,
               into: memoryview | None = None) -> bytearray | memoryview:
    """Read exactly ``size`` bytes at ``offset`` into a new writable buffer (one copy from the
    page cache; ``torch.frombuffer`` can use it as is), or into ``into`` (``size`` bytes, e.g.
    pinned memory for a fast host-to-GPU copy). Raises OSError on a short read."""
    buf = bytearray(size) if into is None else into
    view = memoryview(buf).cast("B")
    if len(view) != size:
        raise ValueError(f"read_range: buffer of {len(view)} bytes for {size} bytes")
    got = 0
    while got < size:
        n = os.preadv(f.fileno(), [view[got:]], offset + got)
        if n == 0:
            raise OSError(f"unexpected end of file at byte {offset + got}")
        got += n
    return buf
