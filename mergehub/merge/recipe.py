"""Merge recipes: mergekit's YAML format, read with line numbers so every error can point at one.

A recipe (mergekit's keys, accepted as is for the methods both tools have)::

    merge_method: ties
    base_model: ./base                 # path or store name
    models:
      - model: ./math-sft
        parameters: {weight: 1.0, density: 0.2}
      - model: code-sft                # a store name
        parameters: {weight: 0.5, density: 0.2}
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32                     # accepted; arithmetic is always float32 (see docs)
    out_dtype: bfloat16                # default: the base's dtype
    tokenizer_source: base             # base | a model's reference: config/tokenizer files

Unknown keys and parameters are errors naming the line (a typo must not be ignored silently).
Parameter values are scalars, or mergekit's gradient lists (``[0, 0.5, 1]``, interpolated over
the layer index) and filter lists (``[{filter: self_attn, value: 0.5}, {value: 1}]``); see
:func:`resolve_value`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergehub.errors import MergehubError

TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "tokenizer_source"}
UNSUPPORTED = {"slices": "layer slicing (passthrough/frankenmerges) is not supported",
               "tokenizer": "tokenizer surgery is not supported; use tokenizer_source",
               "chat_template": "chat_template is not supported"}
DTYPES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
          "bfloat16": "BF16", "bf16": "BF16"}


class RecipeError(MergehubError):
    """A recipe that cannot be run; the message starts with ``FILE:LINE:``."""


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings remember the line of each key (1-based)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> "LineDict":
    mapping = LineDict(loader.construct_mapping(node, deep=True))
    mapping.line = node.start_mark.line + 1
    mapping.key_lines = {k.value: k.start_mark.line + 1 for k, _ in node.value
                         if isinstance(k, yaml.ScalarNode)}
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class LineDict(dict):
    """A dict parsed from YAML, with ``line`` and ``key_lines`` for messages."""

    line: int = 0
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return getattr(self, "key_lines", {}).get(key, self.line)


@dataclass
class ModelEntry:
    """One ``models:`` item: the reference and its parameters (raw recipe values)."""

    model: str
    parameters: dict[str, Any]
    line: int


@dataclass
class Recipe:
    """A parsed recipe. ``where(line)`` formats a location for messages."""

    merge_method: str
    base_model: str | None
    models: list[ModelEntry]
    parameters: dict[str, Any]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    source: str = "<recipe>"
    text: str = ""
    lines: dict[str, int] = field(default_factory=dict)

    def where(self, line: int | None = None) -> str:
        return f"{self.source}:{line}" if line else self.source


def load_recipe(path_or_text: str | Path, *, source: str | None = None) -> Recipe:
    """Parse a recipe from a YAML file path, or from YAML text (``source`` names it)."""
    if isinstance(path_or_text, Path) or (isinstance(path_or_text, str)
                                          and "\n" not in path_or_text
                                          and path_or_text.endswith((".yaml", ".yml"))):
        path = Path(path_or_text)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise RecipeError(f"{path}: cannot read recipe: {e.strerror or e}") from e
        return parse_recipe(text, source or str(path))
    return parse_recipe(str(path_or_text), source or "<recipe>")


def _fail(where: str, message: str) -> RecipeError:
    return RecipeError(f"{where}: {message}")


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and check the structure of a recipe (method parameters are checked by the engine,
    which knows each method's parameters)."""
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise _fail(where, f"not valid YAML: {getattr(e, 'problem', e)}") from e
    if not isinstance(doc, LineDict):
        raise _fail(source, "a recipe is a YAML mapping with merge_method, models, ...")
    for key in doc:
        if key in UNSUPPORTED:
            raise _fail(f"{source}:{doc.line_of(key)}", f"{key!r}: {UNSUPPORTED[key]}")
        if key not in TOP_LEVEL:
            raise _fail(f"{source}:{doc.line_of(key)}",
                        f"unknown key {key!r}{did_you_mean(key, sorted(TOP_LEVEL))}")
    if "merge_method" not in doc:
        raise _fail(source, "missing merge_method")
    models_raw = doc.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise _fail(f"{source}:{doc.line_of('models')}", "models: must be a non-empty list")
    models = []
    for item in models_raw:
        if isinstance(item, str):
            models.append(ModelEntry(item, {}, doc.line_of("models")))
            continue
        if not isinstance(item, LineDict) or "model" not in item:
            raise _fail(f"{source}:{getattr(item, 'line', doc.line_of('models'))}",
                        "each models: item needs a 'model:' key")
        for key in item:
            if key not in ("model", "parameters"):
                raise _fail(f"{source}:{item.line_of(key)}",
                            f"unknown key {key!r} in a models: item"
                        f"{did_you_mean(key, ['model', 'parameters'])}")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise _fail(f"{source}:{item.line_of('parameters')}", "parameters: must be a mapping")
        models.append(ModelEntry(str(item["model"]), params, item.line))
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail(f"{source}:{doc.line_of('parameters')}", "parameters: must be a mapping")
    for key in ("dtype", "out_dtype"):
        if doc.get(key) is not None and str(doc[key]) not in DTYPES:
            raise _fail(f"{source}:{doc.line_of(key)}",
                        f"{key} {doc[key]!r} is not one of {', '.join(DTYPES)}")
    base = doc.get("base_model")
    return Recipe(
        merge_method=str(doc["merge_method"]), base_model=None if base is None else str(base),
        models=models, parameters=params, dtype=doc.get("dtype"),
        out_dtype=doc.get("out_dtype"), tokenizer_source=doc.get("tokenizer_source"),
        source=source, text=text, lines=dict(getattr(doc, "key_lines", {})))


