"""Compressed task vectors as the decompress-and-apply kernel takes them, and their dense form.

Bit arrays are uint8 in ``np.packbits`` order (most significant bit first, element i in byte
i // 8), the layout the ``bit1``, ``compeft`` and ``tall`` blobs already store, so a payload's
bits go to the GPU as they are. :func:`dense` is the torch decoding: the CPU path of the codecs
and of :func:`mergehub.kernels.apply_deltas`, and the kernel's oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


@dataclass(frozen=True)
class SignDelta:
    """BitDelta: τ = +scale[row] where the bit is 1, −scale[row] where it is 0.

    ``bits``: packed, one per element of the tensor read as [rows, cols] (rows = shape[0],
    1 for a vector); ``scales``: float32 [rows], or [1] for one scale for the whole tensor.
    """

    bits: torch.Tensor
    scales: torch.Tensor


@dataclass(frozen=True)
class TernaryDelta:
    """ComPEFT: τ = ±value where ``mask`` is set (+ where ``signs`` is set), 0 elsewhere.

    ``mask`` and ``signs`` are packed bits over all elements; ``value`` is alpha·σ.
    """

    mask: torch.Tensor
    signs: torch.Tensor
    value: float


@dataclass(frozen=True)
class LowRankDelta:
    """τ = left @ right: float32 [rows, r] and [r, cols] (a truncated SVD or LoRA's B, A)."""

    left: torch.Tensor
    right: torch.Tensor


Delta = SignDelta | TernaryDelta | LowRankDelta
#: the order in which apply_deltas adds deltas of different kinds (given order within a kind)
KIND_ORDER = (SignDelta, TernaryDelta, LowRankDelta)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans [..., n] packed 8 per uint8 [..., ceil(n / 8)] along the last dimension
    (``np.packbits`` order), on their device: the inverse of :func:`unpack_bits`."""
    n = bits.shape[-1]
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, -n % 8))
    shifts = _SHIFTS.to(bits.device)
    return (padded.reshape(*bits.shape[:-1], -1, 8) << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` bits of a packed uint8 array, as bool (``np.unpackbits`` order)."""
    return _bits(packed, count).bool()


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """:func:`unpack_bits` as uint8 0 / 1."""
    shifts = _SHIFTS.to(packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:count]


def _signed(value_bits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """``torch.where(positive, v, -v)`` bit for bit, for float32 values v given by their int32
    bits (broadcast against ``positive``, uint8 0 / 1): -v is v with its sign bit flipped.
    Integer operations only: a CPU's ``where`` costs ~20x a bitwise pass."""
    flip = positive.to(torch.int32).sub_(1).bitwise_left_shift_(31)  # 0, or the sign bit
    return flip.bitwise_xor_(value_bits).view(torch.float32)


def matrix_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """A tensor's shape read as [rows, cols]: rows = shape[0] (1 for a scalar or vector)."""
    shape = tuple(shape)
    if len(shape) < 2:
        return 1, (shape[0] if shape else 1)
    return shape[0], int(torch.Size(shape[1:]).numel())


def dense(delta: Delta, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The float32 task vector a compressed delta stands for, shaped ``shape``."""
    rows, cols = matrix_shape(shape)
    if isinstance(delta, SignDelta):  # each row's scale, negated where its bit is 0
        s = delta.scales.float().reshape(-1, 1).expand(rows, 1).view(torch.int32)
        out = _signed(s, _bits(delta.bits, rows * cols).reshape(rows, cols))
    elif isinstance(delta, TernaryDelta):  # ±value where the mask's bit is 1, else +0
        n = rows * cols
        v = torch.tensor(delta.value, dtype=torch.float32, device=delta.mask.device)
        out = _signed(v.view(torch.int32), _bits(delta.signs, n))
        keep = _bits(delta.mask, n).to(torch.int32).neg_()  # all ones where kept
        out = out.view(torch.int32).bitwise_and_(keep).view(torch.float32)
    elif isinstance(delta, LowRankDelta):
        out = delta.left.float() @ delta.right.float()
    else:
        raise TypeError(f"not a compressed delta: {type(delta).__name__}")
    return out.reshape(shape)
