"""MeZO and Sparse MeZO: zeroth-order SGD that fine-tunes with forward passes only.

:class:`MeZO` is a ``torch.optim.Optimizer`` whose ``step(closure)`` estimates the gradient from
two evaluations of the closure's scalar loss (any objective, also a non-differentiable one such
as accuracy) and updates the parameters in place (Malladi et al. 2023, "Fine-tuning language
models with just forward passes"; docs/training.md)::

    perturb(+eps);  L+ = closure()
    perturb(-2eps); L- = closure()
    perturb(+eps)                         # back to theta
    g = (L+ - L-) / (2 eps)               # projected gradient, a scalar
    theta <- theta - lr * (g * z + wd * theta)

with ``z ~ N(0, I)`` never stored: each parameter's ``z`` is regenerated, ``CHUNK`` entries at a
time, from a generator seeded by (seed, step, parameter index). So the memory is that of
inference plus a few chunk-sized temporaries: no gradients, no optimizer moments. Sparse MeZO
(``density=q``, Liu et al. 2024) perturbs and updates only the entries whose magnitude is at
most the q-quantile of ``|theta|`` of their tensor (plus 1 bit per entry during a step): the
fraction q of each tensor is trained, its sparsity (the fraction left out) is 1 - q. The
update moves along ``d / eps`` with ``d = eps z`` as applied (rounded to float32), the
direction ``g`` was measured along. Measured (``benchmarks/RESULTS.md``): peak memory 1.00x
inference for a 1.1B bf16 Llama on an H100, Sparse MeZO 1.04x, Adam 4.5x.

Floating point, what is and is not guaranteed:

* The perturbation is applied in the parameter's dtype (``z`` is drawn in float32, so a bf16 and
  a float32 copy of a model see the same direction). The ``-2 eps`` move is done as two rounded
  ``-eps`` moves (and ``eps z`` has its last bit set, see :func:`_sticky`), so an entry whose
  perturbed values stay in its binade (same exponent) comes back bit-exactly; an entry that
  crosses into a coarser binade (or passes near zero) can come back off by up to one rounding
  step of its perturbed magnitude. No in-place scheme avoids that without memory: adding a
  constant to floats that land on a coarser grid loses bits. Measured with weights drawn
  N(0, 0.02) and eps = 1e-3: 8.9% of float32 entries end off, by at most 3.7e-9 (far below an
  update lr * g * z); 8.3% of bf16 entries end off, by up to 2.4e-4, *larger* than a typical
  update, and bf16 rounds away every update below half its ulp (6e-5 for weights near 0.02,
  so lr = 1e-6 updates vanish).
* ``master_weights=True`` keeps a float32 copy of every trained parameter in the optimizer
  state: perturbed values are computed from the copy, restoring is bit-exact for every dtype,
  and updates accumulate in float32 (the parameter holds the rounded copy). It costs 4 bytes
  per trained entry: meant for MeZO over an adapter's parameters, or for bf16 models where the
  drift above matters. The optimizer then owns the values: write parameters through
  ``load_state_dict``, not behind its back.

Eval mode: the closure's forward passes must not be stochastic, or L+ and L- see different
dropout masks and g measures the masks instead of the direction. MeZO's reference evaluates in
eval mode ("Dropout is turned off too", Malladi et al.'s trainer); run ``step`` inside
:func:`forward_only` (``hub train`` does), which also turns off peft's LoRA dropout.

Reproducibility: with the same seed, parameters, closure and data two runs are bit-identical
on one device type (the CPU draws z with ``torch.randn``, CUDA with Triton's Philox: different
streams); ``state_dict`` carries the step count (and the float32 copies), so a resumed run
continues bit-exactly.

Speed: on CUDA a dense parameter (no sparsity mask, no float32 copy, no weight decay in the
update) is moved in one pass per move, z drawn in registers (:func:`mergehub.kernels.zo_step`);
the other cases draw d into a float32 chunk (:func:`mergehub.kernels.zo_direction`) and move
with torch ops. Both do the same float32 operations in the same order.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from mergehub import kernels
from mergehub.kernels.deltas import pack_bits, unpack_bits
from mergehub.errors import MergehubError

CHUNK = 1 << 22
"""Entries of ``z`` drawn at once (16 MiB of float32); the optimizer's transient memory is a
few such chunks."""

QUANTILE_SAMPLE = 1 << 20
"""Tensors with more entries estimate Sparse MeZO's quantile from this many sampled entries."""

