"""Merge methods, one module each, registered by name in :data:`METHODS`."""

from mergehub.merge.methods.base import METHODS, MergeMethod, TensorContext, register
from mergehub.merge.methods import (  # noqa: F401  (importing registers them)
    breadcrumbs, consensus, dare, linear, metric_weighted, rmm, task_arithmetic, ties)

__all__ = ["METHODS", "MergeMethod", "TensorContext", "register"]
