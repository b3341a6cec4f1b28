"""Write a merge of LoRA adapters as a PEFT adapter dir when the method keeps low rank.

Task arithmetic (and a normalized linear average) of LoRAs is exactly a LoRA again:
Σt ct·Bt·At·st = [c1·s1·B1, ..., cT·sT·BT] @ [A1; ...; AT], a rank Σ rt adapter per module
(the "cat" combination of PEFT's ``add_weighted_adapter``). It is written with scaling 1
(``lora_alpha`` = r per module) so the factors carry every coefficient, and loads with
``PeftModel.from_pretrained(base, out)``; its ``base_model_name_or_path`` is where the merge's
base came from (a path, or the Hub repo a store entry was pulled from), so that
``AutoPeftModel.from_pretrained(out)`` finds it too. Written when asked for (``--format
peft``; by default a merge writes the whole model). TIES, DARE and the other sparsifying methods change
the dense deltas entrywise and have no such form: they write a full HF model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from mergehub.merge.methods.family import GeneralizedTaskArithmetic
from mergehub.merge.methods.linear import Linear
from mergehub.merge.recipe import resolve_params
from mergehub.merge.tensors import MergeResult
from mergehub.storage.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mergehub.storage.safetensors_format import SAFETENSORS_DTYPE, TensorSpec
from mergehub.storage.store import StoredModel, base_reference
from mergehub.storage.writer import write_model_dir


def lora_coefficients(plan: Any, target: str) -> list[float] | None:
    """Each input's coefficient on its delta for ``target``, or ``None`` if the method's result
    is not a linear combination of the deltas with these parameters."""
    method = plan.method
    plain = isinstance(method, GeneralizedTaskArithmetic) and method.member.linear
    if not (plain or isinstance(method, Linear)):
        return None
    params = [resolve_params(p, target, plan.num_layers) for p in plan.model_params]
    weights = [float(p["weight"]) for p in params]
    if plain:
        total = sum(weights) if method.params["normalize"] else 1.0
        total = total if abs(total) >= 1e-8 else 1.0
        return [float(method.params["lambda"]) * w / total for w in weights]
    if isinstance(method, Linear) and method.params["normalize"] and sum(weights) != 0:
        return [w / sum(weights) for w in weights]
    return None


def can_write_peft(plan: Any) -> bool:
    """Whether this plan's result is exactly a LoRA: all inputs LoRA in the same layout and a
    method whose result is a linear combination of their deltas."""
    if not plan.inputs or plan.base is None or not all(s.is_lora for s in plan.inputs):
        return False
    if len({s.lora_config.get("fan_in_fan_out", False) for s in plan.inputs}) != 1:
        return False
    targets = {t for s in plan.inputs for t in s.lora}
    return all(lora_coefficients(plan, t) is not None for t in targets)


def execute_peft(plan: Any, out: Path, *, device: str = "cpu", seed: int = 0,
                 max_shard_size: int | str = 0, overwrite: bool = False,
                 progress: bool | None = None) -> Any:
    """Run a plan whose result is a LoRA (see :func:`can_write_peft`): write a PEFT adapter dir
    (same signature and result as :func:`mergehub.merge.engine.execute`)."""
    start = time.perf_counter()
    specs = write_peft(plan, out, overwrite=overwrite)
    return MergeResult(Path(out), len(specs), sum(s.nbytes for s in specs),
                       time.perf_counter() - start, plan=plan, format="peft")


def write_peft(plan: Any, out: Path, *, overwrite: bool = False) -> list[TensorSpec]:
    """Write the merged adapter (concatenated factors) as a PEFT dir; return its tensor specs."""
    factors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for target in sorted({t for s in plan.inputs for t in s.lora}):
        coefs = lora_coefficients(plan, target)
        names, a_parts, b_parts = None, [], []
        for src, c in zip(plan.inputs, coefs):
            if target in src.lora:
                a_name, b_name, scaling, _ = src.lora[target]
                names = names or (a_name, b_name)
                a_parts.append(src.reader.load(a_name).float())
                b_parts.append(src.reader.load(b_name).float() * (c * scaling))
        factors[names[0]] = torch.cat(a_parts, dim=0)
        factors[names[1]] = torch.cat(b_parts, dim=1)
        ranks[target.removesuffix(".weight")] = factors[names[0]].shape[0]
    reader = plan.base.reader
    config = _adapter_config(plan.inputs[0].lora_config, ranks, base_reference(
        plan.base.label, reader.store if isinstance(reader, StoredModel) else None))
    specs = [TensorSpec(n, SAFETENSORS_DTYPE[t.dtype], tuple(t.shape)) for n, t in factors.items()]
    write_model_dir(out, specs, lambda s: factors[s.name].contiguous(),
                    side_files={ADAPTER_CONFIG: (json.dumps(config, indent=2) + "\n").encode()},
                    overwrite=overwrite, progress=False, weights_name=ADAPTER_WEIGHTS)
    return specs


def _adapter_config(first: dict[str, Any], ranks: dict[str, int],
                    base: str | None) -> dict[str, Any]:
    """The first input's adapter config with the merged ranks, scaling 1 everywhere, and the
    merge's base as ``base_model_name_or_path``."""
    r = max(ranks.values())
    module_names = [m.removeprefix("base_model.model.") for m in ranks]
    return {**first, "base_model_name_or_path": base, "r": r, "lora_alpha": r,
            "use_rslora": False, "use_dora": False,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in module_names}),
            "rank_pattern": {m: k for m, k in zip(module_names, ranks.values()) if k != r},
            "alpha_pattern": {m: k for m, k in zip(module_names, ranks.values()) if k != r}}
