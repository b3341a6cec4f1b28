"""Adapters kept unmerged on a composer's model: :meth:`PeftAdapters.attach` attaches a stored
LoRA-family entry through ``peft`` (so PEFT's ``set_adapter``, ``disable_adapter``,
``delete_adapter`` and mixed-adapter batches work), and :meth:`PeftAdapters.merge_attached`
folds attached adapters into the weights with any mergehub method, on their exact dense
deltas. A part of :class:`~mergehub.compose.Composer` (which inherits it)."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import torch

from mergehub.errors import BaseMismatchError, InputError
from mergehub.storage.checkpoint import ADAPTER_CONFIG
from mergehub.storage.store import Store, names_entry

if TYPE_CHECKING:
    from mergehub.compose.composer import Active


class PeftAdapters:
    """The PEFT side of a :class:`~mergehub.compose.Composer`: the adapters attached to its
    model (:attr:`attached`, PEFT adapter name -> store entry) and the ``peft.PeftModel``
    wrapping it while any is (:attr:`peft_model`). It merges through the Composer's
    :meth:`~mergehub.compose.Composer.apply` and compares bases with its ``_same_model``."""

    # the Composer's attributes this part reads
    store: Store | None
    base: str | None
    model: torch.nn.Module
    device: torch.device
    peft_model: Any
    attached: dict[str, str]

    def attach(self, name: str, adapter_name: str | None = None) -> Any:
        """Attach the stored LoRA-family entry ``name`` to the model as a PEFT adapter
        (``adapter_name``, default: the entry's name with other characters than letters,
        digits and ``_`` replaced by ``_``); returns the ``peft.PeftModel`` wrapping the
        model (the same one on every attach).

        The first adapter attached is active; later ones are added inactive, as PEFT's
        ``add_adapter`` does (``peft_model.set_adapter(...)`` picks; forward calls take
        ``adapter_names=[...]`` for one adapter per row).
        """
        import peft
        from peft.utils import set_peft_model_state_dict

        if not names_entry(name, self.store):
            where = f" in store {self.store.root}" if self.store is not None else ""
            raise InputError(f"no adapter entry named {name!r}{where}")
        info = self.store.show(name)
        if info.format != "peft":
            raise InputError(f"model {name!r} is a {info.kind} ({info.format}), not a PEFT "
                             "adapter: apply it with a recipe instead")
        if self.base is not None and info.base is not None and not self._same_model(
                info.base, self.base):
            raise BaseMismatchError(f"adapter {name!r} is stored against base {info.base!r}, "
                                    f"not this composer's base {self.base!r}")
        adapter_name = adapter_name or re.sub(r"\W", "_", name)
        if adapter_name in self.attached:
            raise InputError(f"an adapter named {adapter_name!r} is already attached")
        entry = self.store.open(name)
        config = peft.PeftConfig.from_peft_type(**json.loads(entry.side_file(ADAPTER_CONFIG)))
        config.inference_mode = True
        weights = {s.name: entry.load(s.name, device=self.device) for s in entry.specs()}
        if self.peft_model is None:
            self.peft_model = peft.get_peft_model(self.model, config, adapter_name=adapter_name)
        else:
            self.peft_model.add_adapter(adapter_name, config)
        result = set_peft_model_state_dict(self.peft_model, weights, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            self.peft_model.delete_adapter(adapter_name)
            raise InputError(f"adapter {name!r}: tensor {unexpected[0]!r} does not fit the "
                             f"model ({len(unexpected)} such)")
        self.peft_model.eval()
        self.attached[adapter_name] = name
        return self.peft_model

    def merge_attached(self, merge_method: str = "task_arithmetic",
                       adapters: list[str] | dict[str, dict[str, Any]] | None = None, *,
                       parameters: dict[str, Any] | None = None,
                       model_parameters: dict[str, Any] | None = None,
                       seed: int = 0) -> Active:
        """Fold attached adapters into the weights with any mergehub method, on their exact
        dense deltas (the recipe ``hub merge`` would run on their store entries), then remove
        them from the model (and PEFT's wrapping once none is left).

        Args:
            merge_method: any method of ``hub merge`` (``ties``, ``dare_ties``, ...).
            adapters: adapter names (default: all attached), or a dict of adapter name -> its
                own parameters (``{"a": {"weight": 1.0}, "b": {"weight": 0.5}}``).
            parameters: the recipe's global parameters (``lambda``, ``normalize``, ...).
            model_parameters: parameters for every adapter (``{"density": 0.3}``); an
                adapter's own win.
            seed: seed of the random methods.

        Returns :attr:`active`; like :meth:`apply`, :meth:`reset` returns to the bind-time
        weights.
        """
        chosen = dict.fromkeys(self.attached, {}) if adapters is None else (
            dict(adapters) if isinstance(adapters, dict) else dict.fromkeys(adapters, {}))
        unknown = [a for a in chosen if a not in self.attached]
        if unknown:
            raise InputError(f"no attached adapter named {unknown[0]!r} (attached: "
                             f"{', '.join(self.attached) or 'none'})")
        if not chosen:
            raise InputError("no adapters attached to merge")
        recipe = {"merge_method": merge_method,
                  "models": [{"model": self.attached[a],
                              "parameters": {**(model_parameters or {}), **own}}
                             for a, own in chosen.items()],
                  "parameters": parameters or {}}
        active = self.apply(recipe, seed=seed)
        for a in chosen:
            self.peft_model.delete_adapter(a)
            del self.attached[a]
        if not self.attached:
            self.peft_model.unload()
            self.peft_model = None
        return active
