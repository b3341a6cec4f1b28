"""Sparse fine-tuning with a fixed FISH mask (Sung et al. 2021, "Training neural networks with
fixed sparse masks").

Before training, squared gradients are accumulated per entry over ``fisher_batches`` batches
(the empirical Fisher information); in every selected tensor the ``density`` fraction of
entries with the largest Fisher values form the mask (at least one entry per tensor). Only
those entries are trained: each selected weight W0 is reparametrized as
``W = W0.flatten().index_add(0, idx, values)``, with the k ``values`` the only trainable
parameters (so optimizer state exists only for the masked entries, and entries outside the
mask are never written: after training they are bit-identical to the base, also after saving
in the base's dtype). ``include`` / ``exclude`` are regular expressions on parameter names
(default: every parameter of two or more dimensions, i.e. the weight matrices and embeddings).

The result is saved as a full HF model and stored as a fine-tune of its base: the store's
lossless delta codec keeps only what differs, so the stored size follows the density (see
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch.nn.utils import parametrize

from mergehub.errors import InputError


class SparseDelta(torch.nn.Module):
    """Parametrization ``W0 -> W0 + scatter(idx, values)``: only ``values`` is trainable."""

    def __init__(self, idx: torch.Tensor):
        super().__init__()
        self.register_buffer("idx", idx)
        self.values = torch.nn.Parameter(torch.zeros(idx.numel()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(-1).index_add(0, self.idx, self.values.to(w.dtype)).reshape(w.shape)


def select(model: torch.nn.Module, include: str | None, exclude: str | None) -> dict[str, torch.nn.Parameter]:
    """The parameters the mask is computed over, by name."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    out = {n: p for n, p in model.named_parameters()
           if (inc.search(n) if inc else p.dim() >= 2) and not (exc and exc.search(n))}
    if not out:
        raise InputError(f"sparse: no parameter matches include={include!r} exclude={exclude!r}")
    return out


def fisher_masks(model: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                 batches: Iterable[dict[str, torch.Tensor]], density: float) -> dict[str, torch.Tensor]:
    """Indices (flat, sorted) of the top ``density`` entries of Σ grad² per tensor."""
    if not 0 < density <= 1:
        raise InputError(f"sparse: density must be in (0, 1], got {density}")
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    out = {}
    for n, f in fisher.items():
        k = max(1, round(density * f.numel()))
        out[n] = f.reshape(-1).topk(k).indices.sort().values
    return out


def attach(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    """Freeze the model and reparametrize each masked weight; the trainable values by name."""
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    out = {}
    for name, idx in masks.items():
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        parametrize.register_parametrization(module, attr, SparseDelta(idx))
        out[name] = getattr(module.parametrizations, attr)[0].values
    return out


def detach(model: torch.nn.Module) -> None:
    """Write W0 + delta into every reparametrized weight and drop the parametrizations."""
    for module in list(model.modules()):
        for attr in list(getattr(module, "parametrizations", {}) or {}):
            if any(isinstance(p, SparseDelta) for p in getattr(module.parametrizations, attr)):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def masks_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The masks (flat indices) attached to a model, by parameter name."""
    out = {}
    for mname, module in model.named_modules():
        for attr in list(getattr(module, "parametrizations", {}) or {}):
            for p in getattr(module.parametrizations, attr):
                if isinstance(p, SparseDelta):
                    out[f"{mname}.{attr}" if mname else attr] = p.idx
    return out

