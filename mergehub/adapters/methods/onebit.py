"""1-bit adapters (Jie et al. 2023, "Revisiting the parameter efficiency of adapters from the
perspective of precision redundancy").

The adapter here is a peft LoRA (any ``peft:`` LoRA options); its A and B weights run through a
1-bit code in the forward pass, per group (``group: matrix``, the authors', or ``group: row``:
each output channel). Two quantizers (``quantizer``):

* ``normal`` (the default; the authors' code, ``QLinear`` of their ``binary_adapter/utils.py``):
  the group is standardised, z = (W − μ) / (σ + 1e-5) with μ its mean and σ its standard
  deviation (n − 1 in the denominator, torch's default), and quantized to the two levels of a
  1-bit Lloyd quantizer for a standard normal started from zero, ±Φ⁻¹(3/4) = ±0.6745; so
  Wq = μ ± 0.6745·σ. The backward pass is the authors' estimator: straight through the
  rounding of z only, so the gradient also flows through μ and σ (d Wq / dW = σ·dz/dW +
  code·dσ/dW + dμ/dW). The authors initialise the up-projection (LoRA's B) from a normal with
  std 1e-3 truncated at ±2e-3 rather than zero, since a constant matrix has σ = 0 and would
  stay constant under this estimator; mergehub does the same for B.
* ``meanabs`` (a mergehub option): Wq = α·sign(W − μ) + μ with μ = mean(W) (``mean: true``; 0
  with ``mean: false``) and α = mean|W − μ|, the scale that minimizes the L2 error for the
  fixed sign pattern (0.6745σ minimizes it only for normally distributed weights), and a pure
  straight-through estimator: the gradient reaches W unchanged and nothing flows through α or
  μ. B starts at peft's zero.

Both give exactly two values per group, μ ± α (α = 0.6745σ for ``normal``), with entries at the
mean (z = 0) on the upper level; the authors' forward maps them to μ itself (sign(0) = 0), a
third value their saved file cannot hold (it stores them as the lower level).

**Storage.** The adapter dir written at the end is a standard peft dir whose tensors are the
quantized Wq (two values per group, so peft, ``hub merge`` and ``hub export`` read it as any
LoRA), plus ``adapter_model.1bit.safetensors``: per tensor the sign bits packed 8 per byte and
α and μ per group as float32, about 1 bit per weight (the authors store one bit per weight and
μ, σ per matrix likewise). :func:`unpack` rebuilds Wq from it, bit for bit in float32.

The ``onebit`` method (:class:`OneBitMethod`) trains such an adapter; its parameters are
``group``, ``quantizer`` and ``mean``.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
from torch.nn.utils import parametrize

from mergehub.adapters.methods.base import register
from mergehub.adapters.methods.lora import PeftMethod, lora_layers
from mergehub.adapters.schema import ConfigError
from mergehub.errors import InputError
from mergehub.kernels.deltas import pack_bits, unpack_bits

PACKED_FILE = "adapter_model.1bit.safetensors"
FORMAT, FORMAT_1 = "mergehub-onebit-2", "mergehub-onebit-1"
GROUPS, QUANTIZERS = ("matrix", "row"), ("normal", "meanabs")
#: the two levels of the authors' 1-bit code for a standardised weight are ±Φ⁻¹(3/4): the
#: centroids of the two halves of a standard normal (they hold it in float32)
NORMAL_LEVEL = torch.tensor(NormalDist().inv_cdf(0.75), dtype=torch.float32)
#: added to σ before dividing by it, as in the authors' code
STD_EPS = 1e-5
#: the authors' initialisation of the up-projection (B): N(0, 1e-3²) truncated at ±2e-3
B_INIT_STD, B_INIT_BOUND = 1e-3, 2e-3


def check(group: str, quantizer: str, mean: bool) -> None:
    """Refuse an unknown group or quantizer, and ``mean: false`` where it has no meaning."""
    if group not in GROUPS:
        raise InputError(f"onebit group must be 'matrix' or 'row', not {group!r}")
    if quantizer not in QUANTIZERS:
        raise InputError(f"onebit quantizer must be 'normal' or 'meanabs', not {quantizer!r}")
    if quantizer == "normal" and not mean:
        raise InputError("onebit mean: false needs quantizer: meanabs (the normal quantizer "
                         "always standardises around the mean)")


def _groups(w: torch.Tensor, group: str) -> torch.Tensor:
    """``w`` as (groups, elements per group)."""
    return w.reshape(w.shape[0] if group == "row" and w.dim() >= 2 else 1, -1)


def _code(g: torch.Tensor, quantizer: str, mean: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(upper, α, μ, carrier) of groups ``g`` (groups, elements): which entries take the upper
    level μ + α (the others μ − α), α and μ per group as columns (differentiable where the
    quantizer's estimator passes gradient through them), and a zero-valued tensor that carries
    the estimator's gradient through the rounding itself."""
    if quantizer == "normal":
        mu = g.mean(dim=1, keepdim=True)
        std = g.std(dim=1, keepdim=True, correction=1 if g.shape[1] > 1 else 0)
        z = (g - mu) / (std + STD_EPS)
        return z >= 0, NORMAL_LEVEL.to(g.device) * std, mu, (z - z.detach()) * std
    mu = g.mean(dim=1, keepdim=True) if mean else torch.zeros_like(g[:, :1])
    d = (g - mu).detach()
    return d >= 0, d.abs().mean(dim=1, keepdim=True), mu.detach(), g - g.detach()


