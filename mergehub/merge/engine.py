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
import json
import math
import sys
import time
from contextlib import ExitStack, closing, contextmanager, nullcontext
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergehub.errors import BaseMismatchError, InputError, MergehubError, shown, spelled
from mergehub.merge.inputs import FLOAT_DTYPES, Source, matrix_shape, resolve_input
from mergehub.merge.methods import METHODS, MergeMethod, TensorContext
from mergehub.merge.methods.base import value_problem
from mergehub.merge.methods.rmm import ReversibleMerge
from mergehub.merge.cluster import execute_ray, import_ray, ray_option
from mergehub.merge.lora_output import can_write_peft, execute_peft
from mergehub.merge.rmm import execute_rmm
from mergehub.merge.recipe import (
    DTYPES, LineDict, ModelEntry, Recipe, RecipeError, did_you_mean, layer_index, load_recipe,
    resolve_params)
from mergehub.progress import bar_disabled
from mergehub.safejson import parse_json
from mergehub.storage.parallel import LoadWatch, background, busy_machine, ordered_map
from mergehub.storage.safetensors_format import TORCH_DTYPE, TensorSpec
from mergehub.storage.store import Store, StoredModel
from mergehub.storage.writer import (
    DEFAULT_MAX_SHARD_SIZE, MODEL_SIDE_FILES, NOT_CARRIED, model_dir_layout, write_shard)
from mergehub.units import human_bytes

MISSING_POLICIES = ("error", "take-base")
#: where the tensors of a merge are computed: this process, or tasks on a Ray cluster
EXECUTORS = ("local", "ray")


class MergeError(MergehubError):
    """A merge that cannot be computed for some tensor (e.g. weights summing to zero)."""


@dataclass
class MergePlan:
    """Everything resolved and checked: what will be read, computed and written."""

    recipe: Recipe
    method: MergeMethod
    base: Source | None
    inputs: list[Source]
    model_params: list[dict[str, list[Any]]]  # per input: candidate values by priority
    specs: list[TensorSpec]  # output tensors, in output order
    copy_from_base: set[str]  # non-float tensors, or tensors some input lacks (take-base)
    notes: list[str] = field(default_factory=list)
    num_layers: int = 1
    out_dtype: str | None = None

    def describe(self) -> str:
        """The plan as text (what ``--dry-run`` prints)."""
        total = sum(s.nbytes for s in self.specs)
        lines = [f"method: {self.recipe.merge_method}  parameters: {self.method.params}",
                 f"base: {self.base.label if self.base else '-'}"]
        for src, params in zip(self.inputs, self.model_params):
            kind = f"LoRA ({len(src.lora)} target modules)" if src.is_lora else \
                f"dense ({len(src.specs)} tensors)"
            shown = {k: v[0] if v else None for k, v in params.items()}
            lines.append(f"input: {src.label}  {kind}  parameters: {shown}")
        lines.append(f"output: {len(self.specs)} tensors, {human_bytes(total)}, dtype "
                     f"{self.out_dtype or 'as base'}; {len(self.copy_from_base)} copied from the "
                     "base unmerged")
        if "density" in self.method.model_params:
            merged = [s for s in self.specs if s.name not in self.copy_from_base]
            densities = [[float(resolve_params(p, s.name, self.num_layers)["density"])
                          for p in self.model_params] for s in merged]
            numels = [math.prod(s.shape) for s in merged]
            plan = self.method.planned_kept(densities, numels)
            if plan is not None:
                counts, word = plan
                lines.append(kept_line([s.label for s in self.inputs], counts,
                                       [sum(numels)] * len(counts), f"will keep {word}"))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def kept_line(labels: list[str], kept: list[float], seen: list[int], verb: str) -> str:
    """One line: the share of its task-vector entries each input's sparsification keeps."""
    shares = ", ".join(f"{label} {k / n:.2%} ({round(k):,} of {n:,})" if n else f"{label} -"
                       for label, k, n in zip(labels, kept, seen))
    return f"sparsification {verb}: {shares}"


