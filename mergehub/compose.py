"""Live composition: merge stored fine-tunes, LoRAs and compressed task vectors into a model
held in memory, swap recipes and revert, with the same engine and kernels as ``hub merge``.

A :class:`Composer` is bound to one live ``transformers`` model (e.g. from
:func:`mergehub.load`). :meth:`Composer.apply` runs a ``hub merge`` recipe through the merge
engine's own per-tensor step (:class:`~mergehub.merge.tensors.TensorMerger`: the same plan, the
same chunking and fused kernels, the same seeds), on the model's device, and copies each
merged tensor into the parameter it belongs to; so the model's weights become exactly, bit for
bit, what ``hub merge --device DEVICE -o DIR`` writes for that recipe (``--format hf``).

What it keeps:

* the bind-time value of every tensor an apply changed (so :meth:`Composer.reset` restores it
  bit for bit). When that value equals the base's stored tensor (the usual case: the model
  was loaded from the base), the one copy also serves as the base the merges read;
* a cache of the inputs' decoded tensors on the model's device (:class:`DeltaCache`, an LRU
  within ``cache_bytes`` that keeps what the current apply uses), keyed by the store's blob
  ids, so that switching among a working set of entries does not read the store again.
  Compressed entries (bit1, compeft, lowrank, TALL) are decoded on the model's device (by the
  decompress-and-apply kernels on CUDA), as ``hub merge`` decodes them there;
* for each tensor a key of everything its merged value depends on (method and parameters for
  that tensor, the content of every input's tensor, seed, dtype), so a second apply rewrites
  only the tensors whose result changes, and a failed apply can put every tensor back.

Adapters can also stay unmerged: :meth:`Composer.attach` attaches a stored LoRA-family entry
through ``peft`` (so PEFT's ``set_adapter``, ``disable_adapter``, ``delete_adapter`` and
mixed-adapter batches work), and :meth:`Composer.merge_attached` folds attached adapters into
the weights with any mergehub method, on their exact dense deltas.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from mergehub.errors import BaseMismatchError, InputError, MergehubError
from mergehub.kernels import CutMemo, MergeBatch
from mergehub.merge.engine import reusing_reads
from mergehub.merge.inputs import Source
from mergehub.merge.methods.rmm import ReversibleMerge
from mergehub.merge.plan import MergePlan, plan_merge
from mergehub.merge.recipe import Recipe, load_recipe, parse_recipe
from mergehub.merge.tensors import READ_WORKERS, TensorMerger
from mergehub.names import match_names, state_tensors
from mergehub.storage.checkpoint import ADAPTER_CONFIG, Checkpoint
from mergehub.storage.parallel import ordered_map
from mergehub.storage.safetensors_format import TORCH_DTYPE, TensorSpec
from mergehub.storage.store import Store, StoredModel, names_entry


#: how many recipes' plans (and recorded launches) a Composer remembers
#: (:meth:`Composer._planned`, :meth:`Composer._replayed`)
PLAN_MEMO = 16


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


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class DeltaCache:
    """Tensors read for merges, kept on the composer's device within ``budget`` bytes; the
    least recently used go first, but never one used by the current apply (:meth:`new_apply`):
    when the rest of an apply's tensors do not fit, they are used and not kept. So an apply
    whose inputs are larger than the budget keeps the first budget's worth of them and the next
    apply of it finds those, where a plain LRU would have evicted each tensor before its next
    use (a cyclic scan) and found none. A tensor larger than the budget is used but not kept.
    Thread-safe (the fused path reads inputs on threads)."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, tuple[torch.Tensor, int]] = OrderedDict()
        self._apply = 0
        self._lock = threading.Lock()

    def new_apply(self) -> None:
        """Start an apply: the tensors it uses from now on are kept over older ones."""
        with self._lock:
            self._apply += 1

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items[key] = (item[0], self._apply)
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def used_keys(self) -> list[Hashable]:
        """The keys the current apply has used (see :meth:`new_apply`)."""
        with self._lock:
            return [key for key, (_, used) in self._items.items() if used == self._apply]

    def touch(self, keys: Iterable[Hashable]) -> None:
        """Count ``keys`` as used by the current apply, as :meth:`get` would (an apply that
        launches recorded merges again gets nothing)."""
        with self._lock:
            for key in keys:
                item = self._items.get(key)
                if item is not None:
                    self._items[key] = (item[0], self._apply)
                    self._items.move_to_end(key)

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        size = _nbytes(tensor)
        with self._lock:
            if size > self.budget or key in self._items:
                return
            older = [k for k, (_, used) in self._items.items() if used < self._apply]
            free = self.budget - self.bytes
            evict = []
            for k in older:  # least recently used first
                if free >= size:
                    break
                evict.append(k)
                free += _nbytes(self._items[k][0])
            if free < size:  # only this apply's tensors would make room: not kept
                return
            for k in evict:
                self.bytes -= _nbytes(self._items.pop(k)[0])
            self._items[key] = (tensor, self._apply)
            self.bytes += size

    def pop(self, key: Hashable) -> None:
        """Forget ``key`` (its tensor is kept elsewhere)."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self.bytes -= _nbytes(item[0])

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class _CachedReader:
    """A merge input's reader (a stored model or a checkpoint) whose whole tensors come from
    a composer: its pinned bind-time copies of base tensors on its device, its
    :class:`DeltaCache`, or else the reader (then kept in the cache). It holds those, not the
    composer, so that the plans a composer remembers do not keep it alive."""

    def __init__(self, reader: StoredModel | Checkpoint, device: torch.device, cache: DeltaCache,
                 pinned: dict[Hashable, torch.Tensor]):
        self.reader = reader
        self.device, self.cache, self.pinned = device, cache, pinned
        self._blobs: dict[str, Hashable] = {}  # a store entry's tensors never change

    def specs(self) -> list[TensorSpec]:
        return self.reader.specs()

    def content_key(self, name: str) -> Hashable:
        """What identifies the tensor's decoded value: a store blob id, or a file range with the
        file's size and modification time."""
        if isinstance(self.reader, StoredModel):
            key = self._blobs.get(name)
            if key is None:
                key = self._blobs[name] = ("blob", self.reader.blob(name))
            return key
        info = self.reader.tensors[name]
        path = self.reader.local_file(info.file).resolve()
        stat = path.stat()
        return ("file", str(path), stat.st_mtime_ns, stat.st_size, info.offset)

    def resident(self, name: str, device: torch.device) -> bool:
        """Whether :meth:`load` of ``name`` on ``device`` reads nothing (pinned or cached)."""
        content = self.content_key(name)
        return ((device == self.device and content in self.pinned)
                or (content, str(device)) in self.cache)

    def load(self, name: str, device: str | torch.device | None = None) -> torch.Tensor:
        dev = torch.device(device or "cpu")
        content = self.content_key(name)
        if dev == self.device and content in self.pinned:
            return self.pinned[content]
        key = (content, str(dev))
        tensor = self.cache.get(key)
        if tensor is None:
            if isinstance(self.reader, StoredModel):
                tensor = self.reader.load(name, device=dev)
            else:
                tensor = self.reader.load(name).to(dev)
            self.cache.put(key, tensor)
        return tensor


