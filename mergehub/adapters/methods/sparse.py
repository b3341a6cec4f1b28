"""Sparse fine-tuning with a fixed FISH mask (Sung et al. 2021, "Training neural networks with
fixed sparse masks").

Before training, the empirical Fisher information of every entry is estimated as FISH does:
the mean over examples of the squared gradient of each example's own loss (FISH takes the
gradients at batch size 1; here each of the ``fisher_batches`` batches is split into single
examples), not the square of a batch's mean gradient, which lets the examples' gradients
cancel. The mask keeps the entries with the largest Fisher values: ``scope: global`` (FISH's)
ranks the entries of all selected tensors together and keeps k = int(density · their total
size), so tensors that matter more get more entries (some may get none); ``scope: tensor``
keeps the top ``density`` fraction of each tensor (round(density · size), at least one). Ties
are broken by position, lowest first (tensors in the model's parameter order), so the mask is
the same on every run. Only those entries are trained: each selected weight W0 is
reparametrized as ``W = W0.flatten().index_add(0, idx, values)``, with the k ``values`` the
only trainable parameters (so optimizer state exists only for the masked entries, and entries
outside the mask are never written: after training they are bit-identical to the base, also
after saving in the base's dtype). ``include`` / ``exclude`` are regular expressions on
parameter names (default: every parameter of two or more dimensions, i.e. the weight matrices
and embeddings).

The result is saved as a full HF model and stored as a fine-tune of its base: the store's
lossless delta codec keeps only what differs, so the stored size follows the density (see
``benchmarks/RESULTS.md``).

The ``sparse`` method (:class:`SparseMethod`) trains so; its parameters are ``density``,
``scope``, ``fisher_batches``, ``include`` and ``exclude``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import parametrize

from mergehub.adapters.layout import save_full
from mergehub.adapters.methods.base import Method, register
from mergehub.errors import InputError


class SparseDelta(torch.nn.Module):
    """Parametrization ``W0 -> W0 + scatter(idx, values)``: only ``values`` is trainable."""

    def __init__(self, idx: torch.Tensor):
        super().__init__()
        self.register_buffer("idx", idx)
        self.values = torch.nn.Parameter(torch.zeros(idx.numel(), device=idx.device))

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


SCOPES = ("global", "tensor")


def check(density: float, scope: str) -> None:
    """Refuse a density outside (0, 1] or an unknown scope."""
    if not 0 < density <= 1:
        raise InputError(f"sparse: density must be in (0, 1], got {density}")
    if scope not in SCOPES:
        raise InputError(f"sparse: scope must be 'global' or 'tensor', not {scope!r}")


def _examples(batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """The examples of a batch one at a time, each as a batch of one."""
    for i in range(len(next(iter(batch.values())))):
        yield {k: v[i:i + 1] for k, v in batch.items()}


def fisher_information(model: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                       batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per entry of each of ``params``, the mean over the examples of ``batches`` of the
    squared gradient of that example's loss (``model(**example).loss``), in float32."""
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    examples = 0
    for batch in batches:
        for example in _examples(batch):
            model.zero_grad(set_to_none=True)
            model(**example).loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float().square()
            examples += 1
    model.zero_grad(set_to_none=True)
    if not examples:
        raise InputError("sparse: no examples to estimate the Fisher information from")
    return {n: f.div_(examples) for n, f in fisher.items()}


def top_positions(values: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat positions of the ``k`` largest ``values``, ties by position (lowest
    first), so the selection does not depend on how ``topk`` orders equal values."""
    flat = values.reshape(-1)
    kth = flat.topk(k).values[-1]
    above = torch.nonzero(flat > kth).reshape(-1)
    tied = torch.nonzero(flat == kth).reshape(-1)[:k - above.numel()]
    return torch.cat([above, tied]).sort().values


def top_masks(fisher: dict[str, torch.Tensor], density: float,
              scope: str = "global") -> dict[str, torch.Tensor]:
    """Flat, sorted indices of the entries to train by tensor name (module docstring);
    tensors that keep no entry (global scope) are left out."""
    check(density, scope)
    if scope == "tensor":
        return {n: top_positions(f, max(1, round(density * f.numel())))
                for n, f in fisher.items()}
    flat = torch.cat([f.reshape(-1) for f in fisher.values()])
    kept = top_positions(flat, max(1, int(density * flat.numel())))
    out, start = {}, 0
    for n, f in fisher.items():
        stop = start + f.numel()
        lo, hi = torch.searchsorted(kept, torch.tensor([start, stop], device=kept.device))
        if hi > lo:
            out[n] = kept[lo:hi] - start
        start = stop
    return out


def fisher_masks(model: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                 batches: Iterable[dict[str, torch.Tensor]], density: float,
                 scope: str = "global") -> dict[str, torch.Tensor]:
    """The FISH mask of ``params``: :func:`top_masks` of :func:`fisher_information`."""
    check(density, scope)  # before the backward passes
    return top_masks(fisher_information(model, params, batches), density, scope)


def attach(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    """Freeze the model and reparametrize each masked weight; the trainable values by name."""
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    out = {}
    for name, idx in masks.items():
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        weight = getattr(module, attr)  # a resumed mask comes from the CPU
        parametrize.register_parametrization(module, attr, SparseDelta(idx.to(weight.device)))
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


@register
class SparseMethod(Method):
    """FISH-mask sparse fine-tuning (the module docstring)."""

    name = "sparse"
    params = {"density": 0.01, "scope": "global", "fisher_batches": 8, "include": None,
              "exclude": None}

    @classmethod
    def check_params(cls, params, peft, task_type, at, doc):
        super().check_params(params, peft, task_type, at, doc)
        cls.refuse_invalid(lambda: check(float(cls.param_value(params, "density")),
                                         cls.param_value(params, "scope")),
                           at(doc, "method_params") if params else at(doc, "method"))

    def build(self, model, resume):
        p = self.cfg.param
        selected = select(model, p("include"), p("exclude"))
        if resume is not None:  # a global mask may leave a tensor out
            masks = {n: resume[0][f"mask:{n}"] for n in selected if f"mask:{n}" in resume[0]}
        else:
            model.requires_grad_(True)
            device = next(model.parameters()).device
            batches = (self.dataset.batch(10**9 + i, self.cfg.batch_size, self.cfg.seed)
                       .to(device).kwargs() for i in range(int(p("fisher_batches"))))
            masks = fisher_masks(model, selected, batches, float(p("density")),
                                        str(p("scope")))
        attach(model, masks)
        return model

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().state_tensors(),
                **{f"mask:{n}": idx for n, idx in masks_of(self.model).items()}}

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        masked = sum(idx.numel() for idx in masks_of(self.model).values())
        detach(self.model)
        save_full(self.model, out, dtype, self.layout)
        return "finetune", {"sparse_entries": masked}