_LAYER = re.compile(r"\.layers?\.(\d+)\.|\.h\.(\d+)\.|\.blocks?\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to (``model.layers.7.mlp...`` -> 7), if any."""
    m = _LAYER.search(f".{tensor_name}")
    return int(next(g for g in m.groups() if g is not None)) if m else None


def resolve_value(value: Any, tensor_name: str, num_layers: int) -> Any:
    """A parameter's value for one tensor, as mergekit 0.1.5 evaluates it.

    * scalar: itself;
    * filter list ``[{filter: S, value: V}, ..., {value: default}]`` (or one such mapping): the
      first entry whose ``filter`` is absent, ``"*"`` or a substring of the tensor name; ``None``
      when none matches (the caller then falls back to the next scope);
    * gradient list ``[v0, ..., vm]``: at t = layer / (num_layers − 1) (t = 1 for one layer,
      t = 0 for tensors outside the layers: embeddings, final norm, head), numbers are
      interpolated linearly between the two nearest values; other values are picked at
      index int(t·m).
    """
    if isinstance(value, dict) and "value" in value:
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            f = entry.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return resolve_value(entry.get("value"), tensor_name, num_layers)
        return None
    if isinstance(value, list) and value:
        idx = layer_index(tensor_name)
        t = 0.0 if idx is None else (1.0 if num_layers <= 1 else idx / (num_layers - 1))
        m = len(value) - 1
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return value[int(t * m)]
        pos = t * m
        lo = int(pos)
        hi = min(m, lo + 1)
        frac = pos - lo
        return (1 - frac) * float(value[lo]) + frac * float(value[hi])
    return value


def resolve_params(candidates: dict[str, list[Any]], tensor_name: str,
                   num_layers: int) -> dict[str, Any]:
    """Per-tensor parameters from candidate values in priority order (model, top level,
    metrics, default): the first that resolves to something other than ``None`` wins."""
    out: dict[str, Any] = {}
    for key, options in candidates.items():
        out[key] = None
        for option in options:
            value = resolve_value(option, tensor_name, num_layers)
            if value is not None:
                out[key] = value
                break
    return out
