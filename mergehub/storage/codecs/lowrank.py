"""``lowrank``: truncated SVD of a dense delta, τ ≈ U_r Σ_r V_rᵀ (Eckart–Young optimal in L2).

The rank is ``rank`` (an integer), or the smallest rank keeping an ``energy`` fraction of
Σσ² when ``rank`` is 0. Stored: the float32 factors (U_r Σ_r, V_rᵀ), (m + n)·r values instead of
m·n. Only matrices are factored; other tensors keep their lossless blob (``applies``). A LoRA
adapter's tensors are already factors and stay as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mergehub.kernels import LowRankDelta, apply_deltas
from mergehub.storage.codecs import LossyCodec, register


def _rank(sigma: torch.Tensor, params: dict[str, Any]) -> int:
    rank, energy = int(params["rank"]), float(params["energy"])
    if rank < 0 or not 0 < energy <= 1:
        raise ValueError(f"lowrank needs rank >= 0 and 0 < energy <= 1, got {rank}, {energy}")
    if rank:
        return min(rank, sigma.numel())
    power = torch.cumsum(sigma.double() ** 2, 0)
    if power[-1] == 0:
        return 0
    return int(torch.searchsorted(power / power[-1], torch.tensor(energy, dtype=torch.float64))) + 1


def encode(theta: torch.Tensor, base: torch.Tensor,
           params: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    tau = (theta.float() - base.float())
    u, sigma, vh = torch.linalg.svd(tau, full_matrices=False)
    r = _rank(sigma, params)
    left = (u[:, :r] * sigma[:r]).contiguous().numpy().astype("<f4")
    right = vh[:r].contiguous().numpy().astype("<f4")
    header = {"shape": list(theta.shape), "rank": r, "energy_kept":
              float((sigma[:r].double() ** 2).sum() / max((sigma.double() ** 2).sum(), 1e-300)),
              "requested": {"rank": int(params["rank"]), "energy": float(params["energy"])}}
    return header, left.tobytes() + right.tobytes()


def decode(payload: memoryview, params: dict[str, Any], base: torch.Tensor,
           extras: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """θ̂ = base + left @ right in float32, on the base's device (on CUDA one fused pass whose
    product sums in another order than the CPU's matmul: see ``exact_on_cuda``)."""
    m, n = params["shape"]
    r = params["rank"]
    if not (type(r) is int and 0 <= r <= min(m, n) and len(payload) == 4 * r * (m + n)):
        raise ValueError(f"lowrank payload of {len(payload)} bytes does not fit rank {r} "
                         f"factors of {m}x{n}")
    values = np.frombuffer(payload, "<f4")
    left = torch.from_numpy(values[:m * r].reshape(m, r).copy()).to(base.device)
    right = torch.from_numpy(values[m * r:].reshape(r, n).copy()).to(base.device)
    return apply_deltas(base, [LowRankDelta(left, right)], out_dtype=torch.float32)


register(LossyCodec("lowrank", {"rank": 16, "energy": 1.0}, encode, decode,
                    "truncated SVD of τ at a rank or kept-energy fraction",
                    applies=lambda name, shape, params: len(shape) == 2, exact_on_cuda=False))
