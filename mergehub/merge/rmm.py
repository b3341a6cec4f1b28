"""Running reversible merges (RMM) and reverting their store entries to any input task.

The math (closed-form bases and per-task coefficients, dense or in LoRA factor space) is the
``rmm`` multi-model codec, :mod:`mergehub.storage.codecs.rmm`. The output is a directory (and,
with ``--to-store``, one store entry) of float32 safetensors, for every tensor some task
changes either
``NAME::basis`` (m × shape) and ``NAME::coef`` (T × m) (a dense basis), or ``NAME::left``,
``NAME::left_coef``, ``NAME::right`` and ``NAME::right_coef`` (a basis kept as factors: task t
is (Σj left_coef[t, j]·left[j]) @ (Σj right_coef[t, j]·right[j])); ``rmm.json`` (tasks, m,
basis, base, the relative reconstruction error of every task for every m and the bytes the
basis takes for every m); and the base's config/tokenizer files: the codec's ``bundle``
layout (:mod:`mergehub.storage.codecs.multi`). ``hub export NAME --task T`` (or
:func:`revert`, which is :func:`mergehub.storage.tasks.export_task`) rebuilds task T's full
model.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergehub.merge.plan import side_files
from mergehub.merge.tensors import MergeResult
from mergehub.progress import bar_disabled
from mergehub.storage.codecs.multi import bundle_parts
from mergehub.storage.codecs.rmm import RMM, RMM_FILE, decompose_dense_lowrank, decompose_factors
from mergehub.storage.safetensors_format import TensorSpec
from mergehub.storage.tasks import export_task as revert
from mergehub.storage.writer import DEFAULT_MAX_SHARD_SIZE, write_model_dir

#: ``revert`` is :func:`~mergehub.storage.tasks.export_task` under the name the benchmarks,
#: tests and messages use for it
__all__ = ["execute_rmm", "revert"]


def _dense_bytes(shape: tuple[int, ...], t: int, m: int) -> int:
    """Bytes of an m-term dense basis (float32) of a tensor of ``shape`` and its T × m
    coefficients."""
    return 4 * m * (math.prod(shape) + t)


def execute_rmm(plan: Any, out: Path, *, device: str = "cpu", seed: int = 0,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                progress: bool | None = None) -> Any:
    """Run an ``rmm`` plan: write the basis directory at ``out`` (same signature and result as
    :func:`mergehub.merge.engine.execute`; the summary is the result's ``report``)."""
    start = time.perf_counter()
    dev = torch.device(device)
    m, basis_kind = int(plan.method.params["m"]), plan.method.params["basis"]
    labels = [s.label for s in plan.inputs]
    t = len(labels)
    results: dict[str, dict[str, torch.Tensor]] = {}
    sq_norm = torch.zeros(t, dtype=torch.float64)
    sq_resid = torch.zeros((t, t), dtype=torch.float64)
    stored_by_m = [0] * t
    factored = 0
    all_lora = all(src.is_lora for src in plan.inputs)
    mergeable = [s for s in plan.specs if s.name not in plan.copy_from_base]
    for spec in tqdm(mergeable, desc="rmm", unit="tensor", disable=bar_disabled(progress),
                     leave=False):
        if all_lora and len(spec.shape) == 2:
            factors = [src.factors(spec.name, spec.shape, dev) for src in plan.inputs]
            if all(left.shape[1] == 0 for left, _ in factors):
                continue  # no adapter has this module: reverting takes the base's
            split = decompose_factors if basis_kind == "factors" else decompose_dense_lowrank
            full = split(factors)
            encoded = full.first(m).encoded()
            for j in range(t):
                stored_by_m[j] += full.nbytes(j + 1)
            factored += 1
        else:
            base = plan.base.theta(spec.name, None, dev)
            xs = [src.tau(spec.name, base, dev).reshape(spec.shape) for src in plan.inputs]
            if all(not x.any() for x in xs):
                continue  # no task changes this tensor: reverting takes the base's
            encoded = RMM.encode(xs, [{"m": m}] * t)
            for j in range(t):
                stored_by_m[j] += _dense_bytes(spec.shape, t, j + 1)
        results[spec.name] = bundle_parts(encoded)
        sq_norm += encoded.stats["norms"].double().cpu()
        sq_resid += encoded.stats["residuals"].double().cpu()
    errors = {label: [float((sq_resid[i, j] / sq_norm[i]).sqrt()) if sq_norm[i] > 0 else 0.0
                      for j in range(t)] for i, label in enumerate(labels)}
    summary = {"format": "mergehub-rmm", "version": 2, "m": m, "basis": basis_kind,
               "tasks": labels, "base_model": plan.base.label, "tensors": len(results),
               "factored_tensors": factored, "relative_error_by_m": errors,
               "stored_bytes_by_m": stored_by_m}
    specs = [TensorSpec(f"{name}::{part}", "F32", tuple(value.shape))
             for name, parts in results.items() for part, value in parts.items()]
    side = side_files(plan)
    side[RMM_FILE] = (json.dumps(summary, indent=2) + "\n").encode()

    def get(spec: TensorSpec) -> torch.Tensor:
        name, part = spec.name.rsplit("::", 1)
        return results[name][part]

    write_model_dir(out, specs, get, max_shard_size=max_shard_size, side_files=side,
                    overwrite=overwrite, progress=False)
    return MergeResult(Path(out), len(specs), sum(s.nbytes for s in specs),
                       time.perf_counter() - start, plan=plan, report=summary, format="rmm")