def quantize(w: torch.Tensor, group: str = "matrix", quantizer: str = "normal",
             mean: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Wq, α, μ): the 1-bit code of ``w`` per group (α and μ have one entry per group, and
    are detached). Wq holds exactly the two values μ ± α per group and is differentiable
    with respect to ``w`` through the quantizer's estimator (module docstring)."""
    check(group, quantizer, mean)
    g = _groups(w, group)
    upper, alpha, mu, carrier = _code(g, quantizer, mean)
    wq = torch.where(upper, alpha, -alpha) + mu + carrier  # + carrier: exactly + 0
    return wq.reshape(w.shape), alpha.detach().reshape(-1), mu.detach().reshape(-1)


class SignQuant(torch.nn.Module):
    """Parametrization: the forward pass sees the 1-bit code of the latent weight W."""

    def __init__(self, group: str, quantizer: str, mean: bool):
        super().__init__()
        check(group, quantizer, mean)
        self.group, self.quantizer, self.mean = group, quantizer, mean

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return quantize(w, self.group, self.quantizer, self.mean)[0]


def attach(model: torch.nn.Module, group: str, quantizer: str, mean: bool) -> int:
    """Quantize every LoRA A/B weight of a peft model in its forward pass (with the normal
    quantizer, B first gets the authors' small truncated-normal start); how many."""
    check(group, quantizer, mean)
    count = 0
    for layer in lora_layers(model).values():
        for part in (layer.lora_A, layer.lora_B):
            for lin in part.values():
                if quantizer == "normal" and part is layer.lora_B:
                    torch.nn.init.trunc_normal_(lin.weight, std=B_INIT_STD, a=-B_INIT_BOUND,
                                                b=B_INIT_BOUND)
                parametrize.register_parametrization(lin, "weight",
                                                     SignQuant(group, quantizer, mean))
                count += 1
    if not count:
        raise InputError("onebit: the peft config targets no module of this model")
    return count


