"""MeZO's kernels' entry points: the perturbation drawn from Philox (:func:`zo_direction`),
added to one parameter (:func:`zo_step`) or to many in one launch with Sparse MeZO's mask
(:func:`zo_steps`), and Sparse MeZO's exact per-tensor quantiles of |θ|
(:func:`smallest_magnitudes`). Triton only (CUDA, or the interpreter)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from mergehub.errors import InputError


def _check_stream(name: str, start: int, n: int) -> None:
    if start % 4 or start < 0:
        raise InputError(f"{name}: start must be a multiple of 4, not {start}")
    if start + n > 2 ** 33:
        raise InputError(f"{name}: stream positions up to {start + n} exceed 2^33")


def zo_direction(n: int, seed: int, eps: float, *, start: int = 0,
                 device: torch.device | str = "cuda", accurate: bool = False) -> torch.Tensor:
    """MeZO's perturbation d = eps·z for stream positions [start, start + n) of ``seed``
    (``start`` a multiple of 4): z ~ N(0, 1) from Philox-4x32-10 and a Box-Muller transform,
    four values per counter, so a chunk drawn alone equals the same entries of one long draw;
    the lowest float32 mantissa bit of d is set (``mezo._sticky``). The transform uses the
    GPU's approximate log2, sine and cosine, or with ``accurate`` libdevice's full-precision
    ones (``tl.randn4x``: the stream of runs started before; each move ~2x slower). Triton only
    (CUDA, or the interpreter): the CPU path of MeZO draws with ``torch.randn``."""
    _check_stream("zo_direction", start, n)
    from mergehub.kernels import triton_zo

    d = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        triton_zo.zo(None, d, n, start, seed, eps, 0, None, accurate)
    return d


def zo_step(x: torch.Tensor, seed: int, eps: float, times: int, *, start: int = 0,
            update: float | None = None, accurate: bool = False) -> None:
    """In place on the flat contiguous ``x`` (bf16, fp16 or fp32): ``times`` successive
    rounded adds of d = :func:`zo_direction` (subtractions for times < 0), then one add of
    ``update``·d, exactly as those torch in-place ops on the materialized d would do, in one
    pass over ``x`` with d drawn in registers (``accurate`` as :func:`zo_direction`)."""
    if not (x.is_contiguous() and x.dim() == 1 and x.dtype in
            (torch.bfloat16, torch.float16, torch.float32)):
        raise InputError(f"zo_step: want a flat contiguous float tensor, not {x.dtype} "
                         f"{tuple(x.shape)}")
    _check_stream("zo_step", start, x.numel())
    from mergehub.kernels import triton_zo

    if x.numel():
        triton_zo.zo(x, None, x.numel(), start, seed, eps, times, update, accurate)


_ZO_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_many(name: str, xs: tuple[torch.Tensor, ...]) -> None:
    """Contiguous tensors of one float dtype on one device, each below 2^31 entries."""
    dtype, device = xs[0].dtype, xs[0].device
    for x in xs:
        if not (x.is_contiguous() and x.dtype in _ZO_DTYPES):
            raise InputError(f"{name}: want contiguous float tensors, not {x.dtype} "
                             f"{tuple(x.shape)}{'' if x.is_contiguous() else ' (strided)'}")
        if x.dtype != dtype or x.device != device:
            raise InputError(f"{name}: tensors of one dtype on one device, not {x.dtype} on "
                             f"{x.device} beside {xs[0].dtype} on {xs[0].device}")
        if x.numel() >= 2 ** 31:
            raise InputError(f"{name}: a tensor of {x.numel()} entries (at most 2^31 - 1)")


class ZoTensors(Sequence[torch.Tensor]):
    """Contiguous tensors of one float dtype (bf16, fp16 or fp32) on one device, each below
    2^31 entries and addressed as flat (a parameter needs no flat view), checked once, with
    the tables by which the many-tensor kernels (:func:`zo_steps`,
    :func:`smallest_magnitudes`) address them from one pointer.

    Why: MeZO moves the same parameters three times a step; checking and laying them out for
    every launch cost the host time a GPU waits for at the step's first move and at its last
    (after the losses' synchronization). The tables depend on the tensors' addresses and sizes
    alone, so they are kept for the last few such layouts (:func:`_tables`), and a new
    ``ZoTensors`` over tensors where the last step's were (MeZO makes one a step, from the
    parameters as they are then) copies nothing to the device."""

    def __init__(self, xs: Iterable[torch.Tensor], name: str = "ZoTensors") -> None:
        self._xs = tuple(xs)
        _check_many(name, self._xs)
        #: (address, entries) of each tensor: all that the tables depend on
        self._places = tuple((x.data_ptr(), x.numel()) for x in self._xs)

    def __len__(self) -> int:
        return len(self._xs)

    def __getitem__(self, i):  # type: ignore[override]
        return self._xs[i]

    @functools.cached_property
    def entries(self) -> int:
        """The tensors' entries in all."""
        return sum(n for _, n in self._places)

    @functools.cached_property
    def first(self) -> torch.Tensor:
        """The first tensor with entries: the one the kernels address the others from (a
        pointer argument whose alignment Triton knows)."""
        return next(x for x in self._xs if x.numel())

    @functools.cached_property
    def align(self) -> int:
        """Entries per 16 bytes if every tensor starts on 16 bytes, else 1 (the kernels'
        ``ALIGN``: their loads can then be 16 bytes wide)."""
        return 16 // self._xs[0].element_size() if all(
            ptr % 16 == 0 for ptr, n in self._places if n) else 1

    def layout(self, block: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """:func:`_tables` of these tensors for programs of ``block`` entries."""
        return _tables(self._places, self.first.element_size(), block, self.first.device)


@functools.lru_cache(maxsize=16)
def _tables(tensors: tuple[tuple[int, int], ...], size: int, block: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Programs of ``block`` entries over the tensors of (address, entries) ``tensors`` (one
    not empty; ``size``-byte entries): int64 [T, 3] (where tensor t starts, in entries from the
    first non-empty one's start; its entries; the first byte of its packed bits, each tensor
    taking ceil(numel / 8) bytes in order), int64 [2^log_t] (tensor t's first program, then
    the program count up to the power of two that the kernels' binary search spans), the
    program count and log_t; on ``device``, copied there without waiting for its queued work.
    Cached on addresses and sizes, which are all the tables depend on: they hold no tensor of
    the caller's, and stay valid for any tensors at those places."""
    origin = next(ptr for ptr, n in tensors if n)
    starts, meta, programs, nbytes = [], [], 0, 0
    for ptr, n in tensors:
        meta.append(((ptr - origin) // size if n else 0, n, nbytes))
        starts.append(programs)
        programs += -(-n // block)
        nbytes += -(-n // 8)
    log_t = max(1, (len(tensors) - 1).bit_length())
    starts += [programs] * ((1 << log_t) - len(starts))
    return (to_device(torch.tensor(meta, dtype=torch.int64), device),
            to_device(torch.tensor(starts, dtype=torch.int64), device), programs, log_t)


def to_device(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor copied to ``device`` without waiting for the device's queued work
    (through pinned memory on CUDA): kernel arguments and tables."""
    if torch.device(device).type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def seed_table(seeds: list[int] | np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint64 seeds as the int64 [T] (same bits) :func:`zo_steps` takes, on ``device``."""
    return to_device(torch.from_numpy(np.asarray(seeds, dtype=np.uint64).view(np.int64)), device)


def zo_mask_bytes(xs: list[torch.Tensor]) -> int:
    """Bytes of the packed masks :func:`zo_steps` keeps for ``xs``: ceil(numel / 8) each."""
    return sum(-(-x.numel() // 8) for x in xs)


def zo_steps(xs: list[torch.Tensor] | ZoTensors, seeds: list[int] | torch.Tensor, eps: float,
             times: int, *, update: float | None = None, bounds: torch.Tensor | None = None,
             bits: torch.Tensor | None = None, fresh: bool = False,
             accurate: bool = False) -> None:
    """:func:`zo_step` on each of the contiguous tensors ``xs`` (as flat; one dtype: bf16, fp16
    or fp32) from stream position 0 of its seed (``seeds``: ints, or int64 [T] on their device
    holding the uint64 seeds' bits), in one launch: every tensor ends as ``zo_step(x, seed,
    eps, times, update=update, accurate=accurate)`` leaves it.

    With ``bounds`` (float32 [T], e.g. from :func:`smallest_magnitudes`) the move is Sparse
    MeZO's: d is multiplied by the mask |x| <= bounds[t] (d·1 or d·0, as torch ops on a
    materialized d and mask would), the mask of the parameter as it was when ``fresh`` (the
    step's first move, which computes it and stores it into ``bits``) and read back from
    ``bits`` otherwise. ``bits``: uint8 of :func:`zo_mask_bytes` entries, tensor t's
    ceil(numel / 8) bytes after tensor t − 1's, each in ``np.packbits`` order. ``xs`` as a
    :class:`ZoTensors`: checked and laid out when that was made (a list: every call)."""
    if not isinstance(xs, ZoTensors):
        xs = ZoTensors(xs, "zo_steps")
    if not xs.entries:
        return
    if bounds is not None and (bits is None or bits.dtype != torch.uint8
                               or bits.numel() < zo_mask_bytes(xs)):
        raise InputError("zo_steps: masked moves need a uint8 bits buffer of zo_mask_bytes(xs)")
    from mergehub.kernels import triton_zo

    if not isinstance(seeds, torch.Tensor):
        seeds = seed_table(seeds, xs[0].device)
    triton_zo.zo_many(xs, seeds, eps, times, update, bounds, bits, fresh, accurate)


def smallest_magnitudes(xs: list[torch.Tensor] | ZoTensors, ks: list[int]) -> torch.Tensor:
    """float32 [T] on the tensors' device: the ks[t]-th smallest |x| of each contiguous tensor
    in ``xs`` (one dtype: bf16, fp16 or fp32; 1 <= k <= numel), exactly (NaN sorts
    last), without a host synchronization: a radix select over the magnitudes' bit patterns,
    one counting pass over all the tensors per digit (:func:`triton_zo.
    smallest_magnitudes`). Triton only (CUDA, or the interpreter). ``xs`` as for
    :func:`zo_steps`."""
    if not isinstance(xs, ZoTensors):
        xs = ZoTensors(xs, "smallest_magnitudes")
    if len(ks) != len(xs) or any(not 1 <= k <= x.numel() for x, k in zip(xs, ks)):
        raise InputError(f"smallest_magnitudes: want one k in [1, numel] per tensor, got {ks} "
                         f"for {[x.numel() for x in xs]} entries")
    from mergehub.kernels import triton_zo

    return triton_zo.smallest_magnitudes(xs, to_device(torch.tensor(ks, dtype=torch.int64),
                                                            xs[0].device))
