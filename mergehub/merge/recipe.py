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

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergehub.errors import MergehubError, did_you_mean, shown

TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "tokenizer_source"}
UNSUPPORTED = {"slices": "layer slicing (passthrough/frankenmerges) is not supported",
               "tokenizer": "tokenizer surgery is not supported; use tokenizer_source",
               "chat_template": "chat_template is not supported"}
DTYPES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
          "bfloat16": "BF16", "bf16": "BF16"}


class RecipeError(MergehubError):
    """A recipe that cannot be run; the message starts with ``FILE:LINE:``."""


#: most values a YAML document may hold once its aliases are expanded: a recipe or training
#: config has a few dozen, while a "billion laughs" file of a few hundred bytes, aliases of
#: aliases, expands to billions and makes anything that walks it (a message, a check) hang
MAX_YAML_VALUES = 100_000
#: deepest nesting of lists and mappings accepted (a recipe needs 5 levels)
MAX_YAML_DEPTH = 32
#: longest model reference or method name accepted (a path is at most 4096 bytes on Linux)
MAX_TEXT = 4096


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings remember the line of each key (1-based), refusing duplicate
    keys, recursive aliases and documents that expand past :data:`MAX_YAML_VALUES` values or
    nest deeper than :data:`MAX_YAML_DEPTH` levels."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Count the values of the document at ``root`` as if every alias were written out, and
    its depth, without expanding anything (each node is visited once; no recursion)."""
    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    def refuse(node: yaml.Node, problem: str) -> None:
        raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)

    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once expanded
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finish = stack.pop()
        if id(node) in done:
            continue
        if not finish:
            if id(node) in open_nodes:  # reached again below itself
                refuse(node, "a recursive alias (a value that contains itself)")
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children(node))
            continue
        sub = [done[id(child)] for child in children(node)]
        values = 1 + sum(v for v, _ in sub)
        depth = 1 + max((d for _, d in sub), default=0)
        if values > MAX_YAML_VALUES:
            refuse(node, f"aliases expand this to more than {MAX_YAML_VALUES} values; write "
                         "the values out instead")
        if depth > MAX_YAML_DEPTH:
            refuse(node, f"nested deeper than {MAX_YAML_DEPTH} levels")
        done[id(node)] = (values, depth)
        open_nodes.discard(id(node))


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> "LineDict":
    first: dict[tuple[str, str], yaml.Node] = {}
    for key, _ in node.value:  # before merge keys (<<) are flattened in: those may repeat
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            seen = first.setdefault((key.tag, key.value), key)
            if seen is not key:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shown(key.value)} (first on line "
                    f"{seen.start_mark.line + 1}): a repeated key would silently override it",
                    key.start_mark)
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


def load_yaml(text: str, source: str, error: type[MergehubError]) -> Any:
    """Parse a recipe or training config with :class:`_LineLoader`; anything wrong with the
    YAML itself (syntax, a duplicate key, an alias bomb, deep nesting) raises ``error``
    ``"SOURCE:LINE: not valid YAML: ..."``."""
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise error(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:  # nesting deep enough to exhaust the parser's stack
        raise error(f"{source}: not valid YAML: nested deeper than {MAX_YAML_DEPTH} "
                    "levels") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise error(f"{source}: not valid YAML: {e}") from None


def leaves(value: Any) -> Iterator[Any]:
    """The scalars inside a parsed YAML value (nested lists and mappings walked with a stack)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        else:
            yield node


def scalar_text(mapping: LineDict, key: str, source: str, what: str,
                error: type[MergehubError] = RecipeError) -> str | None:
    """``mapping[key]`` as a string (a YAML scalar: text or a number), ``None`` if absent;
    anything else (a list, a mapping, true/false, text longer than any path or name can be:
    :data:`MAX_TEXT`) raises ``error`` naming the line."""
    value = mapping.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or \
            len(text := str(value)) > MAX_TEXT:
        line = mapping.line_of(key)
        raise error(f"{source}{f':{line}' if line else ''}: {key}: must be {what} (at most "
                    f"{MAX_TEXT} characters), not {shown(value)}")
    return text


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and check the structure of a recipe (parameter values are checked by the engine
    against the method's parameter rules)."""
    doc = load_yaml(text, source, RecipeError)
    if not isinstance(doc, LineDict):
        raise _fail(source, "a recipe is a YAML mapping with merge_method, models, ...")
    for key in doc:
        if key in UNSUPPORTED:
            raise _fail(f"{source}:{doc.line_of(key)}", f"{key!r}: {UNSUPPORTED[key]}")
        if key not in TOP_LEVEL:
            raise _fail(f"{source}:{doc.line_of(key)}",
                        f"unknown key {shown(key)}{did_you_mean(key, sorted(TOP_LEVEL))}")
    method = scalar_text(doc, "merge_method", source, "a method name")
    if method is None:
        raise _fail(source, "missing merge_method")
    models_raw = doc.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise _fail(f"{source}:{doc.line_of('models')}", "models: must be a non-empty list")
    models = []
    for item in models_raw:
        if isinstance(item, str):
            if len(item) > MAX_TEXT:
                raise _fail(f"{source}:{doc.line_of('models')}", f"models: a model reference "
                            f"has at most {MAX_TEXT} characters, not {shown(item)}")
            models.append(ModelEntry(item, {}, doc.line_of("models")))
            continue
        if not isinstance(item, LineDict) or "model" not in item:
            raise _fail(f"{source}:{getattr(item, 'line', doc.line_of('models'))}",
                        "each models: item needs a 'model:' key")
        for key in item:
            if key not in ("model", "parameters"):
                raise _fail(f"{source}:{item.line_of(key)}",
                            f"unknown key {shown(key)} in a models: item"
                            f"{did_you_mean(key, ['model', 'parameters'])}")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise _fail(f"{source}:{item.line_of('parameters')}", "parameters: must be a mapping")
        ref = scalar_text(item, "model", source, "a path or store name")
        if ref is None:
            raise _fail(f"{source}:{item.line_of('model')}", "model: is empty")
        models.append(ModelEntry(ref, params, item.line))
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail(f"{source}:{doc.line_of('parameters')}", "parameters: must be a mapping")
    for key in ("dtype", "out_dtype"):
        value = doc.get(key)
        if value is not None and not (isinstance(value, str) and value in DTYPES):
            raise _fail(f"{source}:{doc.line_of(key)}",
                        f"{key} {shown(value)} is not one of {', '.join(DTYPES)}")
    return Recipe(
        merge_method=method, base_model=scalar_text(doc, "base_model", source, "a path or store name"),
        models=models, parameters=params, dtype=doc.get("dtype"),
        out_dtype=doc.get("out_dtype"),
        tokenizer_source=scalar_text(doc, "tokenizer_source", source, "'base' or a model"),
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
