"""The per-tensor step of a merge and what a merge reports.

:class:`TensorMerger` merges one output tensor of a checked :class:`~mergehub.merge.plan.MergePlan`
on one device (row chunks on the CPU, fused kernels on a GPU); :func:`write_merged` streams its
results into shard files. ``hub merge`` (:func:`mergehub.merge.engine.execute`), the Ray tasks
(:mod:`mergehub.merge.cluster`) and the live composer (:mod:`mergehub.compose`) all run it, so
they compute the same bits. :class:`MergeResult` is what any of them reports.
"""

from __future__ import annotations

import itertools
import math
from contextlib import closing, contextmanager
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from mergehub.errors import InputError, spelled
from mergehub.merge.inputs import matrix_shape
from mergehub.merge.methods import TensorContext
from mergehub.merge.plan import MergeError, MergePlan
from mergehub.merge.recipe import resolve_params
from mergehub.progress import bar_disabled
from mergehub.storage.parallel import (
    LoadWatch, background, busy_machine, ordered_map, ordered_map_by_size)
from mergehub.storage.safetensors_format import TORCH_DTYPE, TensorSpec
from mergehub.storage.writer import write_shard

R = TypeVar("R")


@dataclass
class MergeResult:
    """What a merge produced."""

    out: Path | None
    tensors: int
    bytes: int
    seconds: float
    store_name: str | None = None
    plan: MergePlan | None = None
    report: dict[str, Any] | None = None  # method-specific summary (rmm: errors by m; kept)
    #: what ``out`` holds: ``hf`` (a model dir), ``peft`` (an adapter dir), ``rmm`` (a
    #: reversible merge's basis, which ``hub export --task`` turns into models)
    format: str = "hf"


#: elements per chunk: ~1 MB of float32 per input keeps a chunk's inputs in CPU caches
#: (measured: 8x faster task arithmetic than whole tensors); GPUs want bigger launches
CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}
#: threads reading whole input tensors ahead of the fused path (one read from the page cache
#: runs at ~7 GB/s; a few in parallel keep a GPU fed)
READ_WORKERS = 3
#: merged tensors (output bytes) that a CPU merge's threads may start ahead of their turn to be
#: written (:attr:`TensorMerger.workers`): room for a model's output head, merged beside its
#: embedding and then waiting for its turn, and for the layers after it (1B TIES on 2 cores:
#: 13.6-13.9 s with 256-512 MiB, 18.6 s with 128 MiB, where the waiting head leaves no room)
AHEAD_BYTES = 512 << 20
#: a CPU merge's threads hold each tensor whole until it is written; a tensor of more output
#: bytes than this is merged alone, in chunks, on torch's intra-op threads
ALONE_BYTES = 512 << 20
#: CPU merges of at least this many output bytes first check whether the machine is busy
BUSY_CHECK_BYTES = 1 << 28


