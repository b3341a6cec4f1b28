"""Byte sizes: parsing ``"5GB"``-style limits and printing sizes (decimal units, as the HF Hub)."""

from __future__ import annotations

import re

from mergehub.errors import InputError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5e9, ``"500MiB"`` -> 500 * 2**20, ``1024`` -> 1024 (HF's conventions)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise InputError(f"cannot read size {text!r}: use bytes or a number with KB/MB/GB/MiB/GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_kmb(text: str | int) -> int:
    """mergekit's size spelling (its ``--out-shard-size``): an integer, or an integer followed
    by K, M or B for thousand, million, billion (``"5B"`` -> 5e9; mergekit's writer counts
    these in bytes). Unlike :func:`parse_size`, ``B`` here is a billion, not a byte."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmMbB]?)\s*", text)
    if not m:
        raise InputError(f"cannot read size {text!r}: use an integer, or one followed by K, M "
                         "or B (thousand, million, billion), as mergekit does")
    return int(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}[m.group(2).upper()]


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as file managers and the HF Hub show)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
