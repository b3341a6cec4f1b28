"""Streamed merge execution: plan, check every input, then merge and write tensor by tensor.

For each output tensor the engine reads it in row chunks of ~1 MB per input from the base and
every input (a LoRA's dense delta is built on the fly, rows by rows), hands float32 values to
the method, casts the result to the output dtype and writes it into the current shard. Methods
that need whole-tensor statistics (trim thresholds, L1 norms) first stream over the same chunks.
Peak memory is a few chunks plus, for store inputs, one decoded tensor of at most
:data:`~mergehub.merge.inputs.STREAM_BYTES` (256 MiB; a larger one is decoded a chunk at a time
for each pass over it), and for TIES on the CPU one merged tensor of at most 512 MiB and up
to 256 MiB of its inputs (:mod:`~mergehub.merge.methods.onepass`), whatever the model size;
and chunks small enough for the CPU caches make the elementwise work several times faster
than on whole tensors. Everything is checked before the first tensor is computed, and
the output dir appears only when the whole merge has succeeded.
"""

from __future__ import annotations

import functools
import sys
import time
from contextlib import ExitStack, contextmanager
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mergehub.errors import InputError, spelled
from mergehub.merge.methods.rmm import ReversibleMerge
from mergehub.merge.cluster import execute_ray, import_ray, ray_option
from mergehub.merge.lora_output import can_write_peft, execute_peft
from mergehub.merge.plan import MergePlan, plan_merge, side_files
from mergehub.merge.recipe import Recipe, load_recipe
from mergehub.merge.rmm import execute_rmm
from mergehub.merge.tensors import (
    MergeResult, TensorMerger, byte_bar, merge_result, write_merged)
from mergehub.storage.store import Store, StoredModel, as_store
from mergehub.storage.writer import DEFAULT_MAX_SHARD_SIZE, model_dir_layout

#: where the tensors of a merge are computed: this process, or tasks on a Ray cluster
EXECUTORS = ("local", "ray")


def execute(plan: MergePlan, out: Path, *, device: str = "cpu", seed: int = 0,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
            progress: bool | None = None, chunk_elements: int | None = None,
            fused: bool | None = None) -> MergeResult:
    """Run a checked plan, writing an HF model dir at ``out`` (atomically).

    Tensors are merged by a :class:`TensorMerger` (``chunk_elements`` and ``fused`` as there)
    and written by :func:`write_merged`.
    """
    merger = TensorMerger(plan, device, seed=seed, chunk_elements=chunk_elements, fused=fused)
    start = time.perf_counter()
    # the pre-pass on the threads the load allows; tensors several at once (map_tensors)
    with merger.watching_load(), checking_reads_later(plan, merger.workers == 1) as finish_checks:
        merger.prepass(progress)
        side = side_files(plan)
        with byte_bar(sum(s.nbytes for s in plan.specs), "merge", progress) as bar, \
                model_dir_layout(out, plan.specs, max_shard_size=max_shard_size,
                                 side_files=side, overwrite=overwrite) as files:
            write_merged(merger, files, lambda spec: bar.update(spec.nbytes))
            finish_checks()  # a damaged input blob fails here, before the rename
    return merge_result(plan, Path(out), time.perf_counter() - start)