def _line(mapping: dict[str, Any], key: str, default: int | None) -> int | None:
    """The recipe line of ``key`` in a parsed mapping, else ``default``."""
    return mapping.line_of(key) if isinstance(mapping, LineDict) else default


def _check_params(recipe: Recipe, method_cls: type[MergeMethod]) -> None:
    """Every parameter the recipe gives is one of the method's, with a value its rule
    accepts (:data:`~mergehub.merge.methods.base.PARAM_RULES`); errors name the line."""
    known_global = sorted(method_cls.global_params)
    for key, value in recipe.parameters.items():
        line = _line(recipe.parameters, key, recipe.lines.get("parameters"))
        if key not in method_cls.global_params:
            raise RecipeError(f"{recipe.where(line)}: unknown parameter {shown(key)} for "
                              f"merge_method {method_cls.name}{did_you_mean(key, known_global)} "
                              f"(known: {', '.join(known_global) or 'none'})")
        _check_value(recipe, line, method_cls, key, value)
    known_model = sorted(method_cls.model_params)
    for entry in recipe.models:
        for key, value in entry.parameters.items():
            line = _line(entry.parameters, key, entry.line)
            if key not in method_cls.model_params:
                raise RecipeError(
                    f"{recipe.where(line)}: unknown parameter {shown(key)} for a model of "
                    f"merge_method {method_cls.name}{did_you_mean(key, known_model)} "
                    f"(known: {', '.join(known_model)})")
            _check_value(recipe, line, method_cls, key, value)


def _check_value(recipe: Recipe, line: int | None, method_cls: type[MergeMethod], key: str,
                 value: Any) -> None:
    problem = value_problem(method_cls.rule(key), value)
    if problem:
        raise RecipeError(f"{recipe.where(line)}: {method_cls.name} parameter {key} {problem}")


def _foreign(store: Store, name: str, base: Source) -> str | None:
    """How the recipe's base ``base`` differs from stored model ``name``, or ``None`` when it is
    that model: the same entry, one with the same fingerprint, or a checkpoint whose every
    tensor has the dtype, shape and sha256 that ``name``'s has (hashed, smallest first)."""
    if isinstance(base.reader, StoredModel):
        same = base.reader.name == name or store.fingerprint(base.reader.name) == \
            store.fingerprint(name)
        return None if same else f"another stored model than {name!r}"
    recorded = store.tensor_digests(name)
    tensors = base.reader.tensors
    if set(recorded) != set(tensors):
        return f"not {name!r} (other tensor names)"
    for t in sorted(tensors, key=lambda t: (tensors[t].nbytes, t)):
        dtype, shape, digest = recorded[t]
        spec = tensors[t].spec
        if (spec.dtype, list(spec.shape)) != (dtype, json.loads(shape)) or \
                base.reader.sha256(t) != digest:
            return f"not {name!r} (tensor {t!r} differs)"
    return None


def _check_bases(recipe: Recipe, base: Source | None, entries: list[ModelEntry],
                 inputs: list[Source], store: Store | None, allow: bool,
                 notes: list[str]) -> None:
    """Each store input that was added against a base (a fine-tune or adapter, kept as deltas
    of it) must be merged against that base: its task vector θt − θ0 means nothing against
    another model. An error naming the recipe line, unless ``allow`` (then a note)."""
    if base is None or store is None:
        return
    for entry, src in zip(entries, inputs):
        info = src.reader.info if isinstance(src.reader, StoredModel) else None
        if src is base or info is None or info.base is None:
            continue
        problem = _foreign(store, info.base, base)
        if problem is None:
            continue
        what = (f"input {src.label!r} was added to the store against base {info.base!r}, but "
                f"base_model {base.label!r} is {problem}")
        if allow:
            notes.append(f"{what}: merged against it anyway "
                         f"({spelled('allow_foreign_base=True', '--allow-foreign-base')})")
            continue
        raise BaseMismatchError(f"{recipe.where(entry.line)}: {what}; its task vector would be "
                                "taken against the wrong model. Pass "
                                f"{spelled('allow_foreign_base=True', '--allow-foreign-base')} "
                                "to merge it anyway")