def row_ranges(spec: TensorSpec, chunk_elements: int) -> list[tuple[int, int]]:
    """Split a tensor's rows into ranges of about ``chunk_elements`` elements."""
    rows, cols = matrix_shape(spec)
    step = max(1, chunk_elements // max(1, cols))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)] or [(0, 0)]


class TensorMerger:
    """A checked plan merged one output tensor at a time on one device: the per-tensor step
    that :func:`execute` (``hub merge``, which writes the tensors to files) and
    :class:`mergehub.compose.Composer` (which writes them into a live model) share, so both
    produce the same bits.

    Each tensor is merged chunk by chunk (rows, ``chunk_elements`` at a time) with the method's
    :meth:`~MergeMethod.merge`, or, with ``fused`` (default: on CUDA), whole at once in one pass
    by :func:`mergehub.kernels.merge_tensor` wherever the method has a fused form and every input
    is a dense model (not a LoRA). Inputs are read through each :class:`Source` of the plan.
    """

    def __init__(self, plan: MergePlan, device: str | torch.device = "cpu", *, seed: int = 0,
                 chunk_elements: int | None = None, fused: bool | None = None,
                 cut_memo: Any = None):
        self.plan = plan
        #: a ``kernels.CutMemo`` the fused path's trims go through (kept by a caller that
        #: merges the same input tensors again)
        self.cut_memo = cut_memo
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(spelled('device="cuda"', "--device cuda") + ": no CUDA device is "
                             "available")
        self.seed = seed
        self.chunk = chunk_elements or CHUNK_ELEMENTS.get(self.device.type, CHUNK_ELEMENTS["cpu"])
        method = plan.method
        #: whole tensors through the fused kernels (the inputs' raw tensors, :meth:`raw_inputs`)
        self.fuse = (((self.device.type == "cuda") if fused is None else fused)
                     and plan.base is not None and method.on_deltas and method.fusable
                     and not any(src.is_lora for src in plan.inputs))
        #: called before each chunk is read, in every pass (:meth:`watching_load`: LoadWatch.check)
        self.between_chunks: Callable[[], None] = lambda: None
        self.reference = plan.base or plan.inputs[0]
        #: tensors :meth:`map_tensors` merges at once, each on a thread of its own (set by
        #: :meth:`watching_load`)
        self.workers = 1
        self._params: dict[str, list[dict[str, Any]]] = {}  # see params

    def params(self, spec: TensorSpec) -> list[dict[str, Any]]:
        """Each input's parameters resolved for tensor ``spec`` (gradients, filters); worked
        out once per tensor (a live composer merges the same plan's tensors again)."""
        params = self._params.get(spec.name)
        if params is None:
            params = self._params[spec.name] = [
                resolve_params(p, spec.name, self.plan.num_layers) for p in self.plan.model_params]
        return params

    def _chunks(self, spec: TensorSpec, ranges: list[tuple[int, int]],
                which: list[int] | None = None) -> Iterator[tuple[torch.Tensor | None,
                                                                  list[torch.Tensor]]]:
        """(base rows, [input rows]) per row range: task vectors or weights as the method
        wants, for all inputs or those in ``which``."""
        plan, dev = self.plan, self.device
        sources = plan.inputs if which is None else [plan.inputs[i] for i in which]
        for r0, r1 in ranges:
            self.between_chunks()
            base = plan.base.theta(spec.name, None, dev, r0, r1) if plan.base is not None else None
            xs = [src.tau(spec.name, base, dev, r0, r1) if plan.method.on_deltas
                  else src.theta(spec.name, base, dev, r0, r1) for src in sources]
            yield base, xs

    def prepass(self, progress: bool | None = False) -> None:
        """The passes of the method's :class:`~mergehub.merge.methods.base.Prepass` over every
        merged tensor (whole-model statistics), before any tensor is merged; nothing for a
        method without one, or once its passes are done (the statistics accumulate what they
        see: a merger used again, as the Composer's remembered plans are, or a Ray task's copy
        of the plan, passes no more)."""
        stats = self.plan.method.prepass
        if stats is None:
            return
        mergeable = [s for s in self.plan.specs if s.name not in self.plan.copy_from_base]
        try:
            while stats.passes < stats.rounds():
                for spec in tqdm(mergeable, desc=f"pre-pass {stats.passes + 1}", unit="tensor",
                                 disable=bar_disabled(progress), leave=False):
                    for _, xs in self._chunks(spec, row_ranges(spec, self.chunk)):
                        stats.observe(spec.name, xs)
                stats.finish()
        except BaseException:  # a pass cut short: its counts are partial; start over next time
            stats.reset()
            raise

    def _context(self, spec: TensorSpec, **more: Any) -> TensorContext:
        """The :class:`TensorContext` of merging ``spec``: with its result of the method's
        pre-pass, on every path."""
        stats = self.plan.method.prepass
        numel = math.prod(spec.shape)
        return TensorContext(spec.name, self.device, self.seed,
                             None if stats is None else stats.for_tensor(spec.name, numel),
                             numel=numel, **more)

    @contextmanager
    def watching_load(self) -> Iterator[None]:
        """On the CPU, torch's intra-op threads chosen by the machine's load for the work inside
        (:class:`~mergehub.storage.parallel.LoadWatch`), looked at again between chunks; the
        start is sampled only for a merge that takes more than a moment
        (:data:`BUSY_CHECK_BYTES`). A chunked merge (not ``fuse``) also gets :attr:`workers`:
        torch's own thread count, the tensors :meth:`map_tensors` merges at once. Elsewhere
        nothing."""
        if self.device.type != "cpu":
            yield
            return
        busy = sum(s.nbytes for s in self.plan.specs) >= BUSY_CHECK_BYTES and busy_machine()
        with LoadWatch(busy) as watch:
            self.between_chunks = watch.check
            self.workers = 1 if self.fuse else watch.default
            try:
                yield
            finally:
                self.between_chunks = lambda: None
                self.workers = 1

    def map_tensors(self, fn: Callable[[TensorSpec], R], specs: list[TensorSpec],
                    budget: int) -> Iterator[R]:
        """``fn(spec)`` for each of ``specs``, the results in order: with :attr:`workers` > 1
        (inside :meth:`watching_load`), that many tensors at once on threads of their own, each
        on one torch intra-op thread, the largest first wherever the sizes (output bytes) of the
        tensors started ahead of their turn stay within ``budget``
        (:func:`~mergehub.storage.parallel.ordered_map_by_size`); else one after another.

        Why: a chunk's operations are too short to split well across threads (on 2 cores, TIES
        ran 1.25x faster on two intra-op threads than on one, `benchmarks/RESULTS.md`, issue
        16), and where other processes keep the cores busy, one descheduled thread stalls
        every operation's barrier; tensors merged on threads of their own share no barrier, so
        the load no longer matters here. Each tensor's merge reads and computes what it would
        alone (per-tensor random streams, per-thread reads: :class:`~mergehub.merge.inputs.Source`),
        so the bits do not depend on the number of workers."""
        if self.workers <= 1:
            yield from map(fn, specs)
            return
        grad = torch.is_grad_enabled()  # thread-local: the caller's, on every worker

        def run(spec: TensorSpec) -> R:
            with torch.set_grad_enabled(grad):
                return fn(spec)

        threads, look = torch.get_num_threads(), self.between_chunks
        torch.set_num_threads(1)
        self.between_chunks = lambda: None  # the load's look would set the threads again
        try:
            yield from ordered_map_by_size(run, specs, lambda spec: spec.nbytes, budget,
                                           self.workers)
        finally:
            self.between_chunks = look
            torch.set_num_threads(threads)

    def raw_inputs(self, spec: TensorSpec) -> list[torch.Tensor] | None:
        """The base's and every input's whole tensor as stored, for the fused path (``None``
        where ``spec`` is not merged that way). Safe to call on reader threads."""
        if not self.fuse or spec.name in self.plan.copy_from_base:
            return None
        return [src.raw(spec.name, self.device) for src in (self.plan.base, *self.plan.inputs)]

    def merged(self, spec: TensorSpec, raw: list[torch.Tensor] | None = None
               ) -> Iterator[torch.Tensor]:
        """Output tensor ``spec`` in its output dtype, as consecutive row chunks (one chunk on
        the fused path, given its :meth:`raw_inputs`), on the device (a tensor copied from the
        base: on the CPU)."""
        if spec.name in self.plan.copy_from_base:
            yield self.reference.reader.load(spec.name).to(TORCH_DTYPE[spec.dtype])
            return
        with self._named(spec):
            if raw is not None:
                yield self._fused(spec, raw)
            else:
                yield from self._chunked(spec)

    def merge_into(self, spec: TensorSpec, raw: list[torch.Tensor] | None, out: torch.Tensor,
                   batch: Any = None) -> bool:
        """Merge tensor ``spec`` straight into ``out`` (its shape and output dtype, on the
        device), without a whole-tensor result of its own: on the fused path (given its
        :meth:`raw_inputs`) by one kernel, or queued in ``batch`` (a
        :class:`mergehub.kernels.MergeBatch`, where the merge can join one: ``out`` is written
        when the batch runs); else chunk by chunk into ``out``'s rows, which then hold part of
        the result if the merge fails. False, and nothing done, for a tensor copied from the
        base or an ``out`` that is not contiguous (see :meth:`merged`)."""
        if spec.name in self.plan.copy_from_base or not out.is_contiguous():
            return False
        with self._named(spec):
            if raw is not None:
                self._fused(spec, raw, out, batch)
                return True
            flat, at = out.view(-1), 0
            for part in self._chunked(spec):
                flat[at:at + part.numel()].copy_(part.reshape(-1))
                at += part.numel()
        return True

    @contextmanager
    def _named(self, spec: TensorSpec) -> Iterator[None]:
        """Bad parameter values for this tensor as a MergeError naming it and the method."""
        try:
            yield
        except (ValueError, TypeError) as err:
            raise MergeError(f"tensor {spec.name!r}: {self.plan.recipe.merge_method}: "
                             f"{err}") from err

    def _chunked(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        method, params = self.plan.method, self.params(spec)
        ranges = row_ranges(spec, self.chunk)
        dtype = TORCH_DTYPE[spec.dtype]
        sources = [src for src in (self.plan.base, *self.plan.inputs) if src is not None]
        ctx = self._context(spec, row_size=matrix_shape(spec)[1],
                            any_rows=not any(src.in_order(spec.name) for src in sources),
                            out_dtype=dtype)

        def chunks(which: list[int] | None = None,
                   rows: list[tuple[int, int]] | None = None) -> Iterator[tuple[
                       torch.Tensor | None, list[torch.Tensor]]]:
            return self._chunks(spec, ranges if rows is None else rows, which)

        for part in method.merge_chunks(chunks, ranges, params, ctx):
            yield part.to(dtype)
        for src in sources:
            src.release()

    def _fused(self, spec: TensorSpec, raw: list[torch.Tensor], out: torch.Tensor | None = None,
               batch: Any = None) -> torch.Tensor:
        from mergehub import kernels

        params = self.params(spec)
        ctx = self._context(spec, cut_memo=self.cut_memo)
        base, *thetas = (t if t.device == self.device else t.to(self.device, non_blocking=True)
                         for t in raw)
        args = self.plan.method.fused(base, thetas, params, ctx)
        return kernels.merge_tensor(base, thetas, **args, out_dtype=TORCH_DTYPE[spec.dtype],
                                    name=spec.name, out=out, batch=batch)


def write_merged(merger: TensorMerger, files: list[tuple[Path, list[TensorSpec]]],
                 done: Callable[[TensorSpec], Any] | None = None) -> None:
    """Merge the tensors of ``files`` (shard path, its tensors in order) with ``merger`` and
    write each shard file (:func:`~mergehub.storage.writer.write_shard`); ``done(spec)`` after
    each tensor. What :func:`execute` runs for a whole model, and each Ray task of
    :mod:`mergehub.merge.cluster` for its shards.

    On the CPU (inside :meth:`TensorMerger.watching_load`), tensors of at most
    :data:`ALONE_BYTES` are merged several at once (:meth:`TensorMerger.map_tensors`). On the
    fused path the inputs' raw tensors are read on threads ahead of the merge
    (:data:`READ_WORKERS`); on a GPU, reading and merging also run a few chunks ahead of the
    writer, so reading, merging and writing overlap.
    """
    specs = [spec for _, shard in files for spec in shard]

    def produce() -> Iterator[tuple[str, torch.Tensor | None]]:
        """Every output chunk in write order, then ``(name, None)`` at the end of each tensor."""
        for at_once, group in itertools.groupby(
                specs, lambda spec: merger.workers > 1 and spec.nbytes <= ALONE_BYTES):
            yield from (several if at_once else one_by_one)(list(group))

    def several(group: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Whole tensors merged on several threads (:meth:`TensorMerger.map_tensors`)."""
        wholes = merger.map_tensors(lambda spec: list(merger.merged(spec)), group, AHEAD_BYTES)
        for spec, parts in zip(group, wholes):
            for part in parts:
                yield spec.name, part
            yield spec.name, None

    def one_by_one(group: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Tensors merged one after another, in chunks (a larger one is never held whole)."""
        raws = (ordered_map(merger.raw_inputs, group, workers=READ_WORKERS)
                if merger.fuse else (None for _ in group))
        for spec, raw in zip(group, raws):
            for part in merger.merged(spec, raw):
                yield spec.name, part.cpu()
            yield spec.name, None

    # on a GPU, reading and merging run on a thread of their own, a few chunks ahead of the
    # writer; on a CPU that thread would compete with torch's own for the cores (measured
    # on 2 idle cores: TIES 72 s with it, 63 s without; task arithmetic 15.4 s, 13.1 s)
    stream = background(produce(), depth=4) if merger.device.type == "cuda" else produce()

    def get(spec: TensorSpec) -> Iterator[torch.Tensor]:
        for name, part in stream:
            assert name == spec.name, (name, spec.name)
            if part is None:
                break
            yield part

    with closing(stream):
        for path, shard in files:
            write_shard(path, shard, get, done)


def byte_bar(total: int, desc: str, progress: bool | None) -> tqdm:
    """The progress bar of a merge: bytes written of ``total``, and the rate."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                disable=bar_disabled(progress), leave=False)


def merge_result(plan: MergePlan, out: Path, seconds: float) -> MergeResult:
    """What a finished merge of ``plan`` into ``out`` reports (with the method's kept tally)."""
    tally = plan.method.kept_report()
    return MergeResult(out, len(plan.specs), sum(s.nbytes for s in plan.specs), seconds,
                       plan=plan, report=None if tally is None else {"kept": tally})