class MeZOError(MergehubError):
    """A MeZO step cannot proceed (no closure, non-finite loss) or was configured wrongly."""


#: what ``sparsity`` used to be called wrongly (it was the fraction trained)
RENAMED = ("MeZO: 'sparsity' was renamed 'density': it is the fraction of each tensor's entries "
           "that is trained (those of smallest |theta|); a sparsity is the fraction left out, "
           "1 - density")


def _check_group(lr: float, eps: float, weight_decay: float, density: float | None) -> None:
    """Refuse hyperparameters that would silently train nothing or diverge at once."""
    if not (math.isfinite(lr) and lr >= 0):
        raise MeZOError(f"MeZO: lr must be a finite number >= 0, got {lr!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise MeZOError(f"MeZO: eps must be a finite number > 0, got {eps!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise MeZOError(f"MeZO: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if density is not None and not 0 < density <= 1:
        raise MeZOError(f"MeZO: density (the quantile q of |theta| below which entries are "
                        f"trained) must be in (0, 1], got {density!r}")


@contextlib.contextmanager
def forward_only(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout, LoRA dropout and layer drop off) and no autograd for
    the forward passes of a zeroth-order step; the training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


#: parameter dtypes whose dense moves :func:`mergehub.kernels.zo_step` makes in one pass
_IN_REGISTERS = (torch.bfloat16, torch.float16, torch.float32)


@functools.lru_cache(maxsize=1 << 14)
def _seed(*key: int) -> int:
    """A 64-bit seed from ``key`` (seed, step, parameter index[, stream]) through numpy's
    SeedSequence, so no two keys share a stream (cached: a step asks for each three times)."""
    words = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def _generator(device: torch.device, *key: int) -> torch.Generator:
    """A torch generator on ``device`` seeded by :func:`_seed` of ``key``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed(*key))
    return gen


def _threshold(values: torch.Tensor, q: float, generator: torch.Generator) -> float:
    """The q-quantile of ``|values|`` (the k-th smallest, k = ceil(q n)); estimated from
    ``QUANTILE_SAMPLE`` seeded draws for larger tensors, to keep the transient memory small."""
    flat = values.detach().reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        pick = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator,
                             device=flat.device)
        flat = flat[pick]
    k = max(1, math.ceil(q * flat.numel()))
    mags = flat.abs().float()
    if mags.device.type == "cpu":
        return float(mags.kthvalue(k).values)
    return float(mags.sort().values[k - 1])  # CUDA kthvalue selects in one block: 100x slower


def _sticky(d: torch.Tensor) -> torch.Tensor:
    """``d`` (float32) with the lowest mantissa bit set, in place: a change of at most one
    float32 ulp that keeps ``x + d`` off exact rounding ties for every ``x`` at least ~4|d|, so
    ``(x + d) - d`` rounds back to ``x`` whenever both stay in x's binade (with a tie,
    round-half-to-even could go one way and come back the other)."""
    d.view(torch.int32).bitwise_or_(1)
    return d


class MeZO(torch.optim.Optimizer):
    """In-place zeroth-order SGD (MeZO); ``density=q`` gives Sparse MeZO.

    Args:
        params: parameters or parameter groups, as for any torch optimizer; parameters with
            ``requires_grad=False`` are left alone (so ``model.parameters()`` of a peft model
            trains only the adapter). Groups may set their own ``lr``, ``eps``,
            ``weight_decay`` and ``density``.
        lr: learning rate (paper: 1e-6 to 1e-7 for full parameters, ~1e-4 with LoRA).
        eps: perturbation scale (paper: 1e-3; 1e-2 with LoRA).
        weight_decay: decoupled from ``g``, as in the update above; applied only to
            parameters with at least 2 dimensions (biases and norm weights are 1-D).
        seed: seeds every step's perturbation; same seed, same run.
        density: None for MeZO; q in (0, 1] for Sparse MeZO: per tensor, only entries with
            ``|theta| <=`` the q-quantile of its ``|theta|`` are perturbed and updated (the
            fraction q is trained, the sparsity is 1 - q). The mask
            is recomputed every step from the current weights and held during the step as a
            packed bitmap (1 bit per entry): recomputing it from the *perturbed* weights would
            disagree with the mask used to perturb for entries within eps|z| of the threshold,
            and restoring would then move entries outside the mask. Entries outside the mask
            keep their value (they get an exact +0; a -0.0 may come back as +0.0).
        master_weights: keep float32 copies of the trained parameters (see the module
            docstring): bit-exact restoring and float32 updates for bf16/fp16 parameters.
        sign: ZO-SGD-Sign (ZO-Bench): update with sign(g) instead of g.
        backend: where z comes from: ``None`` picks ``"triton"`` for CUDA parameters when
            Triton is installed, ``"torch"`` otherwise; ``"triton"``: Philox in the kernels of
            :mod:`mergehub.kernels` (CPU tensors need ``TRITON_INTERPRET=1``); ``"torch"``:
            ``torch.randn`` (the stream of mergehub versions before the kernels, e.g. to
            continue such a run bit-exactly). Part of the state, since it picks the stream.
        sparsity: the old, misleading name of ``density``: an error naming it.

    ``step(closure)`` calls ``closure()`` twice under ``torch.no_grad()``; it must evaluate the
    same batch both times, deterministically (eval mode: :func:`forward_only`), and return a
    scalar (float or one-element tensor). It returns the mean of the two losses (the loss at
    theta up to O(eps^2)); ``last_projected_grad`` holds g.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                 eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 density: float | None = None, *, master_weights: bool = False,
                 sign: bool = False, backend: str | None = None, sparsity: Any = None) -> None:
        if sparsity is not None:
            raise MeZOError(RENAMED)
        _check_group(lr, eps, weight_decay, density)
        if not isinstance(seed, int) or seed < 0:
            raise MeZOError(f"MeZO: seed must be an integer >= 0, got {seed!r}")
        if backend not in (None, "triton", "torch"):
            raise MeZOError(f"MeZO: backend must be None, 'triton' or 'torch', not {backend!r}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay,
                                      density=density))
        for group in self.param_groups:
            if "sparsity" in group:
                raise MeZOError(RENAMED)
            _check_group(group["lr"], group["eps"], group["weight_decay"], group["density"])
        self.seed = seed
        self.master_weights = master_weights
        self.sign = sign
        self.backend = backend
        self.steps_done = 0
        self.last_projected_grad: float | None = None

    def _on_triton(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s perturbations come from the Triton kernels (see ``backend``)."""
        if self.backend is None:
            return p.is_cuda and kernels.triton_available()
        return self.backend == "triton"

    def _trained(self) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        """(index, parameter, group) of every parameter to train; the index counts all
        parameters of all groups, so freezing one does not change the others' streams."""
        out = []
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    out.append((index, p, group))
                index += 1
        return out

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        """p's float32 copy, made from p the first time it is needed (so weights loaded into
        the model after the optimizer was built are picked up)."""
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().to(torch.float32, copy=True)
        return state["master"]

    @staticmethod
    def _chunks(p: torch.Tensor, master: torch.Tensor | None
                ) -> Iterable[tuple[torch.Tensor, torch.Tensor | None, int]]:
        """(slice of p, the same slice of its master, first entry): flat runs of ``CHUNK``
        entries, or the whole tensor when p is not contiguous."""
        if not p.is_contiguous():
            yield p.data, master, 0
            return
        flat = p.data.view(-1)
        mflat = None if master is None else master.view(-1)
        for start in range(0, flat.numel(), CHUNK):
            stop = start + CHUNK
            yield flat[start:stop], None if mflat is None else mflat[start:stop], start

    def _move(self, trained: list[tuple[int, torch.Tensor, dict[str, Any]]], frm: int, to: int,
              masks: dict[int, torch.Tensor], grad: float | None = None) -> None:
        """Move every trained parameter from ``theta + frm*eps*z`` to ``theta + to*eps*z``
        (one rounded eps-sized move at a time, or from the float32 copy), then, with ``grad``,
        apply the update at ``to == 0``. At ``frm == 0`` a sparse step computes its masks."""
        for index, p, group in trained:
            fused = self._on_triton(p)
            key = (self.seed, self.steps_done, index)
            seed, gen = (_seed(*key), None) if fused else (None, _generator(p.device, *key))
            master = self._master(p) if self.master_weights else None
            q = group["density"]
            if q is not None and frm == 0:
                tau = _threshold(p if master is None else master, q,
                                 _generator(p.device, self.seed, self.steps_done, index, 1))
                masks[index] = torch.empty((p.numel() + 7) // 8, dtype=torch.uint8,
                                           device=p.device)
            eps = group["eps"]
            decays = grad is not None and p.dim() >= 2 and bool(group["weight_decay"])
            if fused and q is None and master is None and not decays and p.is_contiguous() \
                    and p.dtype in _IN_REGISTERS:  # one pass, d in registers: no chunks needed
                kernels.zo_step(p.data.view(-1), seed, eps, to - frm, update=None
                                if grad is None else self._step_scale(grad, group))
                continue
            for chunk, mchunk, start in self._chunks(p, master):
                # d = eps z, zero outside the mask: every move below is a plain dense add
                if fused:
                    d = kernels.zo_direction(chunk.numel(), seed, eps, start=start,
                                             device=chunk.device).view(chunk.shape)
                else:
                    d = torch.randn(chunk.shape, generator=gen, device=chunk.device,
                                    dtype=torch.float32)
                    _sticky(d.mul_(eps))
                if q is not None:
                    bits = masks[index][start // 8:(start + chunk.numel() + 7) // 8]
                    if frm == 0:
                        ref = chunk if mchunk is None else mchunk
                        bits.copy_(pack_bits(((ref <= tau) & (ref >= -tau)).reshape(-1)))
                    d.mul_(unpack_bits(bits, chunk.numel()).view(chunk.shape))
                if mchunk is None:
                    for _ in range(abs(to - frm)):
                        chunk.add_(d) if to > frm else chunk.sub_(d)
                elif to != 0:
                    chunk.copy_(torch.add(mchunk, d, alpha=to))
                if grad is not None:
                    self._update(chunk, mchunk, d, grad, group, p.dim() >= 2)
                elif mchunk is not None and to == 0:
                    chunk.copy_(mchunk)

    def _update(self, chunk: torch.Tensor, mchunk: torch.Tensor | None, d: torch.Tensor,
                grad: float, group: dict[str, Any], decays: bool) -> None:
        """theta <- theta - lr * (g z + wd theta) on one chunk (and its float32 copy), with
        z = d / eps the direction actually perturbed along (d is zero outside a sparse mask;
        so is the weight decay there). Consumes ``d``."""
        lr = group["lr"]
        target = chunk if mchunk is None else mchunk
        decay = None
        if decays and group["weight_decay"]:
            decay = target * (-lr * group["weight_decay"])
            if group["density"] is not None:
                decay.mul_(d != 0)  # d has its lowest bit set inside the mask: never zero there
        step = d.mul_(self._step_scale(grad, group))
        target.add_(step if decay is None else step + decay)  # float64 stays float64
        if mchunk is not None:
            chunk.copy_(mchunk)

    def _step_scale(self, grad: float, group: dict[str, Any]) -> float:
        """−lr·g/eps: the update is this times d (= eps z), g the projected gradient or, with
        ``sign``, its sign."""
        g = math.copysign(1.0, grad) if self.sign and grad != 0 else grad
        return -group["lr"] * g / group["eps"]

    def _evaluate(self, closure: Callable[[], Any], trained: list, at: int,
                  masks: dict[int, torch.Tensor]) -> float:
        """closure() at offset ``at``; on an exception or a non-finite value the parameters are
        restored before the error propagates."""
        try:
            value = closure()
            loss = float(value.detach() if isinstance(value, torch.Tensor) else value)
        except BaseException:
            self._move(trained, at, 0, masks)
            raise
        if not math.isfinite(loss):
            self._move(trained, at, 0, masks)
            raise MeZOError(f"MeZO step {self.steps_done}: the closure returned {loss} at the "
                            f"{'+' if at > 0 else '-'}eps perturbation; parameters restored, "
                            f"step not taken (lower eps or check the objective)")
        return loss

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """One MeZO step on the closure's batch; returns (L+ + L-) / 2."""
        if closure is None:
            raise MeZOError("MeZO.step needs a closure that returns the loss of the current "
                            "batch (it is evaluated twice, at theta + eps z and theta - eps z)")
        trained = self._trained()
        eps = self._eps_of(trained)
        masks: dict[int, torch.Tensor] = {}
        self._move(trained, 0, 1, masks)
        loss_plus = self._evaluate(closure, trained, 1, masks)
        self._move(trained, 1, -1, masks)
        loss_minus = self._evaluate(closure, trained, -1, masks)
        grad = (loss_plus - loss_minus) / (2 * eps)
        self._move(trained, -1, 0, masks, grad=grad)
        self.last_projected_grad = grad
        self.steps_done += 1
        return (loss_plus + loss_minus) / 2

    def _eps_of(self, trained: list[tuple[int, torch.Tensor, dict[str, Any]]]) -> float:
        """The eps of the step: every group perturbed must share one, since g is one scalar."""
        values = {group["eps"] for _, _, group in trained}
        if len(values) != 1:
            raise MeZOError(f"MeZO: parameter groups must share one eps (g is a single "
                            f"finite difference), got {sorted(values)}" if values else
                            "MeZO: no parameter requires grad; nothing to train")
        return values.pop()

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer state plus the step count, seed and options, so a run resumed
        from it draws the same perturbations (and float32 copies with ``master_weights``)."""
        out = super().state_dict()
        out["mezo"] = {"steps_done": self.steps_done, "seed": self.seed,
                       "master_weights": self.master_weights, "sign": self.sign,
                       "backend": self.backend, "last_projected_grad": self.last_projected_grad}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; float32 copies stay float32 (the base class would cast
        them to the parameters' dtype)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("mezo", None)
        if extra is None:
            raise MeZOError("MeZO.load_state_dict: not a MeZO state (no 'mezo' entry)")
        masters = {k: v["master"] for k, v in state_dict.get("state", {}).items()
                   if "master" in v}
        state_dict["state"] = {k: {n: t for n, t in v.items() if n != "master"}
                               for k, v in state_dict.get("state", {}).items()}
        # states saved before the rename call the density "sparsity" (same meaning)
        state_dict["param_groups"] = [
            {("density" if k == "sparsity" else k): v for k, v in group.items()}
            for group in state_dict.get("param_groups", [])]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for key, master in masters.items():
            p = params[int(key)]
            self.state[p]["master"] = master.to(device=p.device, dtype=torch.float32, copy=True)
        self.steps_done = int(extra["steps_done"])
        self.seed = int(extra["seed"])
        self.master_weights = bool(extra["master_weights"])
        self.sign = bool(extra["sign"])
        self.backend = extra.get("backend")  # states saved before the kernels have none
        self.last_projected_grad = extra["last_projected_grad"]
