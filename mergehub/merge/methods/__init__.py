"""Merge methods, one module each, registered by name in :data:`METHODS`."""

from mergehub.merge.methods.base import METHODS, REQUIRED, MergeMethod, TensorContext, register
from mergehub.merge.methods import linear, task_arithmetic  # noqa: F401  (registers them)

__all__ = ["METHODS", "REQUIRED", "MergeMethod", "TensorContext", "register"]