@dataclass
class _Held:
    """What a tensor holds after an apply: its key, and the merger that computed it (able to
    compute it again)."""

    key: str
    merger: TensorMerger


def _default_budget(device: torch.device) -> int:
    """Half the free memory of a CUDA device, a quarter of the available host memory for the
    CPU: Linux's ``MemAvailable``, which counts the page cache the kernel would give back (the
    free pages alone are small on a machine that has just read or written models), else the
    free pages, else 1 GiB."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError):
        return 1 << 30


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()


class Composer:
    """Compose stored models into a live model; see the module docstring.

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
        self.store = Store(store) if isinstance(store, (str, Path)) else store
        self.base = base if base is not None else (source.base if source is not None else None)
        self.model = model
        self._tensors = state_tensors(model)
        devices = {t.device for t in self._tensors.values()}
        if len(devices) != 1:
            raise InputError(f"a Composer needs the model on one device, not on "
                             f"{', '.join(sorted(map(str, devices)))}")
        self.device = devices.pop()
        self.cache = DeltaCache(_default_budget(self.device) if cache_bytes is None
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
                swapped[id(src)] = replace(src, reader=_CachedReader(
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

    def _keys(self, merger: TensorMerger, names: list[str]) -> dict[str, str]:
        """Per output tensor, a digest of everything its merged value depends on."""
        plan = merger.plan

        def content(src: Source, name: str) -> Hashable:
            if src.is_lora:
                entry = src.lora.get(name)
                if entry is None:
                    return ("lora", None)
                a, b, scaling, transpose = entry
                return ("lora", src.reader.content_key(a), src.reader.content_key(b), scaling,
                        transpose)
            return src.reader.content_key(name)

        specs = {s.name: s for s in plan.specs}
        common = (plan.recipe.merge_method, sorted(plan.method.params.items()), merger.seed,
                  merger.fuse, merger.chunk)
        if plan.method.prepass_rounds():  # global statistics: every tensor of every input
            common += (sorted(plan.copy_from_base),
                       [[content(src, s.name) for s in plan.specs
                         if s.name not in plan.copy_from_base] for src in plan.inputs])
        out = {}
        for name in names:
            spec = specs[name]
            base = content(merger.reference, name)
            if name in plan.copy_from_base:
                out[name] = _digest(("copy", base, spec.dtype))
            else:
                out[name] = _digest((common, name, spec.dtype, base,
                                     [content(src, name) for src in plan.inputs],
                                     merger.params(spec)))
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
        (:meth:`_keys`). Remembered per recipe text and options while the store's catalog is
        unchanged, when every model the recipe reads is a store entry (immutable once
        written; a folder's files could change unseen), so that applying a recipe again asks
        the catalog one question instead of planning anew."""
        memo_key = self._memo_key(recipe, seed, missing, allow_foreign_base)
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
        planned = parsed, stored, merger, targets, self._keys(merger, list(targets))
        if memo_key is not None and all(
                isinstance(src.reader, StoredModel)
                for src in (stored.base, *stored.inputs) if src is not None):
            self._plans[memo_key] = planned
            while len(self._plans) > PLAN_MEMO:
                self._plans.popitem(last=False)
        return planned

    def _memo_key(self, recipe: str | Path | dict[str, Any] | Recipe, seed: int, missing: str,
                  allow_foreign_base: bool) -> Hashable | None:
        """What :meth:`_planned` remembers a plan by: the recipe's text (a dict's JSON), the
        options and the catalog's version (``None``: not remembered: a parsed Recipe object,
        no store)."""
        if self.store is None or isinstance(recipe, Recipe):
            return None
        if isinstance(recipe, dict):
            text = json.dumps(recipe, sort_keys=True, default=str)
        elif isinstance(recipe, Path) or "\n" not in recipe:
            try:
                text = Path(recipe).read_text()
            except (OSError, ValueError):
                return None  # not a readable file: planning says why
        else:
            text = recipe
        return (type(recipe).__name__, text, seed, missing, allow_foreign_base,
                self.store.catalog_version())

    def _fingerprint(self, src: Source) -> str | None:
        """The store's fingerprint of an entry input (``None`` for a path), remembered per
        entry content (its blob ids) so that a warm apply asks the catalog nothing."""
        reader = src.reader.reader if isinstance(src.reader, _CachedReader) else src.reader
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
        # on the CPU, torch's threads chosen by the machine's load, as hub merge does
        with torch.no_grad(), reads, merger.watching_load():
            if merger.plan.method.prepass_rounds():
                merger.prepass()
            for spec, raw in zip(order, raws):
                target = targets[spec.name]
                self._save(spec.name, target, merger)
                # held before it is written: a failure part-way through puts it back too
                self._held[spec.name] = wanted[spec.name]
                if not merger.merge_into(spec, raw, target, batch):
                    target.copy_(_whole(list(merger.merged(spec, raw)), spec))
                written += 1
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

    # --- unmerged adapters (peft) ---------------------------------------------------------

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


def _whole(parts: list[torch.Tensor], spec: TensorSpec) -> torch.Tensor:
    """A tensor from its row chunks (as :meth:`TensorMerger.merged` yields them)."""
    value = parts[0] if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])
    return value.reshape(spec.shape)
