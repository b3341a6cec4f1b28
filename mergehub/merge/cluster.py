"""Merges spread over the machines of a Ray cluster: ``hub merge RECIPE -o OUT --ray [ADDRESS]``.

A merge of large models is bound by reading and writing bytes, and it is embarrassingly
parallel by tensor. Here the driver (the process that runs ``hub merge``) plans and checks the
merge exactly as a single-process merge does (headers only), runs a method's pre-passes when it
has any (``trim_scope: global``), and lays out the same output shards
(:func:`~mergehub.storage.writer.model_dir_layout`). The shards are split into groups of about
equal bytes (:func:`balanced_groups`), one Ray task per group; each task merges its tensors
with the same :class:`~mergehub.merge.tensors.TensorMerger` and writes its shard files with the
same :func:`~mergehub.merge.tensors.write_merged` as a single-process merge, straight into the
output's temp folder (which every node must see: a shared file system). The driver then writes
the index, config and tokenizer files and renames the folder into place. Same plan, same
shard layout, same arithmetic per tensor, DARE's draws keyed by (seed, tensor): the files are
bit-identical to a single-process merge, however the tensors are placed.

Faults: a task whose worker dies (killed, out of memory, node lost) is run again by Ray
(:data:`MAX_RETRIES`), rewriting its shard files from the start, so the output is still
complete and the same; a task that fails with a mergehub error (a tensor that cannot be
merged, a damaged input) stops the merge: the other tasks are cancelled and the error is
raised as in a single-process merge, with nothing left at the output path.
"""

from __future__ import annotations

import heapq
import logging
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergehub.errors import InputError, MergehubError, spelled
from mergehub.merge.plan import MergePlan, side_files
from mergehub.merge.tensors import MergeResult, TensorMerger, byte_bar, merge_result, write_merged
from mergehub.storage.writer import DEFAULT_MAX_SHARD_SIZE, model_dir_layout

if TYPE_CHECKING:
    from mergehub.ops.sparsify import KeptTally
    from mergehub.storage.safetensors_format import TensorSpec

#: groups (tasks) per worker slot (a CPU, or a GPU with ``--device cuda``): enough that a slow
#: task or a retried one delays the end little, few enough that per-task costs do not count
TASKS_PER_SLOT = 4
#: times Ray runs a task again whose worker died before it finished
MAX_RETRIES = 3
#: seconds between updates of the progress bar
POLL_SECONDS = 0.5
#: how to get Ray (what ``--ray`` says when it is missing)
INSTALL_HINT = "pip install 'mergehub[ray]'"


def ray_option() -> str:
    """The option that asks for Ray as the caller spells it (``--ray``, ``executor="ray"``)."""
    return spelled('executor="ray"', "--ray")


def import_ray() -> Any:
    """The ``ray`` module, or an :class:`InputError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(f"{ray_option()} needs Ray, which is not "
                         f"installed: {INSTALL_HINT}") from None
    return ray


def balanced_groups(sizes: list[int], n: int) -> list[list[int]]:
    """The indices of ``sizes`` in at most ``n`` groups of about equal total size: the
    largest first, each into the group with the least so far (Graham's LPT rule: the largest
    group is at most 4/3 of the best possible). Each group is in index order, the groups in
    the order of their first index."""
    n = max(1, min(n, len(sizes)))
    loads = [(0, g) for g in range(n)]
    groups: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, g = heapq.heappop(loads)
        groups[g].append(i)
        heapq.heappush(loads, (load + sizes[i], g))
    return sorted((sorted(g) for g in groups if g), key=lambda g: g[0])


def _written(files: list[tuple[Path, list[TensorSpec]]]) -> int:
    """Bytes in the shard files so far: the tasks' progress as the driver sees it on the shared
    file system (a retried task's file starts again from nothing), without messages."""
    total = 0
    for path, _ in files:
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _merge_group(plan: MergePlan, files: list[tuple[str, list[TensorSpec]]],
                 device: str, seed: int, chunk_elements: int | None,
                 fused: bool | None) -> KeptTally | None:
    """One Ray task: merge the tensors of ``files`` (shard path, its tensors) and write the
    shard files. ``plan`` comes with its method's pre-pass done (the driver's, whose results
    it holds); returns the method's tally of kept entries over these tensors."""
    folder = Path(files[0][0]).parent
    if not folder.is_dir():
        raise InputError(f"{folder}: not found on Ray node {socket.gethostname()}: the output "
                         "(or the store, with --to-store) must be on a file system every node "
                         "of the cluster sees")
    merger = TensorMerger(plan, device, seed=seed, chunk_elements=chunk_elements, fused=fused)
    try:
        write_merged(merger, [(Path(path), shard) for path, shard in files])
    finally:
        if device == "cuda":  # the worker stays for the next task; its GPU memory need not
            import torch

            torch.cuda.empty_cache()
    return plan.method.tally


def _connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at ``address``, or the one this process already joined, or start a
    local instance (``ray.init()``: ``RAY_ADDRESS`` if set, else a new one on this machine).
    Whether this call connected (and so disconnects when the merge is done)."""
    if ray.is_initialized():
        return False
    ray.init(address=address or None, logging_level=logging.WARNING)
    return True


def _reraise(ray: Any, err: Exception, what: str) -> None:
    """Raise the error a task ended with as this process's own: a mergehub or OS error as the
    task raised it (one line in the CLI), a worker that kept dying as a :class:`MergehubError`;
    anything else (a bug) as Ray reports it, with the task's traceback."""
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = getattr(err, "cause", None)
        if isinstance(cause, (MergehubError, OSError)):
            raise cause from None
        raise err
    if isinstance(err, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.RaySystemError)):
        raise MergehubError(f"Ray task merging {what} failed {MAX_RETRIES + 1} times, the last "
                            f"because {str(err).splitlines()[0]}") from None
    raise err