def detach(model: torch.nn.Module) -> None:
    """Replace every quantized weight by its 1-bit value (Wq), ready for ``save_pretrained``."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, SignQuant) for p in module.parametrizations.weight):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


@torch.no_grad()
def pack(tensors: dict[str, torch.Tensor], group: str, quantizer: str,
         mean: bool) -> dict[str, torch.Tensor]:
    """The packed form of latent adapter tensors: per name the sign bits (uint8, 8 per byte,
    1 = upper level) and α and μ per group (float32)."""
    check(group, quantizer, mean)
    out = {}
    for name, w in tensors.items():
        upper, alpha, mu, _ = _code(_groups(w.float(), group), quantizer, mean)
        out[f"{name}.bits"] = pack_bits(upper.reshape(-1))
        out[f"{name}.alpha"] = alpha.reshape(-1).contiguous()
        out[f"{name}.mu"] = mu.reshape(-1).contiguous()
    return out


def write_packed(adapter_dir: Path, tensors: dict[str, torch.Tensor], group: str,
                 quantizer: str, mean: bool) -> None:
    """Write :data:`PACKED_FILE` beside a saved adapter (shapes and options in its metadata)."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "group": group, "quantizer": quantizer, "mean": json.dumps(mean),
            "shapes": json.dumps({n: list(t.shape) for n, t in tensors.items()})}
    save_file(pack(tensors, group, quantizer, mean), str(adapter_dir / PACKED_FILE),
              metadata=meta)


def unpack(path: Path) -> dict[str, torch.Tensor]:
    """The float32 Wq of every tensor of a packed file (what the adapter was trained with);
    also reads the files of earlier mergehub versions (``mergehub-onebit-1``: a ``bit1``
    codec payload and μ per tensor)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") not in (FORMAT, FORMAT_1):
            raise InputError(f"{path}: not a mergehub 1-bit adapter file")
        out = {}
        for name, shape in json.loads(meta["shapes"]).items():
            mu = f.get_tensor(f"{name}.mu")[:, None]
            if meta["format"] == FORMAT_1:
                out[name] = _unpack_1(f.get_tensor(f"{name}.bit1"), mu, shape)
                continue
            alpha = f.get_tensor(f"{name}.alpha")[:, None]
            count = torch.Size(shape).numel()
            upper = unpack_bits(f.get_tensor(f"{name}.bits"), count).reshape(alpha.shape[0], -1)
            out[name] = (torch.where(upper, alpha, -alpha) + mu).reshape(shape)
    return out


def _unpack_1(payload: torch.Tensor, mu: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A tensor of a ``mergehub-onebit-1`` file: ``bit1`` codec rows around μ."""
    from mergehub.storage.codecs import LOSSY

    rows = mu.shape[0]
    params = {"rows": rows, "shape": [rows, torch.Size(shape).numel() // rows]}
    base = mu.expand(rows, params["shape"][1])
    return LOSSY["bit1"].decode(memoryview(payload.numpy().tobytes()), params, base).reshape(shape)


@register
class OneBitMethod(PeftMethod):
    """LoRA factors trained through a 1-bit code (the module docstring)."""

    name = "onebit"
    params = {"group": "matrix", "quantizer": "normal", "mean": True}

    @classmethod
    def check_params(cls, params, peft, task_type, at, doc):
        super().check_params(params, peft, task_type, at, doc)
        cls.refuse_invalid(lambda: check(*(cls.param_value(params, k)
                                           for k in ("group", "quantizer", "mean"))),
                           at(doc, "method_params") if params else at(doc, "method"))

    def build(self, model, resume):
        model = super().build(model, resume)
        try:
            attach(model, *self.options())
        except InputError as e:  # the model's part: a peft config that targets none of it
            raise ConfigError(f"{self.cfg.source}: {e}") from None
        return model

    def options(self) -> tuple[str, str, bool]:
        """(group, quantizer, mean) of the config."""
        p = self.cfg.param
        return str(p("group")), str(p("quantizer")), bool(p("mean"))

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        latent = {}
        for name, module in self.model.named_modules():
            if hasattr(module, "parametrizations") and "weight" in module.parametrizations:
                saved = name.removesuffix(".default") + ".weight"
                latent[saved] = module.parametrizations.weight.original.detach().float().cpu()
        detach(self.model)
        kind, facts = super().save(out, dtype)
        if kind == "adapter":
            write_packed(out, latent, *self.options())
            facts["onebit_packed_bytes"] = (out / PACKED_FILE).stat().st_size
        return kind, facts
