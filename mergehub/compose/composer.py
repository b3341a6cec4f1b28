"""The :class:`Composer`: applies ``hub merge`` recipes to a live model and puts its weights
back (see :mod:`mergehub.compose`); what it applied, :class:`Active`."""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from mergehub.compose.attach import PeftAdapters
from mergehub.compose.cache import CachedReader, DeltaCache, default_budget
from mergehub.compose.keys import PLAN_MEMO, plan_key, tensor_keys
from mergehub.errors import BaseMismatchError, InputError, MergehubError
from mergehub.host_memory import keep_freed_memory
from mergehub.kernels import CutMemo, MergeBatch
from mergehub.merge.engine import reusing_reads
from mergehub.merge.inputs import Source
from mergehub.merge.methods.rmm import ReversibleMerge
from mergehub.merge.plan import MergePlan, plan_merge
from mergehub.merge.recipe import Recipe, load_recipe, parse_recipe
from mergehub.merge.tensors import READ_WORKERS, TensorMerger
from mergehub.names import match_names, state_tensors
from mergehub.storage.parallel import ordered_map
from mergehub.storage.safetensors_format import TORCH_DTYPE, TensorSpec
from mergehub.storage.store import Store, StoredModel, as_store, names_entry


@dataclass(frozen=True)
class Active:
    """What a :class:`Composer` has applied (:attr:`Composer.active`).

    Attributes:
        recipe: the recipe's YAML text (with ``base_model`` filled in when it was left out).
        merge_method: the recipe's method.
        base: the base model the recipe merges into.
        inputs: per input, ``{"model": reference, "fingerprint": ...}`` (the store's
            :meth:`~mergehub.storage.store.Store.fingerprint` of an entry; ``None`` for a path).
        seed: the seed of random methods (DARE).
        tensors: tensors the recipe sets.
        rewritten: tensors this apply wrote (the others already held their result).
        seconds: how long the apply took.
    """

    recipe: str
    merge_method: str
    base: str | None
    inputs: list[dict[str, Any]]
    seed: int
    tensors: int
    rewritten: int
    seconds: float


@dataclass
class _Held:
    """What a tensor holds after an apply: its key, and the merger that computed it (able to
    compute it again)."""

    key: str
    merger: TensorMerger


