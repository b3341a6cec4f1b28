"""Reversible model merging (RMM) of (low-rank) deltas: a small basis plus per-task coefficients.

Per weight matrix, the T task deltas ΔWt (for a LoRA: Bt·At·scaling) are the rows of
X ∈ R^{T×d}. The best m-term approximation Σt ||ΔWt − Σj ctj Bj||²_F (Eckart–Young) takes the
top-m right singular vectors of X as the basis, computed through the T×T Gram matrix X·Xᵀ
(cheap when T is small): with X·Xᵀ = U Λ Uᵀ, Bj = ujᵀX / σj and ctj = ⟨ΔWt, Bj⟩ = utj σj.
Reverting to task t is θ0 + Σj ctj Bj; with m = T it is exact (to float32), and m = 1 is a
single direction per matrix. The residual of task t with m terms is ||ΔWt||² − Σ_{j<=m} ctj²,
so one eigendecomposition per matrix gives the reconstruction error of every m at once; the
merge reports them and keeps them in ``rmm.json``.

Running the merge, its output files and reverting are in :mod:`mergehub.merge.rmm`.
"""

from __future__ import annotations

from typing import Any

import torch

from mergehub.merge.methods.base import MergeMethod, TensorContext, register


@register
class ReversibleMerge(MergeMethod):
    """``merge_method: rmm`` with ``parameters: {m: 2}`` (basis size, 1 <= m <= T)."""

    name = "rmm"
    model_params: dict[str, Any] = {}
    global_params = {"m": 1}

    def validate(self, model_params: list[dict[str, Any]], labels: list[str]) -> None:
        m = self.params["m"]
        if not isinstance(m, int) or not 1 <= m <= len(labels):
            raise ValueError(f"m must be an integer from 1 to the number of inputs "
                             f"({len(labels)}), not {m!r}")

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        raise NotImplementedError("rmm writes a basis, not one merged model: the engine runs "
                                  "it through mergehub.merge.rmm.execute_rmm")


def decompose(xs: list[torch.Tensor], m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Basis (m × shape), coefficients (T × m) and residuals (T × T: task, number of terms).

    ``residuals[t, j]`` is ||ΔWt − Σ_{i<=j} cti Bi||² for j + 1 terms.
    """
    shape = xs[0].shape
    x = torch.stack([t.reshape(-1) for t in xs]).double()
    gram = x @ x.T
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(0), evecs[:, order]
    sigma = evals.sqrt()
    coef_all = evecs * sigma  # T × T: c_tj = u_tj σ_j
    norms = (x * x).sum(dim=1)
    residuals = (norms[:, None] - torch.cumsum(coef_all ** 2, dim=1)).clamp_min(0)
    keep = sigma[:m] > sigma[0] * 1e-12 if sigma[0] > 0 else torch.zeros(m, dtype=torch.bool)
    basis = torch.zeros((m, x.shape[1]), dtype=torch.float64, device=x.device)
    if keep.any():
        basis[keep] = (evecs[:, :m][:, keep].T @ x) / sigma[:m][keep, None]
    coef = coef_all[:, :m] * keep
    return basis.float().reshape((m, *shape)), coef.float(), residuals.float()