def execute_ray(plan: MergePlan, out: Path, *, address: str | None = None, device: str = "cpu",
                seed: int = 0, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                progress: bool | None = None, chunk_elements: int | None = None,
                fused: bool | None = None) -> MergeResult:
    """Run a checked plan on a Ray cluster (see the module docstring), writing an HF model
    dir at ``out`` (atomically), bit-identical to :func:`~mergehub.merge.engine.execute`.

    Args:
        address: the cluster to join (``ray://HOST:10001``, ``HOST:6379``, ``auto``);
            ``None``: the one this process joined already, else a local instance.
        device: ``cuda``: each task takes one GPU of the cluster (``num_gpus=1``).
        Others as :func:`~mergehub.merge.engine.execute`.
    """
    import torch

    ray = import_ray()
    # the pre-passes run here: on a GPU if this machine has one, else on the CPU (their
    # results, counts of bits, are the same on either)
    local = device if device != "cuda" or torch.cuda.is_available() else "cpu"
    merger = TensorMerger(plan, local, seed=seed, chunk_elements=chunk_elements, fused=fused)
    started = _connect(ray, address)
    try:
        slot = "GPU" if device == "cuda" else "CPU"
        slots = int(ray.cluster_resources().get(slot, 0))
        if slots < 1:
            raise InputError(f"{spelled('device=', '--device ')}{device}: the Ray cluster has "
                             f"no {slot}s")
        start = time.perf_counter()
        merger.prepass(progress)
        side = side_files(plan)
        # max_calls=0: a worker runs task after task. Ray's default for GPU tasks is one task
        # a worker (a fresh process, torch import, CUDA context and kernel loads, seconds
        # each time); a task frees its cached GPU memory when it ends instead.
        task_fn = ray.remote(num_cpus=1, num_gpus=1 if device == "cuda" else 0,
                             max_retries=MAX_RETRIES, max_calls=0)(_merge_group)
        total = sum(s.nbytes for s in plan.specs)
        with byte_bar(total, "merge", progress) as bar, \
                model_dir_layout(out, plan.specs, max_shard_size=max_shard_size,
                                 overwrite=overwrite, side_files=side) as files:
            groups = balanced_groups([sum(s.nbytes for s in shard) for _, shard in files],
                                     TASKS_PER_SLOT * slots)
            shared = ray.put(plan)  # with its method's pre-pass results
            pending = {task_fn.remote(shared, [(str(files[i][0]), files[i][1]) for i in group],
                                      device, seed, chunk_elements, fused): group
                       for group in groups}
            try:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
                    for ref in ready:
                        group = pending.pop(ref)
                        try:
                            tally = ray.get(ref)
                        except Exception as err:  # noqa: BLE001 (sorted by _reraise)
                            _reraise(ray, err, ", ".join(files[i][0].name for i in group))
                        if plan.method.tally is not None and tally is not None:
                            plan.method.tally.absorb(tally)
                    bar.update(min(total, _written(files)) - bar.n)
            finally:
                for ref in pending:  # a failed merge: stop the others before the folder goes
                    ray.cancel(ref)
                if pending:
                    ray.wait(list(pending), num_returns=len(pending), timeout=60)
        return merge_result(plan, Path(out), time.perf_counter() - start)
    finally:
        if started:
            ray.shutdown()
