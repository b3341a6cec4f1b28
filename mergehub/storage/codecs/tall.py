"""``tall``: TALL masks (Wang et al. 2024, "Localizing Task Information for Improved Model
Merging and Compression") for T fine-tunes of one base, a multi-model codec
(:mod:`mergehub.storage.codecs.multi`).

The multi-task vector τMTL = Σt τt is stored once per tensor (the shared part: a lossless
float32 blob shared by the T entries); task t keeps a bitmask mt = 1{|τt| > λt·|τMTL − τt|}
(``lambda``, default 0.4, one per task allowed) and is reconstructed as
θ̂t = θ0 + alpha·(mt ⊙ τMTL) (``alpha``, default 1). Stored per task (layout ``entries``: one
store entry per fine-tune, ``Store.compress_tall`` / ``hub compress A B ... --codec tall``):
one zstd-compressed bit per weight, in a blob whose header names the τMTL blob in ``needs``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import zstandard

from mergehub.errors import shown
from mergehub.ops.consensus import tall_masks
from mergehub.storage.codecs.multi import Code, Encoded, MultiCodec, register
from mergehub.storage.frames import inflate


def mask(tau: torch.Tensor, mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """m_t = |τt| > λt·|τMTL − τt|, the consensus merge's TALL mask for one task (strict, as
    the TALL-masks code)."""
    return tall_masks([tau], mtl, [lam])[0]


class Tall(MultiCodec):
    name = "tall"
    summary = "shared multi-task vector + one bitmask per task (TALL masks)"
    defaults = {"lambda": 0.4, "alpha": 1.0}
    layout = "entries"
    task_params = ("lambda",)

    def store_call(self) -> str:
        return "compress_tall([A, B, ...])"

    def check(self, params: dict[str, Any]) -> None:
        """``lambda`` and ``alpha`` are finite numbers."""
        for key in ("lambda", "alpha"):
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"tall {key} must be a finite number, not {shown(value)}")

    def encode(self, taus: list[torch.Tensor], params: list[dict[str, Any]]) -> Encoded:
        """Shared ``mtl`` = Σt τt; task t's code ``mask`` = mt."""
        mtl = sum(taus)
        return Encoded({"mtl": mtl}, [{"mask": mask(tau.float(), mtl.float(), float(p["lambda"]))}
                                      for tau, p in zip(taus, params)])

    def decode(self, shared: dict[str, torch.Tensor], code: Code,
               params: dict[str, Any]) -> torch.Tensor:
        """alpha·(mt ⊙ τMTL), flat."""
        if "mtl" not in shared:
            raise ValueError("a tall blob needs its multi-task vector")
        return shared["mtl"].reshape(-1) * code["mask"].reshape(-1) * float(params["alpha"])

    def pack(self, code: Code, params: dict[str, Any],
             shape: tuple[int, ...]) -> tuple[dict[str, Any], bytes]:
        m = code["mask"]
        payload = zstandard.ZstdCompressor(level=3).compress(
            np.packbits(m.numpy().reshape(-1)).tobytes())
        return ({"shape": list(shape), "lambda": float(params["lambda"]),
                 "alpha": float(params["alpha"]), "kept": int(m.sum())}, payload)

    def unpack(self, payload: memoryview, params: dict[str, Any]) -> Code:
        n = math.prod(params["shape"])
        raw = inflate(payload, -(-n // 8))
        return {"mask": torch.from_numpy(np.unpackbits(np.frombuffer(raw, np.uint8),
                                                       count=n).astype(bool))}


TALL = register(Tall())

