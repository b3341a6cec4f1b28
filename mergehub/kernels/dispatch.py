"""What every kernel entry point shares: the choice between the Triton kernels and the torch
reference (``backend``: see :mod:`mergehub.kernels`) and the checks of a merge's inputs.
Callers look :func:`use_triton` up on this module (``dispatch.use_triton``), so one patch of
it steers every entry point (the tests force the kernels that way)."""

from __future__ import annotations

import functools

import torch

from mergehub.errors import InputError


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels can be imported (Triton installed); asked once per process,
    since a failed import is searched for again on every try."""
    try:
        import mergehub.kernels.triton_base  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(backend: str | None, tensor: torch.Tensor) -> bool:
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', not {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise InputError("backend 'triton' asked for, but Triton is not installed")
        return True
    return tensor.is_cuda and triton_available()


def check_inputs(name: str, base: torch.Tensor, thetas: list[torch.Tensor],
                 per_input: dict[str, list | None]) -> None:
    if not thetas:
        raise InputError(f"{name}: no fine-tuned tensors to merge")
    for i, t in enumerate(thetas):
        if t.shape != base.shape:
            raise InputError(f"{name}: input {i} has shape {tuple(t.shape)}, "
                             f"the base {tuple(base.shape)}")
        if t.device != base.device:
            raise InputError(f"{name}: input {i} is on {t.device}, the base on {base.device}")
    for what, values in per_input.items():
        if values is not None and len(values) != len(thetas):
            raise InputError(f"{name}: {len(values)} {what} for {len(thetas)} inputs")
    for t in (base, *thetas):
        if not t.is_floating_point():
            raise InputError(f"{name}: cannot merge a {t.dtype} tensor")
