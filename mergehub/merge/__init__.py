"""Merging: recipes, streamed execution, and the methods (task arithmetic, TIES, DARE, ...).

``mergehub.merge`` is both this package and the merge function: ``mergehub.merge(recipe,
out=...)`` calls :func:`mergehub.merge.engine.merge` (the module is made callable so that the
subpackages stay importable under the same name).
"""

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from mergehub.merge.engine import merge

        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
