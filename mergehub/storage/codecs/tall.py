"""``tall``: TALL masks (Wang et al. 2024) for T fine-tunes of one base.

The multi-task vector τMTL = Σt τt is stored once per tensor (a lossless float32 blob shared by
the T entries); task t keeps a bitmask mt = 1{|τt| > λt·|τMTL − τt|} (``lambda``, default
0.4) and is reconstructed as θ̂t = θ0 + alpha·(mt ⊙ τMTL) (``alpha``, default 1). Stored per
task: one zstd-compressed bit per weight. This codec is multi-model, so it is used through
``Store.compress_tall`` / ``hub compress A B ... --codec tall``: :func:`encode` takes the task's
τt and τMTL directly; the header names the τMTL blob in ``needs``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import zstandard

from mergehub.errors import spelled
from mergehub.ops.consensus import tall_masks
from mergehub.storage.frames import inflate
from mergehub.storage.codecs import LossyCodec, register


def mask(tau: torch.Tensor, mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """m_t = |τt| > λt·|τMTL − τt|, the consensus merge's TALL mask for one task (strict, as
    the TALL-masks code)."""
    return tall_masks([tau], mtl, [lam])[0]


def encode_task(tau: torch.Tensor, mtl: torch.Tensor, params: dict[str, Any],
                mtl_blob: str) -> tuple[dict[str, Any], bytes]:
    """Header parameters and payload of task t's mask for one tensor."""
    m = mask(tau.float(), mtl.float(), float(params["lambda"]))
    payload = zstandard.ZstdCompressor(level=3).compress(np.packbits(m.numpy().reshape(-1)).tobytes())
    return ({"shape": list(tau.shape), "lambda": float(params["lambda"]),
             "alpha": float(params["alpha"]), "kept": int(m.sum()), "needs": {"mtl": mtl_blob}},
            payload)


def encode(theta: torch.Tensor, base: torch.Tensor,
           params: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    raise ValueError("tall compresses several fine-tunes together: use " + spelled(
        "Store.compress_tall([A, B, ...])", "hub compress A B ... --codec tall"))


def decode(payload: memoryview, params: dict[str, Any], base: torch.Tensor,
           extras: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    if not extras or "mtl" not in extras:
        raise ValueError("a tall blob needs its multi-task vector")
    n = math.prod(params["shape"])
    raw = inflate(payload, -(-n // 8))
    m = torch.from_numpy(np.unpackbits(np.frombuffer(raw, np.uint8), count=n).astype(bool))
    delta = extras["mtl"].to(base.device).reshape(-1) * m.to(base.device) * float(params["alpha"])
    return base.float() + delta.reshape(params["shape"])


register(LossyCodec("tall", {"lambda": 0.4, "alpha": 1.0}, encode, decode,
                    "shared multi-task vector + one bitmask per task (TALL masks)"))
