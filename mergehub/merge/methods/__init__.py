"""Merge methods, registered by name in :data:`METHODS`: a module per method (a
:class:`MergeMethod` subclass), and the task-arithmetic family's members, one line each in
:mod:`~mergehub.merge.methods.members`."""

from mergehub.merge.methods.base import METHODS, MergeMethod, TensorContext, register
from mergehub.merge.methods import (  # noqa: F401  (importing registers them)
    linear, members, metric_weighted, rmm)

__all__ = ["METHODS", "MergeMethod", "TensorContext", "register"]
