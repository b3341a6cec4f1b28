"""What a :class:`~mergehub.compose.Composer` remembers its work by: a recipe's plan by the
recipe's text, options and the catalog's version (:func:`plan_key`), and each merged tensor
by a digest of everything its value depends on (:func:`tensor_keys`), so that a second apply
plans nothing and rewrites only the tensors whose result changes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from mergehub.merge.inputs import Source
from mergehub.merge.recipe import Recipe
from mergehub.merge.tensors import TensorMerger
from mergehub.storage.store import Store

#: how many recipes' plans (and recorded launches) a Composer remembers
#: (:meth:`Composer._planned`, :meth:`Composer._replayed`)
PLAN_MEMO = 16


def plan_key(store: Store | None, recipe: str | Path | dict[str, Any] | Recipe, seed: int,
             missing: str, allow_foreign_base: bool) -> Hashable | None:
    """What :meth:`Composer._planned` remembers a plan by: the recipe's text (a dict's JSON),
    the options and the catalog's version of ``store`` (``None``: not remembered: a parsed
    Recipe object, no store)."""
    if store is None or isinstance(recipe, Recipe):
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
            store.catalog_version())


def tensor_keys(merger: TensorMerger, names: list[str]) -> dict[str, str]:
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
    if plan.method.prepass is not None:  # global statistics: every tensor of every input
        common += (sorted(plan.copy_from_base),
                   [[content(src, s.name) for s in plan.specs
                     if s.name not in plan.copy_from_base] for src in plan.inputs])
    common = digest(common)  # once: each tensor's key holds it (with a pre-pass: every tensor's)
    out = {}
    for name in names:
        spec = specs[name]
        base = content(merger.reference, name)
        if name in plan.copy_from_base:
            out[name] = digest(("copy", base, spec.dtype))
        else:
            out[name] = digest((common, name, spec.dtype, base,
                                [content(src, name) for src in plan.inputs],
                                merger.params(spec)))
    return out


def digest(value: Any) -> str:
    """A SHA-256 of ``value``'s ``repr`` (what :func:`tensor_keys` compares)."""
    return hashlib.sha256(repr(value).encode()).hexdigest()
