"""Running reversible merges (RMM) and reverting their store entries to any input task.

The math (a per-matrix basis and per-task coefficients in closed form) is in
:mod:`mergehub.merge.methods.rmm`. The output is a directory (and, with ``--to-store``, one
store entry): safetensors with ``NAME::basis`` (m × shape, float32) and ``NAME::coef``
(T × m) for every tensor some task changes, ``rmm.json`` (tasks, m, base, the relative
reconstruction error of every task for every m) and the base's config/tokenizer files.
``hub export NAME --task T`` (or :func:`revert`) rebuilds task T's full model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergehub.errors import StoreError
from mergehub.merge.methods.rmm import decompose
from mergehub.storage.safetensors_format import TORCH_DTYPE, TensorSpec
from mergehub.storage.store import Store
from mergehub.storage.writer import DEFAULT_MAX_SHARD_SIZE, write_model_dir

RMM_FILE = "rmm.json"


def execute_rmm(plan: Any, out: Path, *, device: str = "cpu", seed: int = 0,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                progress: bool = True) -> Any:
    """Run an ``rmm`` plan: write the basis directory at ``out`` (same signature and result as
    :func:`mergehub.merge.engine.execute`; the summary is the result's ``report``)."""
    import time

    from mergehub.merge.engine import MergeResult, _side_files

    start = time.perf_counter()
    dev = torch.device(device)
    m = int(plan.method.params["m"])
    labels = [s.label for s in plan.inputs]
    t = len(labels)
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sq_norm = torch.zeros(t, dtype=torch.float64)
    sq_resid = torch.zeros((t, t), dtype=torch.float64)
    mergeable = [s for s in plan.specs if s.name not in plan.copy_from_base]
    for spec in tqdm(mergeable, desc="rmm", unit="tensor", disable=not progress, leave=False):
        base = plan.base.theta(spec.name, None, dev)
        xs = [src.tau(spec.name, base, dev).reshape(spec.shape) for src in plan.inputs]
        if all(not x.any() for x in xs):
            continue  # no task changes this tensor: reverting takes the base's
        basis, coef, residuals = decompose(xs, m)
        results[spec.name] = (basis.cpu(), coef.cpu())
        sq_norm += torch.stack([(x.double() ** 2).sum() for x in xs]).cpu()
        sq_resid += residuals.double().cpu()
    errors = {label: [float((sq_resid[i, j] / sq_norm[i]).sqrt()) if sq_norm[i] > 0 else 0.0
                      for j in range(t)] for i, label in enumerate(labels)}
    summary = {"format": "mergehub-rmm", "version": 1, "m": m, "tasks": labels,
               "base_model": plan.base.label, "tensors": len(results),
               "relative_error_by_m": errors}
    specs = []
    for name, (basis, coef) in results.items():
        specs += [TensorSpec(f"{name}::basis", "F32", tuple(basis.shape)),
                  TensorSpec(f"{name}::coef", "F32", tuple(coef.shape))]
    side = _side_files(plan)
    side[RMM_FILE] = (json.dumps(summary, indent=2) + "\n").encode()

    def get(spec: TensorSpec) -> torch.Tensor:
        name, part = spec.name.rsplit("::", 1)
        return results[name][0 if part == "basis" else 1]

    write_model_dir(out, specs, get, max_shard_size=max_shard_size, side_files=side,
                    overwrite=overwrite, progress=False)
    return MergeResult(Path(out), len(specs), sum(s.nbytes for s in specs),
                       time.perf_counter() - start, plan=plan, report=summary)


def revert(store: Store, name: str, task: str | int, out: str | Path, *,
           overwrite: bool = False, progress: bool = True) -> Path:
    """Rebuild task ``task`` (its label, or index from 0) of the RMM entry ``name`` as an HF
    model dir: θ0 + Σj ctj Bj for every tensor in the basis, the base's tensor elsewhere."""
    from mergehub.merge.inputs import resolve_input

    entry = store.open(name)
    if RMM_FILE not in entry.side_files:
        raise StoreError(f"model {name!r} is not a reversible merge (no {RMM_FILE}); "
                         "--task only applies to merge_method rmm entries")
    summary = json.loads(entry.side_file(RMM_FILE))
    tasks = summary["tasks"]
    if isinstance(task, str) and task.isdigit():
        task = int(task)
    index = task if isinstance(task, int) else tasks.index(task) if task in tasks else -1
    if not 0 <= index < len(tasks):
        raise StoreError(f"model {name!r} has no task {task!r}; its tasks are "
                         + ", ".join(f"{i}: {t!r}" for i, t in enumerate(tasks)))
    base_ref = summary["base_model"]
    base = resolve_input(base_ref, store, f"base of {name!r}")
    basis_names = {s.name.rsplit("::", 1)[0] for s in entry.specs() if s.name.endswith("::basis")}
    specs = list(base.specs.values())

    def get(spec: TensorSpec) -> torch.Tensor:
        theta = base.reader.load(spec.name)
        if spec.name not in basis_names:
            return theta
        basis = entry.load(f"{spec.name}::basis")
        coef = entry.load(f"{spec.name}::coef")[index]
        delta = torch.tensordot(coef, basis, dims=1)
        return (theta.float() + delta).to(TORCH_DTYPE[spec.dtype])

    side = {p: entry.side_file(p) for p in entry.side_files if p != RMM_FILE}
    return write_model_dir(out, specs, get, side_files=side, overwrite=overwrite,
                           progress=progress)
