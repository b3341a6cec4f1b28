"""The plan of a merge: the recipe resolved to its inputs, checked against each other and the
base before anything is computed (:func:`plan_merge`), and the files besides the weights that
the output carries (:func:`side_files`). Every runner (:func:`mergehub.merge.engine.execute`,
Ray tasks, the PEFT and RMM writers, the live composer) starts from a :class:`MergePlan`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from mergehub.errors import BaseMismatchError, InputError, MergehubError, shown, spelled
from mergehub.merge.inputs import Source, resolve_input
from mergehub.merge.methods import METHODS, MergeMethod
from mergehub.merge.methods.base import value_problem
from mergehub.merge.recipe import (
    DTYPES, LineDict, ModelEntry, Recipe, RecipeError, did_you_mean, layer_index, resolve_params)
from mergehub.safejson import parse_json
from mergehub.storage.safetensors_format import FLOAT_DTYPES, TensorSpec
from mergehub.storage.store import Store, StoredModel
from mergehub.storage.writer import MODEL_SIDE_FILES, NOT_CARRIED
from mergehub.units import human_bytes

MISSING_POLICIES = ("error", "take-base")


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
    try:
        method.validate([resolve_params(p, "", 1) for p in model_params],
                        [s.label for s in inputs])
    except ValueError as err:
        raise RecipeError(f"{recipe.where()}: merge_method {method_cls.name}: {err}") from err
    # a pre-pass (known once validated) sees every tensor under one value per model of the
    # parameters it reads (other parameters may still vary by layer or tensor)
    prepass = method.prepass
    varying = sorted({key for p in model_params for key in (prepass.reads if prepass else ())
                      if p.get(key) and isinstance(p[key][0], (list, dict))})
    if varying:
        raise RecipeError(f"{recipe.where()}: merge_method {method_cls.name} with these global "
                          f"parameters needs one plain {' and '.join(varying)} per model (its "
                          "pre-pass sees the whole model at once), not a gradient or filter")
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


def side_files(plan: MergePlan) -> dict[str, bytes | Path]:
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
