"""``rmm``: reversible model merging (RMM; Alipour & Mohammadi Amiri 2025) as a multi-model codec
(:mod:`mergehub.storage.codecs.multi`): a small basis shared by the tasks plus per-task
coefficients from which each input task is rebuilt.

Every form here is the same closed form applied to some vectors x1..xT, the rows of
X ∈ R^{T×d}: the best m-term approximation Σt ||xt − Σj ctj Bj||² (Eckart–Young) takes the
top-m right singular vectors of X as the basis, computed through the T×T Gram matrix X·Xᵀ
(cheap when T is small): with X·Xᵀ = U Λ Uᵀ, Bj = ujᵀX / σj and ctj = ⟨xt, Bj⟩ = utj σj.
With m = T it is exact (to float32); m = 1 is a single direction. The residual of task t with m
terms is ||xt||² − Σ_{j<=m} ctj², so one eigendecomposition gives the error of every m at once.

``basis`` picks the vectors for a weight matrix whose inputs are all LoRA adapters (τt = Lt·Rt,
Lt = scaling·Bt and Rt = At in the weight's orientation; an adapter without the module has
rank 0):

* ``factors`` (the default, the paper's): the factors themselves. The left factors L1..LT
  (zero-padded to the largest rank) get their own m-term basis and coefficients, and so do the
  right factors; task t is rebuilt as (Σj c^L_tj L^j)·(Σj c^R_tj R^j). The stored basis is m
  adapter-shaped factor pairs, the size of m LoRAs; the reported error is that of the rebuilt
  product against τt, for every m.
* ``dense``: the exact optimum for the dense deltas τt = Lt·Rt. Its Gram matrix comes from the
  factors, ⟨Li Ri, Lj Rj⟩ = Σ (Liᵀ Lj) ⊙ (Ri Rjᵀ), and each basis matrix, a combination of the
  T deltas, is kept as factors: Bj = [w1j L1, …, wTj LT] · [R1; …; RT] (rank ≤ Σ rt), the
  right factor shared by all j.

Inputs that are full fine-tunes have no factors: their tensors always take the dense basis,
stored dense (m matrices of the tensor's shape).

As a :class:`~mergehub.storage.codecs.multi.MultiCodec` (layout ``bundle``: one entry for all
tasks), a tensor's shared part is ``basis`` (dense) or ``left`` and ``right`` (factors) and
task t's code its coefficients ``coef`` or ``left_coef`` and ``right_coef``; ``rmm.json``
names the tasks and the base. The merge method (``merge_method: rmm``) is
:mod:`mergehub.merge.methods.rmm`; running it, its output files and reverting are in
:mod:`mergehub.merge.rmm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mergehub.storage.codecs.multi import Code, Encoded, MultiCodec, register

#: the side file of an rmm entry (the tasks, m, basis, base and the errors by m)
RMM_FILE = "rmm.json"


def _spectrum(gram: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the T×T Gram matrix (float64): the mixing weights W (T × m) with Bj = Σt Wtj xt,
    the coefficients (T × m) and the residuals (T × T: task, number of terms)."""
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(0), evecs[:, order]
    sigma = evals.sqrt()
    coef_all = evecs * sigma  # c_tj = u_tj σ_j
    residuals = (gram.diagonal()[:, None] - torch.cumsum(coef_all ** 2, dim=1)).clamp_min(0)
    keep = (sigma[:m] > sigma[0] * 1e-12 if sigma[0] > 0
            else torch.zeros(m, dtype=torch.bool, device=gram.device))
    mixing = torch.zeros((gram.shape[0], m), dtype=gram.dtype, device=gram.device)
    mixing[:, keep] = evecs[:, :m][:, keep] / sigma[:m][keep]
    return mixing, coef_all[:, :m] * keep, residuals


