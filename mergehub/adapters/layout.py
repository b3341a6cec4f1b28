"""Results named after their base: a trained model's tensors saved under the base's names.

A task model can spell its tensors differently from the base it was loaded from (a bare
``BertModel`` base has no ``bert.`` prefix) and may not use all of them (a pooler, another
head); :class:`BaseLayout` lines a saved result up with its base tensor by tensor, so the store
keeps it as a delta of the base. :func:`save_full` is how every method saves a whole model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mergehub.errors import InputError
from mergehub.storage.checkpoint import open_checkpoint


@dataclass
class BaseLayout:
    """The tensor names of the base a model was loaded from, so that a saved result lines up
    with its base tensor by tensor: a task model's ``PREFIX.name`` is saved as ``name`` when the
    base spells it so, and base tensors the task model lacks (a pooler a masked LM does not
    use, another head) are copied over unchanged."""

    base_dir: Path
    names: set[str]

    @classmethod
    def of(cls, base_dir: Path) -> "BaseLayout":
        return cls(base_dir, set(open_checkpoint(base_dir).tensors))

    def saved_name(self, name: str, prefix: str) -> str:
        """The name ``name`` of the task model is saved under."""
        if name not in self.names and prefix and name.startswith(prefix + "."):
            stripped = name[len(prefix) + 1:]
            if stripped in self.names:
                return stripped
        return name

    def new_names(self, model: torch.nn.Module) -> list[str]:
        """The model's tensors the base has under no spelling (a new head); a tensor tied to
        one the base has (a masked LM's decoder, tied to the word embeddings) is not new."""
        prefix = getattr(model, "base_model_prefix", "")
        ties: dict[tuple[int, tuple[int, ...]], list[str]] = {}
        for name, t in model.state_dict().items():
            ties.setdefault((t.data_ptr(), tuple(t.shape)), []).append(name)
        return [n for names in ties.values()
                if not any(self.saved_name(m, prefix) in self.names for m in names)
                for n in names]

    def check(self, model: torch.nn.Module, where: str) -> None:
        """Refuse a task model that shares no tensor with the base (another architecture)."""
        prefix = getattr(model, "base_model_prefix", "")
        if not any(self.saved_name(n, prefix) in self.names for n in model.state_dict()):
            raise InputError(f"{where}: the {type(model).__name__} built from base "
                             f"{self.base_dir} shares no tensor name with the base's weights")

    def align(self, out: Path, prefix: str) -> None:
        """Rename the weights ``save_pretrained`` wrote to ``out`` and add the base tensors
        they lack (unchanged, in the base's dtype), rewriting only what changes."""
        from safetensors.torch import load_file, save_file

        index_path = next(out.glob("*.safetensors.index.json"), None)
        files = sorted(p.name for p in out.glob("*.safetensors"))
        renamed: dict[str, dict[str, torch.Tensor]] = {}
        changed: set[str] = set()
        for f in files:
            tensors = load_file(str(out / f))
            renamed[f] = {self.saved_name(n, prefix): t for n, t in tensors.items()}
            if set(renamed[f]) != set(tensors):
                changed.add(f)
        carry = sorted(self.names - {n for tensors in renamed.values() for n in tensors})
        if carry:
            with open_checkpoint(self.base_dir) as base:
                renamed[files[-1]].update({n: base.load(n).clone() for n in carry})
            changed.add(files[-1])
        for f in sorted(changed):
            save_file(renamed[f], str(out / f), metadata={"format": "pt"})
        if index_path is not None:
            index = json.loads(index_path.read_text())
            index["weight_map"] = {n: f for f in files for n in renamed[f]}
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_full(model: torch.nn.Module, out: Path, dtype: torch.dtype,
              layout: BaseLayout | None = None) -> None:
    """``save_pretrained`` in ``dtype``, named after the base's tensors when ``layout`` says."""
    model.to(dtype).save_pretrained(out)
    if layout is not None:
        layout.align(out, getattr(model, "base_model_prefix", ""))
