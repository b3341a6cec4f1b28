"""Reading JSON that comes from outside: safetensors headers, adapter and model configs, metrics
files beside checkpoints, pulled manifests, training data.

Python's parser recurses once per nesting level, so ``[[[[...`` a few thousand levels deep
raises ``RecursionError`` (a traceback, not a message), and a document a few hundred levels
deep parses but can break later code that walks it recursively (``json.dumps``, ``repr``).
No file mergehub reads needs more than a handful of levels, so every reader of such JSON goes
through :func:`parse_json` / :func:`read_json`, which refuse more than :data:`MAX_JSON_DEPTH`
levels with one line naming the file, as they do for text that is not JSON at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergehub.errors import InputError

#: deepest nesting accepted (a safetensors header needs 3 levels, an HF config about 5)
MAX_JSON_DEPTH = 64


def json_depth_exceeded(obj: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``obj`` nests lists and dicts more than ``limit`` levels deep (walked with an
    explicit stack: no recursion, whatever the depth)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) \
            else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(data: str | bytes, where: str) -> Any:
    """Parse untrusted JSON; :class:`~mergehub.errors.InputError` ``"{where}: ..."`` when it is
    not JSON or nests deeper than :data:`MAX_JSON_DEPTH` levels."""
    try:
        obj = json.loads(data)
    except RecursionError:
        deep = True
    except ValueError as e:  # not JSON, not UTF-8, or an integer of more than 4300 digits
        raise InputError(f"{where}: not valid JSON: {e}") from None
    else:
        deep = json_depth_exceeded(obj)
    if deep:
        raise InputError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return obj


def read_json(path: Path) -> Any:
    """:func:`parse_json` of the file at ``path`` (errors name the file)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_json(data, str(path))
