"""``compeft``: sparse ternary task vectors (ComPEFT, Yadav et al. 2023).

The paper's τ̂ = alpha·σ(τ)·sign(τ) ⊙ m: m keeps the ``density`` fraction of entries with the
largest |τ| (k = max(1, int(density·n)), ties broken by position), σ is the standard deviation
of the whole τ of the tensor (population, as in the paper's example) and sign(0) = 0, so an
entry of the top k whose τ is exactly 0 decodes to 0: it is not stored at all (``kept`` counts
the non-zero ones). Stored: the positions, as a bitmap or as gaps between positions, each
zstd-compressed, whichever is smaller for this tensor; one sign bit per kept entry; σ and alpha
in the header.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import zstandard

from mergehub.kernels import TernaryDelta, apply_deltas
from mergehub.ops.selection import magnitude_cuts
from mergehub.ops.sparsify import cut_mask
from mergehub.storage.frames import inflate
from mergehub.storage.codecs import LossyCodec, register


def _positions(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Sorted flat positions of the non-zero entries among the top k of |τ|, ranked as every
    trim ranks them (:func:`~mergehub.ops.selection.magnitude_cuts`: exactly k, ties
    by position). sign(0) = 0 makes a kept zero decode to 0, so it is left out rather than
    stored with a sign bit."""
    if not 0 < density <= 1:
        raise ValueError(f"compeft density must be in (0, 1], not {density!r}")
    flat = tau.reshape(-1)
    cut = magnitude_cuts(lambda which=None: iter([(None, [flat])]), flat.numel(), [density])[0]
    kept = cut_mask(flat, cut)  # None: density 1 keeps every entry
    return torch.nonzero((flat != 0) if kept is None else kept & (flat != 0)).reshape(-1)


def encode(theta: torch.Tensor, base: torch.Tensor,
           params: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    tau = theta.float() - base.float()
    n = tau.numel()
    pos = _positions(tau, float(params["density"]))
    sigma = float(tau.std(correction=0)) if n else 0.0
    flat = tau.reshape(-1)
    signs = np.packbits((flat[pos] >= 0).numpy())
    compressor = zstandard.ZstdCompressor(level=3)
    mask = np.zeros(n, dtype=bool)
    mask[pos.numpy()] = True
    bitmap = compressor.compress(np.packbits(mask).tobytes())
    gaps = np.diff(pos.numpy(), prepend=0).astype("<u4")
    gapped = compressor.compress(gaps.tobytes())
    layout, positions = ("bitmap", bitmap) if len(bitmap) <= len(gapped) else ("gaps", gapped)
    header = {"shape": list(theta.shape), "density": float(params["density"]),
              "alpha": float(params["alpha"]), "sigma": sigma, "kept": int(pos.numel()),
              "layout": layout, "positions_bytes": len(positions)}
    return header, positions + signs.tobytes()


def decode(payload: memoryview, params: dict[str, Any], base: torch.Tensor,
           extras: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """θ̂ = base + τ̂ in float32, on the base's device (one fused pass there when on CUDA).

    The positions become a packed bitmap and the kept entries' signs a packed bitmap over all
    entries (2 bits per weight), which the kernel decodes elementwise.
    """
    n, kept = math.prod(params["shape"]), params["kept"]
    split = params["positions_bytes"]
    if not (type(kept) is int and 0 <= kept <= n and type(split) is int
            and len(payload) - split == -(-kept // 8) and params["layout"] in ("bitmap", "gaps")):
        raise ValueError(f"compeft payload of {len(payload)} bytes does not fit {kept} kept "
                         f"of {n} entries")
    bitmap_layout = params["layout"] == "bitmap"
    raw = inflate(payload[:split], -(-n // 8) if bitmap_layout else 4 * kept)
    if bitmap_layout:
        bitmap = np.frombuffer(raw, np.uint8)
        mask = np.unpackbits(bitmap, count=n).view(bool)
    else:
        pos = np.cumsum(np.frombuffer(raw, "<u4").astype(np.int64))
        if kept and pos[-1] >= n:
            raise ValueError(f"compeft position {pos[-1]} beyond the {n} entries")
        mask = np.zeros(n, dtype=bool)
        mask[pos] = True
        bitmap = np.packbits(mask)
    named = int(np.count_nonzero(mask))
    if named != kept:
        raise ValueError(f"compeft positions name {named} distinct entries, its header {kept}")
    # the kept entries' signs, in order, into their positions (np.place: no index array)
    signs = np.zeros(n, dtype=np.uint8)
    np.place(signs, mask, np.unpackbits(np.frombuffer(payload[split:], np.uint8), count=kept))
    dev = base.device
    delta = TernaryDelta(torch.from_numpy(bitmap.copy()).to(dev),
                         torch.from_numpy(np.packbits(signs)).to(dev),
                         params["alpha"] * params["sigma"])
    return apply_deltas(base.reshape(params["shape"]), [delta], out_dtype=torch.float32)


register(LossyCodec("compeft", {"density": 0.1, "alpha": 1.0}, encode, decode,
                    "top-k sign · alpha · std(τ), positions as bitmap or gaps (ComPEFT)"))