def _take_base() -> str:
    """``missing="take-base"`` as the caller spells it (error messages)."""
    return spelled('missing="take-base"', "--missing take-base")


def plan_merge(recipe: Recipe, *, store: Store | None = None, missing: str = "error",
               allow_foreign_base: bool = False) -> MergePlan:
    """Resolve the recipe's inputs and check that they can be merged, reading headers only
    (and, for store inputs added against another base than a base_model given as a path,
    hashing that base's tensors to tell whether it is the same model)."""
    if missing not in MISSING_POLICIES:
        raise InputError(f"{spelled('missing', '--missing')} must be one of "
                         f"{', '.join(MISSING_POLICIES)}, not {missing!r}")
    method_cls = METHODS.get(recipe.merge_method)
    if method_cls is None:
        raise RecipeError(f"{recipe.where(recipe.lines.get('merge_method'))}: unknown merge_method "
                          f"{shown(recipe.merge_method)}"
                          f"{did_you_mean(recipe.merge_method, sorted(METHODS))} "
                          f"(known: {', '.join(sorted(METHODS))})")
    _check_params(recipe, method_cls)
    global_params = {k: v for k, v in recipe.parameters.items() if k in method_cls.global_params}
    method = method_cls(global_params)
    base = (resolve_input(recipe.base_model, store, recipe.where(recipe.lines.get("base_model")))
            if recipe.base_model is not None else None)
    if method_cls.needs_base and base is None:
        raise RecipeError(f"{recipe.where()}: merge_method {method_cls.name} needs a base_model")
    if base is not None and base.is_lora:
        raise RecipeError(f"{recipe.where(recipe.lines.get('base_model'))}: base_model "
                          f"{base.label!r} is a LoRA adapter, not a model")
    entries = [e for e in recipe.models
               if not (base is not None and e.model == recipe.base_model and method_cls.on_deltas)]
    notes = []
    if len(entries) < len(recipe.models):
        notes.append("base_model is also listed in models: its task vector is zero, skipped")
    listed = {e.model for e in entries}
    if (method_cls.base_is_input and base is not None and recipe.base_model not in listed
            and "weight" in recipe.parameters):
        entries.append(ModelEntry(recipe.base_model, {}, recipe.lines.get("base_model", 0)))
        notes.append("base_model joins the average with the top-level weight (as in mergekit)")
    inputs = [base if e.model == recipe.base_model and base is not None else
              resolve_input(e.model, store, recipe.where(e.line)) for e in entries]
    if not inputs:
        raise RecipeError(f"{recipe.where()}: nothing to merge besides the base model")
    _check_bases(recipe, base, entries, inputs, store, allow_foreign_base, notes)
    model_params = []
    for e, src in zip(entries, inputs):
        from_metrics = method_cls.params_from_metrics(src.metrics)
        model_params.append({
            key: [v for v in (e.parameters.get(key), recipe.parameters.get(key),
                              from_metrics.get(key), default)
                  if v is not None]
            for key, default in method_cls.model_params.items()})
    if method.prepass_rounds() and any(isinstance(v[0], (list, dict)) for p in model_params
                                       for v in p.values() if v):
        raise RecipeError(f"{recipe.where()}: merge_method {method_cls.name} with these global "
                          "parameters needs plain numbers per model, not gradients or filters")
    try:
        method.validate([resolve_params(p, "", 1) for p in model_params],
                        [s.label for s in inputs])
    except ValueError as err:
        raise RecipeError(f"{recipe.where()}: merge_method {method_cls.name}: {err}") from err
    reference = base if base is not None else inputs[0]
    if reference.is_lora:
        raise RecipeError(f"{recipe.where()}: LoRA inputs need a base_model to merge into")
    specs, copy = _check_tensors(reference, inputs, entries, recipe, missing, notes)
    out_dtype = DTYPES.get(str(recipe.out_dtype or recipe.dtype)) if (recipe.out_dtype or recipe.dtype) else None
    if out_dtype:
        specs = [TensorSpec(s.name, out_dtype, s.shape) if s.dtype in FLOAT_DTYPES else s
                 for s in specs]
    layers = [layer_index(s.name) for s in specs]
    num_layers = max((i for i in layers if i is not None), default=0) + 1
    return MergePlan(recipe, method, base, inputs, model_params, specs, copy, notes,
                     num_layers, out_dtype)