def decompose(xs: list[torch.Tensor],
              m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Basis (m × shape), coefficients (T × m), residuals (T × T: task, number of terms), all
    float32, and the squared norms ||xt||² (T, float64).

    ``residuals[t, j]`` is ||xt − Σ_{i<=j} cti Bi||² for j + 1 terms.
    """
    basis, coef, residuals, norms = _decompose64(xs, m)
    return basis.float(), coef.float(), residuals.float(), norms


def _decompose64(xs: list[torch.Tensor],
                 m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`decompose` in float64, and the squared norms ||xt||² (the Gram matrix's
    diagonal)."""
    x = torch.stack([t.reshape(-1) for t in xs]).double()
    gram = x @ x.T
    mixing, coef, residuals = _spectrum(gram, m)
    return (mixing.T @ x).reshape((m, *xs[0].shape)), coef, residuals, gram.diagonal()


def _inner(l1: torch.Tensor, r1: torch.Tensor, l2: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """⟨l1·r1, l2·r2⟩_F without forming either product: Σ (l1ᵀ l2) ⊙ (r1 r2ᵀ)."""
    return ((l1.T @ l2) * (r1 @ r2.T)).sum()


@dataclass
class FactorBasis:
    """Task t's delta is (Σj left_coef[t, j]·left[j]) @ (Σj right_coef[t, j]·right[j]).

    ``norms[t]``: ||τt||²; ``residuals[t, j]``: ||τt − rebuilt||² with j + 1 basis terms
    (both float64)."""

    left: torch.Tensor  # (mL, rows, rank)
    left_coef: torch.Tensor  # (T, mL)
    right: torch.Tensor  # (mR, rank, cols)
    right_coef: torch.Tensor  # (T, mR)
    norms: torch.Tensor  # (T,)
    residuals: torch.Tensor  # (T, T)

    def first(self, m: int) -> FactorBasis:
        """The basis cut to its first m terms on each side (a side with fewer keeps them)."""
        return FactorBasis(self.left[:m], self.left_coef[:, :m], self.right[:m],
                           self.right_coef[:, :m], self.norms, self.residuals)

    def nbytes(self, m: int) -> int:
        """Bytes (float32) of :meth:`first` (m) with its coefficients."""
        t = self.left_coef.shape[0]
        return 4 * sum(min(m, part.shape[0]) * (part[0].numel() + t)
                       for part in (self.left, self.right))

    def encoded(self) -> Encoded:
        """As a multi-model codec's result: shared ``left`` and ``right``, task t's code its
        rows of ``left_coef`` and ``right_coef``."""
        return Encoded({"left": self.left, "right": self.right},
                       [{"left_coef": lc, "right_coef": rc}
                        for lc, rc in zip(self.left_coef, self.right_coef)],
                       {"norms": self.norms, "residuals": self.residuals})


def decompose_factors(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> FactorBasis:
    """``basis: factors``: the T-term bases of the left factors and of the right factors (each
    zero-padded to the largest rank; their first m terms are the m-term bases), and the dense
    error of the rebuilt product for every m."""
    rank = max(left.shape[1] for left, _ in factors)
    lefts = [torch.nn.functional.pad(left.double(), (0, rank - left.shape[1]))
             for left, _ in factors]
    rights = [torch.nn.functional.pad(right.double(), (0, 0, 0, rank - right.shape[0]))
              for _, right in factors]
    t = len(factors)
    lb, lc, *_ = _decompose64(lefts, t)
    rb, rc, *_ = _decompose64(rights, t)
    norms = torch.stack([_inner(left, right, left, right) for left, right in zip(lefts, rights)])
    residuals = torch.zeros((t, t), dtype=torch.float64, device=norms.device)
    for i, (left, right, norm) in enumerate(zip(lefts, rights, norms)):
        for j in range(t):
            lh = torch.tensordot(lc[i, :j + 1], lb[:j + 1], dims=1)
            rh = torch.tensordot(rc[i, :j + 1], rb[:j + 1], dims=1)
            residuals[i, j] = (norm - 2 * _inner(left, right, lh, rh)
                               + _inner(lh, rh, lh, rh)).clamp_min(0)
    return FactorBasis(lb.float(), lc.float(), rb.float(), rc.float(), norms, residuals)


def decompose_dense_lowrank(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> FactorBasis:
    """``basis: dense`` for LoRA inputs: the dense deltas' optimal T-term basis (its first m
    terms are the m-term one), each basis matrix kept as [w1j L1, …, wTj LT] @ [R1; …; RT]
    (one shared right factor, coefficient 1)."""
    lefts = [left.double() for left, _ in factors]
    rights = [right.double() for _, right in factors]
    t = len(factors)
    gram = torch.stack([torch.stack([_inner(li, ri, lj, rj) for lj, rj in zip(lefts, rights)])
                        for li, ri in zip(lefts, rights)])
    mixing, coef, residuals = _spectrum(gram, t)
    left = torch.stack([torch.cat([li * mixing[i, j] for i, li in enumerate(lefts)], dim=1)
                        for j in range(t)])
    right = torch.cat(rights, dim=0)[None]
    return FactorBasis(left.float(), coef.float(), right.float(),
                       torch.ones((t, 1), dtype=torch.float32), gram.diagonal(), residuals)


class Rmm(MultiCodec):
    """``m``: the basis size (its default and checks are the merge method's,
    :mod:`mergehub.merge.methods.rmm`). :meth:`encode` is the dense form (full fine-tunes);
    LoRA inputs' factor forms are :func:`decompose_factors` and
    :func:`decompose_dense_lowrank` (:meth:`FactorBasis.encoded`)."""

    name = "rmm"
    summary = "a basis shared by the tasks + per-task coefficients (reversible merging)"
    layout = "bundle"
    manifest = RMM_FILE
    code_keys = ("coef", "left_coef", "right_coef")
    made_by = ("a reversible merge", "merge_method rmm")

    def encode(self, taus: list[torch.Tensor], params: list[dict[str, Any]]) -> Encoded:
        """Shared ``basis`` (m × shape), task t's code ``coef`` (m); the stats ``norms`` (T)
        and ``residuals`` (T × T), see :func:`decompose`."""
        basis, coef, residuals, norms = decompose(taus, int(params[0]["m"]))
        return Encoded({"basis": basis}, [{"coef": row} for row in coef],
                       {"norms": norms, "residuals": residuals})

    def decode(self, shared: dict[str, torch.Tensor], code: Code,
               params: dict[str, Any]) -> torch.Tensor:
        """Σj ctj Bj (dense), or (Σj c^L_tj L^j) @ (Σj c^R_tj R^j) (factors)."""
        if "basis" in shared:
            return torch.tensordot(code["coef"], shared["basis"], dims=1)
        return (torch.tensordot(code["left_coef"], shared["left"], dims=1)
                @ torch.tensordot(code["right_coef"], shared["right"], dims=1))


RMM = register(Rmm())
