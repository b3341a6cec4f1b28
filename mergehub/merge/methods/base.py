"""The interface every merge method implements, and the registry the engine looks them up in."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch

from mergehub.errors import shown

if TYPE_CHECKING:
    from mergehub.ops.sparsify import KeptTally


@dataclass(frozen=True)
class Rule:
    """The values one merge parameter accepts.

    ``kind`` is ``number`` (finite, not a boolean), ``integer``, ``bool`` or ``choice``;
    numbers lie within ``low`` .. ``high`` (each bound inclusive unless ``*_open``).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()

    def accepts(self, value: Any) -> bool:
        """Whether one scalar value is acceptable."""
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":  # by type too: 1 is not true, 1.0 is not "1"
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "integer"
                                                      else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """What the rule accepts, for messages: ``a number in [0, 1]``."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join("true" if c is True else "false" if c is False
                                         else repr(c) for c in self.choices)
        what = "an integer" if self.kind == "integer" else "a finite number"
        if self.low is not None and self.high is not None:
            return (f"{what.replace('finite ', '')} in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{what.replace('finite ', '')} {'>' if self.low_open else '>='} {self.low:g}"
        return what


#: The recipe's parameter schema: what each merge parameter accepts, checked for every value a
#: recipe gives (each element of a gradient list, each filter entry's value) before anything
#: is read, so that a bad value is reported with its recipe line rather than as an all-NaN
#: model or a traceback mid-merge. A method that uses a name differently overrides it in its
#: ``param_rules``; every parameter of every method has a rule (tested).
PARAM_RULES: dict[str, Rule] = {
    "weight": Rule("number"),
    "lambda": Rule("number"),
    "density": Rule("number", 0, 1),
    "gamma": Rule("number", 0, 1),
    "tall_lambda": Rule("number", 0),
    "k": Rule("integer", 0),
    "normalize": Rule("bool"),
    "rescale": Rule("bool"),
    "int8_mask": Rule("bool"),
    "trim_scope": Rule("choice", choices=("tensor", "global")),
    "sign_method": Rule("choice", choices=("sum", "count")),
    "ties": Rule("choice", choices=("index", "threshold")),
    "density_tolerance": Rule("number", 0, 0.5, high_open=True),
    "m": Rule("integer", 1),
    "metric": Rule("choice", choices=("loss", "step")),
    "penalty": Rule("number", 0),
    "loss": Rule("number", 0, low_open=True),
    "step": Rule("number", 0, low_open=True),
}


def value_problem(rule: Rule, value: Any) -> str | None:
    """What is wrong with a parameter value as a recipe writes it (``must be ..., not ...``,
    to follow the parameter's name), or ``None``: a scalar, a gradient list of scalars, or
    filter entries ``{filter: TEXT, value: ...}`` (see
    :func:`mergehub.merge.recipe.resolve_value`)."""
    if isinstance(value, dict) or (isinstance(value, list) and value
                                   and all(isinstance(v, dict) for v in value)):
        for entry in value if isinstance(value, list) else [value]:
            if not set(entry) <= {"filter", "value"} or "value" not in entry:
                return (f"filter entries must be {{filter: TEXT, value: VALUE}}, "
                        f"not {shown(entry)}")
            if not isinstance(entry.get("filter", ""), str):
                return f"filters must be text, not {shown(entry['filter'])}"
            if isinstance(entry["value"], dict):
                return f"filter values must not be mappings, not {shown(entry['value'])}"
            problem = value_problem(rule, entry["value"])
            if problem:
                return problem
        return None
    if isinstance(value, list):
        if not value:
            return "must not be an empty list"
        for v in value:
            if not rule.accepts(v):
                return f"must be {rule.describe()} (or a list of them), not {shown(v)} in the list"
        return None
    return None if rule.accepts(value) else f"must be {rule.describe()}, not {shown(value)}"


class Prepass(Protocol):
    """Whole-model statistics a merge gathers before it merges any tensor (TIES' ``trim_scope:
    global``: each task's cut over its whole task vector, :class:`~mergehub.merge.methods.
    global_cuts.GlobalCuts`): what it needs of every tensor (:meth:`observe` sees each chunk of
    the inputs, as the method takes them, tensors in merge order, in full passes), how it
    accumulates them (:meth:`finish` ends a pass; :meth:`rounds` says how many), and per tensor
    the result the merge of its chunks reads (:meth:`for_tensor`, handed over as
    :attr:`TensorContext.prepassed`). Every runner (the chunked CPU path, the fused GPU path,
    the live composer) runs the passes through
    :meth:`~mergehub.merge.tensors.TensorMerger.prepass` and reads the results the same way;
    the object keeps its results (a Ray task gets the driver's finished ones with the plan),
    a finished one passes no more, and one cut short starts over (:meth:`reset`)."""

    #: full passes done so far
    passes: int
    #: the per-model parameters it reads: one plain value per model each (no gradient or
    #: filter, which would give each tensor its own)
    reads: tuple[str, ...]

    def rounds(self) -> int:
        """Passes needed in all; asked again after each pass (an earlier pass may show that
        fewer are needed)."""
        ...

    def observe(self, name: str, xs: list[torch.Tensor]) -> None:
        """See one chunk of tensor ``name`` during pass :attr:`passes` (chunks in order)."""
        ...

    def finish(self) -> None:
        """End the current pass (:attr:`passes` counts it)."""
        ...

    def reset(self) -> None:
        """Forget everything seen (a pass was cut short): the next run passes from the start."""
        ...

    def for_tensor(self, name: str, numel: int) -> Any:
        """After the passes, what merging tensor ``name`` (``numel`` entries) reads."""
        ...


@dataclass
class TensorContext:
    """What a method may know about the tensor it merges besides the values."""

    name: str
    device: torch.device
    seed: int = 0
    #: this tensor's result of the merge's pre-pass (:meth:`Prepass.for_tensor`; ``None``:
    #: the method has none)
    prepassed: Any = None
    rows: tuple[int, int] = (0, 0)  # the row range of the chunk being merged
    row_size: int = 0  # entries per row (the chunk's first flat position is rows[0]·row_size)
    numel: int = 0  # entries in the whole tensor
    #: whether every input can read any rows in any order (none decodes in order only)
    any_rows: bool = False
    #: the fused path's magnitude_cuts: a ``kernels.CutMemo`` where the caller keeps one
    #: (``None``: ``kernels.magnitude_cuts``)
    cut_memo: Any = None
    out_dtype: torch.dtype = torch.float32  # the dtype the merged tensor is written in

    @property
    def offset(self) -> int:
        """The flat position of the chunk's first entry in its tensor."""
        return self.rows[0] * self.row_size

    def key(self, *salt: object) -> int:
        """A 64-bit key from (seed, tensor name, salt): the same random draws whatever the
        order tensors are merged in or the number of workers."""
        digest = hashlib.sha256(repr((self.seed, self.name, salt)).encode()).digest()
        return int.from_bytes(digest[:8], "little")


class MergeMethod:
    """A merge method: per-model and global parameters with defaults, and a per-tensor merge.

    Subclasses set ``name``, ``model_params`` and ``global_params`` (name -> default),
    ``needs_base`` and ``on_deltas`` (whether :meth:`merge` gets task vectors
    τt = θt − θ0 or the weights θt), and implement :meth:`merge`. With ``base_is_input`` a
    base_model that ``models:`` does not list joins the inputs when the recipe gives a
    top-level ``weight`` for it (mergekit's linear).
    """

    name: ClassVar[str]
    model_params: ClassVar[dict[str, Any]] = {"weight": 1.0}
    global_params: ClassVar[dict[str, Any]] = {}
    needs_base: ClassVar[bool] = True
    on_deltas: ClassVar[bool] = True
    base_is_input: ClassVar[bool] = False  # mergekit's linear: the base is one of the averaged
    #: rules for parameters this method reads differently from :data:`PARAM_RULES`
    param_rules: ClassVar[dict[str, Rule]] = {}
    #: a sparsifying method's count of the entries it kept in the tensors this instance merged
    #: (a Ray task's copy sends its count back to the driver's, :meth:`KeptTally.absorb`)
    tally: KeptTally | None = None

    def __init__(self, params: dict[str, Any]):
        self.params = {**self.global_params, **params}

    @classmethod
    def rule(cls, name: str) -> Rule:
        """The rule for one of this method's parameters."""
        return cls.param_rules.get(name) or PARAM_RULES[name]

    @classmethod
    def params_from_metrics(cls, metrics: dict[str, Any]) -> dict[str, Any]:
        """Per-model parameter defaults taken from an input's metrics (store, or JSON beside it);
        the recipe's own values win. Most methods use none."""
        return {}

    def validate(self, model_params: list[dict[str, Any]], labels: list[str]) -> None:
        """Check the resolved per-model parameters; raise ``ValueError`` naming the input."""

    @property
    def prepass(self) -> Prepass | None:
        """The whole-model statistics this merge gathers before merging any tensor (known
        once :meth:`validate` has run); ``None`` for methods that merge each tensor on its
        own."""
        return None

    def merge_chunks(self, chunks: Callable[..., Iterable[tuple[torch.Tensor | None,
                                                                list[torch.Tensor]]]],
                     ranges: list[tuple[int, int]], model_params: list[dict[str, Any]],
                     ctx: TensorContext) -> Iterable[torch.Tensor]:
        """Merge one whole tensor read through ``chunks``: the merged values in order, as
        consecutive row chunks of any size (float32, or ``ctx.out_dtype``), on the engine's
        chunked path.

        ``chunks(which=None, rows=None)`` streams (base rows, input rows) over ``ranges``
        (the row chunks, in order), over the row ranges ``rows``, for all inputs or those in
        ``which``. By default :meth:`merge` chunk by chunk; a method that needs whole-tensor
        statistics first (the task-arithmetic family's trims) reads the tensor more often.
        """
        for (r0, r1), (base, xs) in zip(ranges, chunks()):
            ctx.rows = (r0, r1)
            yield self.merge(base, xs, model_params, ctx)

    @property
    def fusable(self) -> bool:
        """Whether :meth:`fused` serves these parameters (the engine's GPU path)."""
        return type(self).fused is not MergeMethod.fused

    def fused(self, base: torch.Tensor, thetas: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> dict[str, Any]:
        """Keyword arguments of :func:`mergehub.kernels.merge_tensor` that merge this whole
        tensor in one pass from the base and the inputs' raw weights ``thetas``; only called
        when :attr:`fusable` (otherwise the engine merges chunk by chunk with :meth:`merge`)."""
        raise NotImplementedError

    def kept_report(self) -> Any:
        """After a merge, a sparsifying method's :class:`~mergehub.ops.sparsify.KeptTally`
        (task-vector entries kept per input); ``None`` for methods that keep every entry."""
        return None

    def planned_kept(self, densities: list[list[float]], numels: list[int]
                     ) -> tuple[list[float], str] | None:
        """Before a merge (``--dry-run``): the entries a sparsifying method will keep per input,
        from each tensor's size (``numels``) and each input's density there
        (``densities[tensor][input]``), and how sure that count is ("exactly", "at least",
        "about"); ``None`` for methods that keep every entry."""
        return None

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        """Merge one chunk (rows ``ctx.rows`` of a tensor): return the merged weights (float32)."""
        raise NotImplementedError


class MethodType(Protocol):
    """What :data:`METHODS` holds for a method name: a :class:`MergeMethod` subclass, or a
    member of the task-arithmetic family (:class:`~mergehub.merge.methods.family.Member`).
    Its parameters (name -> default) and their rules check a recipe; called with the recipe's
    global parameters, it gives the method that merges."""

    name: str
    model_params: dict[str, Any]
    global_params: dict[str, Any]
    needs_base: bool
    on_deltas: bool
    base_is_input: bool

    def rule(self, name: str) -> Rule: ...

    def params_from_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]: ...

    def __call__(self, params: dict[str, Any]) -> MergeMethod: ...


#: every merge method by its recipe name
METHODS: dict[str, MethodType] = {}

M = TypeVar("M", bound=MethodType)


def register(method: M) -> M:
    """Add a method (a :class:`MergeMethod` subclass, as a class decorator, or a family
    :class:`~mergehub.merge.methods.family.Member`) to :data:`METHODS` under its ``name``."""
    METHODS[method.name] = method
    return method