def _check_tensors(reference: Source, inputs: list[Source], entries: list, recipe: Recipe,
                   missing: str, notes: list[str]) -> tuple[list[TensorSpec], set[str]]:
    """Output specs and the tensors to copy from the reference; errors for what cannot merge."""
    ref_specs = reference.specs
    copy: set[str] = {n for n, s in ref_specs.items() if s.dtype not in FLOAT_DTYPES}
    for src, entry in zip(inputs, entries):
        where = f"{recipe.where(entry.line)}: input {src.label!r}"
        if src.is_lora:
            for target in src.lora:
                if target not in ref_specs:
                    raise BaseMismatchError(f"{where}: LoRA targets {target!r}, which the base "
                                            f"{reference.label!r} does not have")
            continue
        for name, spec in ref_specs.items():
            if name in copy:
                continue
            theirs = src.specs.get(name)
            problem = None
            if theirs is None:
                problem = f"has no tensor {name!r} (the base has it)"
            elif theirs.shape != spec.shape:
                problem = (f"tensor {name!r} has shape {list(theirs.shape)} but the base has "
                           f"{list(spec.shape)}")
            elif theirs.dtype not in FLOAT_DTYPES:
                problem = f"tensor {name!r} is {theirs.dtype}, not a float"
            if problem:
                if missing == "error":
                    raise BaseMismatchError(f"{where} {problem}; pass {_take_base()} to use "
                                            "the base's tensor there")
                copy.add(name)
                notes.append(f"{src.label} {problem}: taking the base's tensor")
        extra = sorted(set(src.specs) - set(ref_specs))
        if extra:
            if missing == "error":
                raise BaseMismatchError(f"{where} has tensor {extra[0]!r}, which the base lacks "
                                        f"({len(extra)} such); pass {_take_base()} to "
                                        "ignore them")
            notes.append(f"{src.label}: {len(extra)} tensors the base lacks are ignored")
    return list(ref_specs.values()), copy