class Composer(PeftAdapters):
    """Compose stored models into a live model; see :mod:`mergehub.compose`.

    Args:
        model: a ``transformers`` model (or any ``torch.nn.Module`` whose state-dict names are
            the checkpoint's), all of its parameters on one device.
        store: the store recipes name entries of (a :class:`Store` or its path); default: the
            store ``model`` was loaded from by :func:`mergehub.load`.
        base: the base model recipes merge into when they give no ``base_model``, and the one
            they must name when they do (a store name or a path); default: what ``model`` was
            loaded from (an adapter's base for an adapter entry).
        cache_bytes: the budget of the device cache of input tensors (default: half the free
            memory of a CUDA device, a quarter of the available host memory on the CPU).

    ``reset()`` returns the model to its weights at the time the composer was made.
    """

    def __init__(self, model: torch.nn.Module, store: Store | str | Path | None = None, *,
                 base: str | None = None, cache_bytes: int | None = None):
        source = getattr(model, "mergehub_source", None)
        if store is None and source is not None:
            store = source.store
        self.store = as_store(store)
        self.base = base if base is not None else (source.base if source is not None else None)
        self.model = model
        self._tensors = state_tensors(model)
        devices = {t.device for t in self._tensors.values()}
        if len(devices) != 1:
            raise InputError(f"a Composer needs the model on one device, not on "
                             f"{', '.join(sorted(map(str, devices)))}")
        self.device = devices.pop()
        keep_freed_memory()  # each apply frees and allocates what the last one did
        self.cache = DeltaCache(default_budget(self.device) if cache_bytes is None
                                else cache_bytes)
        self._saved: dict[str, torch.Tensor] = {}  # bind-time values of the changed tensors
        self._pinned: dict[Hashable, torch.Tensor] = {}  # saved values equal to stored tensors
        self._held: dict[str, _Held] = {}  # tensors not at their bind-time value
        self._where: dict[str, torch.Tensor] = {}  # output tensor name -> model tensor written
        self._active: Active | None = None
        #: trims found by earlier applies, found again without a pass while the cached input
        #: tensors live
        self._cuts = CutMemo()
        self._fingerprints: dict[Hashable, str] = {}  # see _fingerprint
        self._plans: OrderedDict[Hashable, tuple[Any, ...]] = OrderedDict()  # see _planned
        self._replays: OrderedDict[Hashable, tuple[Any, ...]] = OrderedDict()  # see _replayed
        self.peft_model: Any = None
        self.attached: dict[str, str] = {}  # PEFT adapter name -> store entry

    # --- recipes --------------------------------------------------------------------------

    @property
    def active(self) -> Active | None:
        """What is applied (``None``: the bind-time weights)."""
        return self._active

    def _recipe(self, recipe: str | Path | dict[str, Any] | Recipe) -> Recipe:
        if isinstance(recipe, Recipe):
            parsed = replace(recipe)
        elif isinstance(recipe, dict):
            parsed = parse_recipe(yaml.safe_dump(recipe, sort_keys=False), "<recipe dict>")
        else:
            parsed = load_recipe(recipe)
        if parsed.base_model is None and self.base is not None:
            parsed.base_model = self.base
            parsed.text = f"base_model: {self.base}\n{parsed.text}"
        return parsed

    def _same_model(self, a: str, b: str) -> bool:
        """Whether two references name the same model (same name, or store entries with the
        same fingerprint)."""
        if a == b:
            return True
        if names_entry(a, self.store) and names_entry(b, self.store):
            return self.store.fingerprint(a) == self.store.fingerprint(b)
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()

    def _check(self, plan: MergePlan) -> None:
        """What the engine's plan check does not cover: a method whose output is not a model,
        a base other than the composer's. (Store inputs added against another base than the
        recipe's are the engine's error, as for ``hub merge``.)"""
        recipe = plan.recipe
        if isinstance(plan.method, ReversibleMerge):
            raise InputError(f"{recipe.where(recipe.lines.get('merge_method'))}: rmm writes a "
                             "basis and per-task coefficients, not one model: run it with "
                             "mergehub.merge(recipe, to_store=NAME) and rebuild a task with "
                             "mergehub.merge.rmm.revert")
        if self.base is not None and plan.base is not None and not self._same_model(
                plan.base.label, self.base):
            raise BaseMismatchError(f"{recipe.where(recipe.lines.get('base_model'))}: base_model "
                                    f"{plan.base.label!r} is not this composer's base "
                                    f"{self.base!r}")

    def _cached(self, plan: MergePlan) -> MergePlan:
        """The plan with every source reading through the composer's caches."""
        swapped: dict[int, Source] = {}

        def wrap(src: Source | None) -> Source | None:
            if src is None:
                return None
            if id(src) not in swapped:
                swapped[id(src)] = replace(src, reader=CachedReader(
                    src.reader, self.device, self.cache, self._pinned))
            return swapped[id(src)]

        return replace(plan, base=wrap(plan.base), inputs=[wrap(s) for s in plan.inputs])

    def _targets(self, plan: MergePlan) -> dict[str, torch.Tensor]:
        """Output tensor name -> the model tensor it sets; shapes and dtypes checked. Output
        tensors the model has no place for are left out (as ``from_pretrained`` ignores
        them), and so is a second output tensor for storage an earlier one sets (tied
        weights)."""
        names = match_names(self.model, [s.name for s in plan.specs], self._tensors)
        out: dict[str, torch.Tensor] = {}
        claimed: set[int] = set()
        for spec in plan.specs:
            if spec.name not in names:
                continue
            target = self._tensors[names[spec.name]]
            where = f"{plan.recipe.where()}: tensor {spec.name!r}"
            if tuple(target.shape) != tuple(spec.shape):
                raise BaseMismatchError(f"{where} has shape {list(spec.shape)} but the model "
                                        f"has {list(target.shape)}")
            if target.dtype != TORCH_DTYPE[spec.dtype]:
                raise InputError(f"{where}: the recipe writes {TORCH_DTYPE[spec.dtype]} but the "
                                 f"model holds {target.dtype} (set out_dtype in the recipe, or "
                                 "load the model in the recipe's dtype)")
            if target.numel() and target.data_ptr() in claimed:
                continue
            claimed.add(target.data_ptr())
            out[spec.name] = target
        return out

    def apply(self, recipe: str | Path | dict[str, Any] | Recipe, *, seed: int = 0,
              missing: str = "error", allow_foreign_base: bool = False) -> Active:
        """Set the model's weights to what ``hub merge`` writes for ``recipe``.

        Args:
            recipe: a recipe file, YAML text, a dict in the same format, or a parsed recipe;
                ``base_model`` defaults to the composer's base.
            seed: seed of the random methods (DARE), as ``hub merge --seed``.
            missing: ``error`` or ``take-base``, as ``hub merge --missing``.
            allow_foreign_base: merge store inputs added against another base than the
                recipe's, as ``hub merge --allow-foreign-base``.

        Only tensors whose result differs from what they hold are rewritten. Every check
        runs before the first tensor is written, and if anything fails after that, every
        tensor is put back: a failed apply leaves the model as it was.
        """
        start = time.perf_counter()
        parsed, stored, merger, targets, keys = self._planned(recipe, seed, missing,
                                                              allow_foreign_base)
        plan = merger.plan
        self.cache.new_apply()
        wanted = {name: _Held(key, merger) for name, key in keys.items()}
        before = dict(self._held)
        try:
            rewritten = self._bring_to(wanted, targets, stored)
        except BaseException as err:
            try:
                self._restore(before)
            except Exception as again:  # noqa: BLE001 - reported with the first error
                raise MergehubError(f"{err}; then putting the model back failed too ({again}): "
                                    "reset() restores the bind-time weights") from again
            raise
        inputs = [{"model": src.label, "fingerprint": self._fingerprint(src)}
                  for src in plan.inputs]
        self._active = Active(parsed.text, parsed.merge_method, plan.base.label if plan.base
                              else None, inputs, seed, len(targets), rewritten,
                              time.perf_counter() - start)
        return self._active

    def _planned(self, recipe: str | Path | dict[str, Any] | Recipe, seed: int, missing: str,
                 allow_foreign_base: bool) -> tuple[Recipe, MergePlan, TensorMerger,
                                                    dict[str, torch.Tensor], dict[str, str]]:
        """The parsed recipe, its plan as the engine makes it (``stored``), the merger of that
        plan read through the composer's caches, the model tensors it sets and their keys
        (:func:`~mergehub.compose.keys.tensor_keys`). Remembered per recipe text and options
        while the store's catalog is unchanged, when every model the recipe reads is a store
        entry (immutable once written; a folder's files could change unseen), so that
        applying a recipe again asks the catalog one question instead of planning anew."""
        memo_key = plan_key(self.store, recipe, seed, missing, allow_foreign_base)
        hit = self._plans.get(memo_key) if memo_key is not None else None
        if hit is not None:
            self._plans.move_to_end(memo_key)
            return hit
        parsed = self._recipe(recipe)
        stored = plan_merge(parsed, store=self.store, missing=missing,
                            allow_foreign_base=allow_foreign_base)
        self._check(stored)
        plan = self._cached(stored)
        merger = TensorMerger(plan, self.device, seed=seed, cut_memo=self._cuts)
        targets = self._targets(plan)
        planned = parsed, stored, merger, targets, tensor_keys(merger, list(targets))
        if memo_key is not None and all(
                isinstance(src.reader, StoredModel)
                for src in (stored.base, *stored.inputs) if src is not None):
            self._plans[memo_key] = planned
            while len(self._plans) > PLAN_MEMO:
                self._plans.popitem(last=False)
        return planned

    def _fingerprint(self, src: Source) -> str | None:
        """The store's fingerprint of an entry input (``None`` for a path), remembered per
        entry content (its blob ids) so that a warm apply asks the catalog nothing."""
        reader = src.reader.reader if isinstance(src.reader, CachedReader) else src.reader
        if not isinstance(reader, StoredModel):
            return None
        key = (reader.name, tuple(reader.blob(s.name) for s in reader.specs()))
        if key not in self._fingerprints:
            self._fingerprints[key] = self.store.fingerprint(reader.name)
        return self._fingerprints[key]

    def _bring_to(self, wanted: dict[str, _Held], targets: dict[str, torch.Tensor],
                  stored: MergePlan) -> int:
        """Write the tensors whose held key differs from ``wanted`` (computed by the wanted
        merger) and return the tensors in ``self._held`` but not in ``wanted`` to their
        bind-time values; returns how many tensors were written. ``stored``: the plan before
        its readers were wrapped by the composer's cache (the stores it reads from)."""
        todo = [name for name, held in wanted.items()
                if name not in self._held or self._held[name].key != held.key]
        written = 0
        back = [n for n in self._held if n not in wanted]
        self._put_back(back)
        written += len(back)
        if not todo:
            return written
        merger = next(iter(wanted.values())).merger
        if self._replayed(merger, todo):
            for name in todo:
                self._held[name] = wanted[name]
            return written + len(todo)
        specs = {s.name: s for s in merger.plan.specs}
        order = [specs[n] for n in todo]
        resident = all(spec.name in src.specs and src.reader.resident(spec.name, self.device)
                       for spec in order if spec.name not in merger.plan.copy_from_base
                       for src in (merger.plan.base, *merger.plan.inputs) if src is not None)
        if not merger.fuse:
            raws: Iterable[list[torch.Tensor] | None] = (None for _ in order)
        elif resident:
            raws = map(merger.raw_inputs, order)  # nothing to read: threads would only cost
        else:
            raws = ordered_map(merger.raw_inputs, order, workers=READ_WORKERS)
        # reads from the store keep each base tensor decoded for the deltas that reference it
        # (as hub merge does); a warm apply reads nothing and skips working out which
        reads = nullcontext() if resident else reusing_reads(stored)
        # a warm apply queues its fused merges and launches them together (one launch for
        # all tensors of like settings: launches one by one would bound it by the host)
        batch = MergeBatch() if resident else None
        def write(spec: TensorSpec, raw: list[torch.Tensor] | None) -> None:
            """Merge one tensor into the model (on the CPU from several threads at once: each
            touches only its own tensor's entries here)."""
            target = targets[spec.name]
            # its bind-time value kept just before: the base tensor it reads is then fresh in
            # the store's reuse (reusing_reads) for the deltas decoded against it
            self._save(spec.name, target, merger)
            # held before it is written: a failure part-way through puts it back too
            self._held[spec.name] = wanted[spec.name]
            if not merger.merge_into(spec, raw, target, batch):
                target.copy_(_whole(list(merger.merged(spec, raw)), spec))

        # on the CPU, the cores used as hub merge uses them (several tensors at once)
        with torch.no_grad(), reads, merger.watching_load():
            merger.prepass()
            if merger.fuse:
                for spec, raw in zip(order, raws):
                    write(spec, raw)
            else:  # written in place: nothing waits for its turn, whatever the budget
                for _ in merger.map_tensors(lambda spec: write(spec, None), order,
                                            sys.maxsize):
                    pass
            written += len(order)
            if batch is not None:
                batch.run()
                if batch.added == len(todo):  # every tensor in the batch: it can be replayed
                    self._replays[(id(merger), tuple(todo))] = (merger, batch.replay,
                                                                self.cache.used_keys())
                    while len(self._replays) > PLAN_MEMO:
                        self._replays.popitem(last=False)
        return written

    def _replayed(self, merger: TensorMerger, todo: list[str]) -> bool:
        """Whether the merges of ``todo`` by ``merger`` were launched again as an earlier
        apply recorded them (:class:`kernels.MergeReplay`: the same recipe onto the same cached
        inputs, every one in a batch), for none of the host work of preparing them."""
        key = (id(merger), tuple(todo))
        hit = self._replays.get(key)
        if hit is None:
            return False
        _, replay, used = hit
        with torch.no_grad():
            if not replay():
                del self._replays[key]
                return False
        self.cache.touch(used)
        self._replays.move_to_end(key)
        return True

    def _save(self, name: str, target: torch.Tensor, merger: TensorMerger) -> None:
        """Keep ``target``'s bind-time value before it is first written: the base's cached
        tensor itself when equal (then pinned: it also serves every later base read), else a
        copy."""
        if name in self._saved:
            return
        self._where[name] = target
        base = merger.plan.base
        if base is not None and name in base.specs:
            stored = base.reader.load(name, self.device)
            if (stored.dtype == target.dtype and stored.shape == target.shape
                    and torch.equal(stored, target)):
                content = base.reader.content_key(name)
                self._pinned[content] = stored
                self.cache.pop((content, str(self.device)))
                self._saved[name] = stored
                return
        self._saved[name] = target.detach().clone()

    def _put_back(self, names: list[str]) -> None:
        """Return the tensors ``names`` to their bind-time values (one multi-tensor copy)."""
        if not names:
            return
        with torch.no_grad():
            torch._foreach_copy_([self._where[n] for n in names], [self._saved[n] for n in names])
        for name in names:
            del self._held[name]

    def _restore(self, before: dict[str, _Held]) -> None:
        """Make every tensor hold what it held in ``before`` again (after a failed apply, or
        when :meth:`applied` ends): bind-time values from the saved copies, merged ones
        computed again by the merger that made them (deterministic: the same bits)."""
        self._put_back([n for n in self._held if n not in before])
        stale = [(name, held) for name, held in before.items()
                 if name not in self._held or self._held[name].key != held.key]
        with torch.no_grad():
            for name, held in stale:
                merger = held.merger
                spec = next(s for s in merger.plan.specs if s.name == name)
                value = _whole(list(merger.merged(spec, merger.raw_inputs(spec))), spec)
                self._where[name].copy_(value)
                self._held[name] = held

    def reset(self) -> None:
        """Return every tensor to its value when the composer was made, bit for bit."""
        self._put_back(list(self._held))
        self._active = None

    @contextmanager
    def applied(self, recipe: str | Path | dict[str, Any] | Recipe,
                **options: Any) -> Iterator[Active]:
        """``with composer.applied(recipe): ...``: :meth:`apply` (with its ``options``) for
        the block, then the weights (and :attr:`active`) as they were before it, also when the
        block raises."""
        before, active = dict(self._held), self._active
        applied = self.apply(recipe, **options)
        try:
            yield applied
        finally:
            self._restore(before)
            self._active = active


def _whole(parts: list[torch.Tensor], spec: TensorSpec) -> torch.Tensor:
    """A tensor from its row chunks (as :meth:`TensorMerger.merged` yields them)."""
    value = parts[0] if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])
    return value.reshape(spec.shape)
