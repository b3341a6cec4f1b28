"""Which checkpoint tensor fills which tensor of a live model, by name.

Checkpoint names are matched to the model's state-dict names as ``from_pretrained`` matches
them for the common cases: equal names, a checkpoint of the bare model loaded into a model
with a head (or the reverse: the ``base_model_prefix``), the class's
``_checkpoint_conversion_mapping`` and the legacy ``gamma``/``beta`` of layer norms; PEFT's
wrapping of an attached adapter is looked through. :func:`mergehub.load` fills a model this
way and :class:`mergehub.Composer` finds the parameters a merged tensor belongs to.
"""

from __future__ import annotations

import re

import torch


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and persistent buffers by state-dict name (the live tensors,
    not copies), with PEFT's wrapping removed from the names (``base_model.model.`` and
    ``.base_layer``), so the names stay those of the plain model after an adapter is
    attached."""
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if ".lora_" in name or "lora_magnitude_vector" in name:
            continue
        out[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = tensor
    return out


_LEGACY = ((re.compile(r"(LayerNorm|layer_norm|layernorm)\.gamma$"), r"\1.weight"),
           (re.compile(r"(LayerNorm|layer_norm|layernorm)\.beta$"), r"\1.bias"))


def match_names(model: torch.nn.Module, names: list[str],
                tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Checkpoint tensor name -> the model's state-dict name it fills (see the module
    docstring for the rules); names without a place in the model are left out."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    conversions = [(re.compile(pattern), repl) for pattern, repl in
                   (getattr(model, "_checkpoint_conversion_mapping", None) or {}).items()]
    out = {}
    for name in names:
        candidates = [name]
        for pattern, repl in conversions + list(_LEGACY):
            converted = pattern.sub(repl, name)
            if converted != name:
                candidates.append(converted)
        for cand in list(candidates):
            if prefix and cand.startswith(prefix + "."):
                candidates.append(cand[len(prefix) + 1:])
            elif prefix:
                candidates.append(f"{prefix}.{cand}")
        found = next((c for c in candidates if c in tensors), None)
        if found is not None:
            out[name] = found
    return out