def _side_files(plan: MergePlan) -> dict[str, bytes | Path]:
    """The base's files besides its weights, at any depth, but those that would be wrong for
    the merge (:data:`~mergehub.storage.writer.NOT_CARRIED`); tokenizer files from
    ``tokenizer_source``."""
    def files_of(src: Source, keep: Callable[[str], bool]) -> dict[str, bytes | Path]:
        reader = src.reader
        if isinstance(reader, StoredModel):
            return {p: reader.side_file(p) for p in reader.side_files if keep(p)}
        return {p: reader.local_file(p) for p in reader.side_files if keep(p)}

    reference = plan.base or plan.inputs[0]
    out = files_of(reference, lambda p: not NOT_CARRIED.search(p))
    source = plan.recipe.tokenizer_source
    if source not in (None, "base"):
        match = [s for s in plan.inputs if s.label == source]
        if not match:
            raise RecipeError(f"{plan.recipe.where(plan.recipe.lines.get('tokenizer_source'))}: "
                              f"tokenizer_source {shown(source)} is not one of the models")
        out = {k: v for k, v in out.items() if not k.startswith(("tokenizer", "special_tokens",
                                                                 "added_tokens", "vocab", "merges"))}
        out.update(files_of(match[0], lambda p: MODEL_SIDE_FILES.match(p) is not None
                            and p not in ("config.json", "generation_config.json")))
    if "config.json" in out and plan.out_dtype:
        text = out["config.json"]
        config = parse_json(text.read_bytes() if isinstance(text, Path) else text,
                            f"{reference.label}: config.json")
        if not isinstance(config, dict):
            raise InputError(f"{reference.label}: config.json is not a JSON object")
        name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[plan.out_dtype]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
        out["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return out


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
        #: results of the method's pre-pass (:meth:`prepass`), e.g. global TIES thresholds
        self.state: dict[str, Any] = {}
        #: called before each chunk is read, in every pass (:func:`execute`: LoadWatch.check)
        self.between_chunks: Callable[[], None] = lambda: None
        self.reference = plan.base or plan.inputs[0]

    def params(self, spec: TensorSpec) -> list[dict[str, Any]]:
        """Each input's parameters resolved for tensor ``spec`` (gradients, filters)."""
        return [resolve_params(p, spec.name, self.plan.num_layers) for p in self.plan.model_params]

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
        """The method's full passes over every tensor before merging (global statistics)."""
        method = self.plan.method
        mergeable = [s for s in self.plan.specs if s.name not in self.plan.copy_from_base]
        rnd = 0
        while rnd < method.prepass_rounds():
            for spec in tqdm(mergeable, desc=f"pre-pass {rnd + 1}", unit="tensor",
                             disable=bar_disabled(progress), leave=False):
                ctx = TensorContext(spec.name, self.device, self.seed, self.state)
                for _, xs in self._chunks(spec, row_ranges(spec, self.chunk)):
                    method.observe(rnd, xs, self.params(spec), ctx)
            method.finish_round(rnd, self.state)
            rnd += 1

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
        try:
            yield from (self._fused(spec, raw) if raw is not None else self._chunked(spec))
        except (ValueError, TypeError) as err:  # bad parameter values for this tensor
            raise MergeError(f"tensor {spec.name!r}: {self.plan.recipe.merge_method}: "
                             f"{err}") from err

    def _chunked(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        method, params = self.plan.method, self.params(spec)
        ranges = row_ranges(spec, self.chunk)
        dtype = TORCH_DTYPE[spec.dtype]
        sources = [src for src in (self.plan.base, *self.plan.inputs) if src is not None]
        ctx = TensorContext(spec.name, self.device, self.seed,
                            {**self.state, "numel": math.prod(spec.shape),
                             "row_starts": [r0 for r0, _ in ranges],
                             "any_rows": not any(src.in_order(spec.name) for src in sources)},
                            row_size=matrix_shape(spec)[1], out_dtype=dtype)

        def chunks(which: list[int] | None = None,
                   rows: list[tuple[int, int]] | None = None) -> Iterator[tuple[
                       torch.Tensor | None, list[torch.Tensor]]]:
            return self._chunks(spec, ranges if rows is None else rows, which)

        for part in method.merge_chunks(chunks, ranges, params, ctx):
            yield part.to(dtype)

    def _fused(self, spec: TensorSpec, raw: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        from mergehub import kernels

        params = self.params(spec)
        ctx = TensorContext(spec.name, self.device, self.seed,
                            {**self.state, "numel": math.prod(spec.shape)},
                            cut_memo=self.cut_memo)
        base, *thetas = (t if t.device == self.device else t.to(self.device, non_blocking=True)
                         for t in raw)
        args = self.plan.method.fused(base, thetas, params, ctx)
        yield kernels.merge_tensor(base, thetas, **args, out_dtype=TORCH_DTYPE[spec.dtype],
                                   name=spec.name)


def write_merged(merger: TensorMerger, files: list[tuple[Path, list[TensorSpec]]],
                 done: Callable[[TensorSpec], Any] | None = None) -> None:
    """Merge the tensors of ``files`` (shard path, its tensors in order) with ``merger`` and
    write each shard file (:func:`~mergehub.storage.writer.write_shard`); ``done(spec)`` after
    each tensor. What :func:`execute` runs for a whole model, and each Ray task of
    :mod:`mergehub.merge.cluster` for its shards.

    On the fused path the inputs' raw tensors are read on threads ahead of the merge
    (:data:`READ_WORKERS`); on a GPU, reading and merging also run a few chunks ahead of the
    writer, so reading, merging and writing overlap.
    """
    specs = [spec for _, shard in files for spec in shard]

    def produce() -> Iterator[tuple[str, torch.Tensor | None]]:
        """Every output chunk in write order, then ``(name, None)`` at the end of each tensor."""
        raws = (ordered_map(merger.raw_inputs, specs, workers=READ_WORKERS)
                if merger.fuse else (None for _ in specs))
        for spec, raw in zip(specs, raws):
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
    # on a busy machine, one intra-op thread: small ops split across cores stall (LoadWatch);
    # worth sampling before the start only for a merge that takes more than a moment, and
    # looked at again as the merge reads
    dev = merger.device
    busy = dev.type == "cpu" and sum(s.nbytes for s in plan.specs) >= BUSY_CHECK_BYTES \
        and busy_machine()
    with LoadWatch(busy) if dev.type == "cpu" else nullcontext() as watch:
        if watch is not None:
            merger.between_chunks = watch.check
        merger.prepass(progress)
        side = _side_files(plan)
        with byte_bar(sum(s.nbytes for s in plan.specs), "merge", progress) as bar, \
                model_dir_layout(out, plan.specs, max_shard_size=max_shard_size,
                                 side_files=side, overwrite=overwrite) as files:
            write_merged(merger, files, lambda spec: bar.update(spec.nbytes))
    return merge_result(plan, Path(out), time.perf_counter() - start)


def byte_bar(total: int, desc: str, progress: bool | None) -> tqdm:
    """The progress bar of a merge: bytes written of ``total``, and the rate."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                disable=bar_disabled(progress), leave=False)


def merge_result(plan: MergePlan, out: Path, seconds: float) -> MergeResult:
    """What a finished merge of ``plan`` into ``out`` reports (with the method's kept tally)."""
    tally = plan.method.kept_report()
    return MergeResult(out, len(plan.specs), sum(s.nbytes for s in plan.specs), seconds,
                       plan=plan, report=None if tally is None else {"kept": tally})


def merge(recipe: str | Path | Recipe, out: str | Path | None = None, *,
          store: Store | None = None, to_store: str | None = None, device: str = "cpu",
          missing: str = "error", seed: int = 0, dry_run: bool = False,
          max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
          output_format: str = "hf", progress: bool | None = None, allow_foreign_base: bool = False,
          echo: Callable[[str], Any] | None = None, executor: str = "local",
          ray_address: str | None = None) -> MergeResult:
    """Merge as a recipe says: write an HF model dir at ``out`` and/or a store entry ``to_store``.

    Args:
        recipe: a recipe file path, YAML text, or a parsed :class:`Recipe`.
        out: output directory (created atomically; must not exist unless ``overwrite``).
        store: store to resolve store names against and to add ``to_store`` into.
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


@contextmanager
def reusing_reads(plan: MergePlan) -> Iterator[None]:
    """Within the block, the stores that the plan's base and inputs come from keep the decoded
    bytes of the blobs the merge reads more than once (:meth:`Store.reusing`): a base tensor
    is then decoded once, not once more for each fine-tune whose delta references it."""
    stores: dict[int, tuple[Store, list[str]]] = {}
    for src in (plan.base, *plan.inputs):
        if src is not None and isinstance(src.reader, StoredModel):
            stores.setdefault(id(src.reader.store), (src.reader.store, []))[1].append(
                src.reader.name)
    with ExitStack() as stack:
        for store, names in stores.values():
            stack.enter_context(store.reusing(store.shared_blobs(names)))
        yield


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