def merge(recipe: str | Path | Recipe, out: str | Path | None = None, *,
          store: Store | str | Path | None = None, to_store: str | None = None,
          device: str = "cpu",
          missing: str = "error", seed: int = 0, dry_run: bool = False,
          max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
          output_format: str = "hf", progress: bool | None = None, allow_foreign_base: bool = False,
          echo: Callable[[str], Any] | None = None, executor: str = "local",
          ray_address: str | None = None) -> MergeResult:
    """Merge as a recipe says: write an HF model dir at ``out`` and/or a store entry ``to_store``.

    Args:
        recipe: a recipe file path, YAML text, or a parsed :class:`Recipe`.
        out: output directory (created atomically; must not exist unless ``overwrite``).
        store: store to resolve store names against and to add ``to_store`` into (a
            :class:`Store` or its root directory).
        to_store: add the result to ``store`` under this name (kind ``merged``, the recipe in
            its provenance).
        device: ``cpu`` or ``cuda``.
        missing: ``error`` (default) or ``take-base`` for tensors some inputs lack or have with
            another shape: the base's tensor is used there.
        seed: seed of the random methods (DARE); same seed, same output.
        dry_run: only plan and check; print the plan through ``echo``.
        output_format: ``hf`` (default: a full model), ``peft`` (an adapter of the base:
            only when every input is a LoRA and the method is task arithmetic or a normalized
            linear average, which keep low rank exactly; its ``base_model_name_or_path`` is
            where the base came from, :func:`~mergehub.storage.store.base_reference`) or
            ``auto`` (``peft`` when possible, else ``hf``). ``MergeResult.format`` says which
            was written.
        allow_foreign_base: merge store inputs that were added against another base than the
            recipe's base_model (by default an error: their task vectors are relative to
            their own base).
        executor: ``local`` (this process) or ``ray``: the tensors are merged by tasks on a
            Ray cluster (:mod:`mergehub.merge.cluster`; the output, or the store with
            ``to_store``, on a file system every node sees), bit-identical to ``local``.
        ray_address: with ``executor="ray"``, the cluster to join (``ray://HOST:10001``,
            ``auto``); ``None``: the one this process has joined, else a local instance.
    """
    if executor not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, not {executor!r}")
    if executor == "ray" and not dry_run:
        import_ray()  # before any work: says how to install it
    store = as_store(store)
    parsed = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    plan = plan_merge(parsed, store=store, missing=missing,
                      allow_foreign_base=allow_foreign_base)
    say = echo or (lambda text: print(text, file=sys.stderr))
    for note in plan.notes:
        say(f"note: {note}")
    if dry_run:
        say(plan.describe())
        return MergeResult(None, len(plan.specs), sum(s.nbytes for s in plan.specs), 0.0, plan=plan)
    if out is None and to_store is None:
        raise InputError("give an output directory " + spelled(
            "(out=) and/or a store entry name (to_store=)", "(OUT or -o) and/or a store entry "
            "name (--name)"))
    if to_store is not None and store is None:
        raise InputError(f"{spelled('to_store', '--name')} needs a store"
                         f"{spelled(' (store=)', '')}")
    if output_format not in ("auto", "hf", "peft"):
        raise InputError(f"output format must be auto, hf or peft, not {output_format!r}")
    peft_ok = can_write_peft(plan)
    if output_format == "peft" and not peft_ok:
        raise InputError(spelled('output_format="peft"', "--format peft") + " needs every "
                         "input to be a LoRA adapter (same "
                         "fan_in_fan_out) and merge_method task_arithmetic or linear with "
                         "normalize: other methods do not keep low rank")
    if isinstance(plan.method, ReversibleMerge):
        if executor == "ray":
            raise InputError(f"{ray_option()}: merge_method rmm builds "
                             "one basis from all inputs at once and is not split by tensor; run "
                             "it in one process")
        run = execute_rmm
    elif peft_ok and output_format != "hf":
        if executor == "ray":
            say(f"note: {ray_option()}: a PEFT adapter output (a few "
                "factors per module) is merged in this process")
        run = execute_peft
    elif executor == "ray":
        run = functools.partial(execute_ray, address=ray_address)
    else:
        run = execute
    if to_store is not None and out is None:
        with store.work_folder("merge") as tmp:  # held: `hub gc` leaves it alone
            with reusing_reads(plan):
                result = run(plan, tmp / "out", device=device, seed=seed,
                             max_shard_size=max_shard_size, progress=progress)
            _add_result(store, to_store, result, parsed, plan)
        result.out = None
        result.store_name = to_store
        return result
    with reusing_reads(plan):
        result = run(plan, Path(out), device=device, seed=seed, max_shard_size=max_shard_size,
                     overwrite=overwrite, progress=progress)
    if to_store is not None:
        _add_result(store, to_store, result, parsed, plan)
        result.store_name = to_store
    return result


def _plan_stores(plan: MergePlan) -> list[tuple[Store, list[str]]]:
    """The stores that the plan's base and inputs are read from, each with those entries."""
    stores: dict[int, tuple[Store, list[str]]] = {}
    for src in (plan.base, *plan.inputs):
        if src is not None and isinstance(src.reader, StoredModel):
            stores.setdefault(id(src.reader.store), (src.reader.store, []))[1].append(
                src.reader.name)
    return list(stores.values())


@contextmanager
def reusing_reads(plan: MergePlan) -> Iterator[None]:
    """Within the block, the stores that the plan's base and inputs come from keep the decoded
    bytes of the blobs the merge reads more than once (:meth:`Store.reusing`): a base tensor
    is then decoded once, not once more for each fine-tune whose delta references it."""
    with ExitStack() as stack:
        for store, names in _plan_stores(plan):
            stack.enter_context(store.reusing(store.shared_blobs(names)))
        yield


@contextmanager
def checking_reads_later(plan: MergePlan, enabled: bool) -> Iterator[Callable[[], None]]:
    """Within the block, the plan's stores check the bytes their reads decode on a thread
    (:meth:`Store.checking_later`); yields the function that waits for those checks and
    raises for a damaged blob, to call before the output is renamed into place.

    Not ``enabled`` (a CPU merge that takes several tensors at once): reads check their bytes
    as they decode them, on the merge's own threads, side by side; a hashing thread would only
    add a copy of every decoded piece (`benchmarks/RESULTS.md`, issue 15)."""
    with ExitStack() as stack:
        stores = _plan_stores(plan) if enabled else []
        finishes = [stack.enter_context(store.checking_later()) for store, _ in stores]

        def finish() -> None:
            for each in finishes:
                each()

        yield finish


def _add_result(store: Store, name: str, result: MergeResult, recipe: Recipe,
                plan: MergePlan) -> None:
    base = plan.base.label if plan.base is not None else None
    # a merged model is stored as a delta against its base; an rmm basis is not base-shaped
    base_in_store = (base if base is not None and base in store
                     and not isinstance(plan.method, ReversibleMerge) else None)
    store.add(result.out, name, kind="merged", base=base_in_store,
              provenance={"recipe": recipe.text, "merge_method": recipe.merge_method,
                          "inputs": [s.label for s in plan.inputs], "base_model": base},
              progress=False)
