"""LoRA and every other peft tuner: the ``lora`` method, and the peft pieces other methods use.

**peft tuners.** A config's ``peft:`` mapping is handed to peft as it is: ``peft_type`` picks
the tuner (``LORA`` by default; ``ADALORA``, ``IA3``, ``LOHA``, ``LOKR``, ``VERA``, ``OFT``,
... whatever the installed peft has) and every other key is an option of that tuner's config
class (for LoRA: ``r``, ``lora_alpha``, ``use_rslora``, ``use_dora``, ``target_modules``,
``init_lora_weights`` (``pissa``, ``olora``, ...), ``rank_pattern``, ...). peft rejects unknown
options; the message names the config line. Results are standard adapter dirs
(``adapter_config.json`` + ``adapter_model.safetensors``, ``PeftModel.save_pretrained``), or,
for an adapter ``hub merge`` cannot read as a dense delta, the base with it merged in
(:func:`save_peft`).

IncreLoRA (:mod:`mergehub.adapters.methods.incrlora`), the 1-bit adapters
(:mod:`mergehub.adapters.methods.onebit`) and MeZO over an adapter build on
:func:`wrap_peft` and :func:`save_peft`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergehub.adapters.layout import BaseLayout, save_full
from mergehub.adapters.methods.base import Method, register
from mergehub.adapters.schema import ConfigError, TrainConfig

PEFT_PREFIX = "base_model.model."
#: LoRA inits that rewrite the base weights (the adapter alone is not a delta of the base)
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "orthogonal")


def peft_config(spec: dict[str, Any], where: str, steps: int) -> Any:
    """The peft config object ``spec`` (a config's ``peft:`` mapping) describes."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    spec = dict(spec)
    peft_type = str(spec.pop("peft_type", "LORA")).upper()
    try:
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)]
    except (ValueError, KeyError):
        known = ", ".join(sorted(t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING))
        raise ConfigError(f"{where}: unknown peft_type {peft_type!r} (this peft has {known})") from None
    spec.setdefault("task_type", "CAUSAL_LM")
    if peft_type == "ADALORA":
        spec.setdefault("total_step", steps)
    try:
        return cls(**spec)
    except TypeError as e:
        raise ConfigError(f"{where}: peft {peft_type}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: peft {peft_type}: {e}") from None


def is_plain_lora(config: Any) -> bool:
    """Whether the adapter is a dense delta B·A·scaling of the base (what ``hub merge`` reads
    from an adapter dir): LoRA, without DoRA, with an init that leaves the base weights as
    they are, and no whole modules of its own (``modules_to_save``: a classifier's head)."""
    init = getattr(config, "init_lora_weights", True)
    return (str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type)
            == "LORA" and not getattr(config, "use_dora", False)
            and not getattr(config, "modules_to_save", None)
            and not (isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS)))


def lora_layers(model: torch.nn.Module, adapter: str = "default") -> dict[str, Any]:
    """The peft LoRA layers of ``model`` by module name in the base model."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX): m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


#: AdaLoRA's rank allocator's per-weight scores (peft ``RankAllocator``): its state across steps
ADALORA_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def rank_allocator(model: torch.nn.Module) -> Any:
    """A peft model's AdaLoRA rank allocator (``None`` for other tuners)."""
    return getattr(model.base_model, "rankallocator", None)


@register
class PeftMethod(Method):
    """A peft tuner (LoRA by default) trained with AdamW."""

    name = "lora"
    peft = True

    def build(self, model, resume):
        wrapped = wrap_peft(model, self.cfg)
        allocator = rank_allocator(wrapped)
        if resume is not None and allocator is not None:  # AdaLoRA: its allocator's state
            tensors, state = resume
            for kind in ADALORA_SCORES:
                prefix = f"adalora-{kind}:"
                setattr(allocator, kind, {n[len(prefix):]: t.clone() for n, t in tensors.items()
                                          if n.startswith(prefix)})
            if state.get("rank_pattern") is not None:
                wrapped.peft_config["default"].rank_pattern = state["rank_pattern"]
        return wrapped

    def before_zero_grad(self, step: int) -> None:
        if hasattr(self.model.base_model, "update_and_allocate"):  # AdaLoRA's rank allocation
            self.model.base_model.update_and_allocate(step)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, and AdaLoRA's smoothed importance scores (a resumed run
        allocates ranks from them as the uninterrupted one does)."""
        out = super().state_tensors()
        allocator = rank_allocator(self.model)
        for kind in ADALORA_SCORES if allocator is not None else ():
            out.update({f"adalora-{kind}:{n}": t for n, t in getattr(allocator, kind).items()})
        return out

    def extra_state(self) -> dict[str, Any]:
        """AdaLoRA's rank pattern once it has one (which ranks its masks keep)."""
        if rank_allocator(self.model) is None:
            return {}
        return {"rank_pattern": self.model.peft_config["default"].rank_pattern}

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        return save_peft(self.model, self.cfg, out, dtype, self.layout)


#: the peft task type of each ``task_type`` (peft keeps a classifier's head trainable and
#: saves it with the adapter, ``modules_to_save``)
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "masked_lm": None}


def wrap_peft(model: torch.nn.Module, cfg: TrainConfig, **overrides: Any) -> torch.nn.Module:
    """``model`` wrapped with the config's peft tuner (``overrides`` win over ``peft:``)."""
    from peft import get_peft_model

    spec = {"task_type": PEFT_TASK_TYPES[cfg.task_type],
            **(cfg.peft or {"target_modules": "all-linear"}), **overrides}
    return get_peft_model(model, peft_config(spec, f"{cfg.source} (peft)", cfg.steps))


def save_peft(model: torch.nn.Module, cfg: TrainConfig, out: Path, dtype: torch.dtype,
              layout: BaseLayout | None = None) -> tuple[str, dict[str, Any]]:
    """An adapter dir, or (``output.as: merged``, or ``auto`` for an adapter that is not a
    plain delta, such as a classifier's LoRA with its head) the base with the adapter merged
    in."""
    config = model.peft_config["default"]
    # peft would look the name up on the Hub while saving (a store name is no repo id there);
    # the output's adapter_config.json gets the base's origin afterwards (_write_output)
    config.base_model_name_or_path = None
    mode = cfg.output.get("as", "auto")
    if mode == "auto":
        mode = "adapter" if is_plain_lora(config) else "merged"
    if mode == "adapter":
        model.to(dtype).save_pretrained(out)
        return "adapter", {"saved_as": "adapter"}
    save_full(model.merge_and_unload(), out, dtype, layout)
    return "finetune", {"saved_as": "merged", "peft_type": str(config.peft_type.value)}
