"""Lossy delta codecs, one module each, registered by name in :data:`LOSSY`; the multi-model
codecs (TALL, RMM) are in :data:`~mergehub.storage.codecs.multi.MULTI`, and those whose tasks
are store entries of their own (TALL) enter their task blobs here too.

A lossy codec stores an approximation of a fine-tune's task vector τ = θ − θ0 against its base
tensor θ0 (the blob's ``ref``). ``encode(theta, base, params)`` returns the parameters to keep in
the blob header (with everything decoding needs) and the payload; ``decode(payload, params,
base, extras)`` returns θ̂ = θ0 + τ̂ in float32. ``extras`` holds the tensors of the other blobs
the header's ``needs`` names (TALL's shared multi-task vector), as float32. Decoding is elementwise and deterministic, so the
sha256 of the decoded bytes, recorded in the header when the blob is written, checks every read
like it does for lossless blobs (see :mod:`mergehub.storage.codec`).

``decode`` runs on the base tensor's device: given a CUDA base, ``bit1``, ``compeft`` and
``lowrank`` decode with the fused decompress-and-apply kernel (:func:`mergehub.kernels.apply_deltas`)
and ``tall`` with torch on the GPU. A reader that decodes on a GPU checks the blob against its
id (the sha256 of header + payload, which covers everything decoding reads, and is small)
rather than the decoded bytes, which stay on the device. Where ``exact_on_cuda`` is true the
CUDA result is bit-identical to the CPU's (same float32 operations in the same order);
``lowrank``'s is not: a GPU matrix product sums in another order (relative error ~1e-6 of τ̂
before rounding to the tensor's dtype, tested against the CPU decode in tests/test_kernels.py),
so its decoded bytes must not be compared with the header's sha256.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LossyCodec:
    """A named lossy codec: its default parameters, encoder and decoder."""

    name: str
    defaults: dict[str, Any]
    encode: Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], tuple[dict[str, Any], bytes]]
    decode: Callable[[memoryview, dict[str, Any], torch.Tensor, dict[str, torch.Tensor]],
                     torch.Tensor]
    summary: str
    #: which tensors ``Store.compress`` encodes: (tensor name, shape, resolved parameters) ->
    #: bool; the others keep their lossless blobs
    applies: Callable[[str, tuple[int, ...], dict[str, Any]], bool] = \
        lambda name, shape, params: True
    exact_on_cuda: bool = True  # decode with a CUDA base gives the CPU's bytes (module doc)
    #: raises ``ValueError`` (one line naming the parameter) for a value the codec cannot use
    check: Callable[[dict[str, Any]], None] = lambda params: None


LOSSY: dict[str, LossyCodec] = {}


def register(codec: LossyCodec) -> LossyCodec:
    LOSSY[codec.name] = codec
    return codec


def resolve_params(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The codec's defaults updated with ``given``; unknown names and values the codec
    cannot use are a ``ValueError``."""
    codec = LOSSY.get(name)
    if codec is None:
        raise ValueError(f"unknown codec {name!r} (known: {', '.join(sorted(LOSSY))})")
    unknown = sorted(set(given) - set(codec.defaults))
    if unknown:
        raise ValueError(f"codec {name} has no parameter {unknown[0]!r} "
                         f"(known: {', '.join(sorted(codec.defaults)) or 'none'})")
    full = {**codec.defaults, **given}
    codec.check(full)
    return full


from mergehub.storage.codecs import bit1, compeft, lowrank, rmm, tall  # noqa: E402,F401  (registers)
