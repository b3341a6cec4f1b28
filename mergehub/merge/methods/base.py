"""The interface every merge method implements, and the registry the engine looks them up in."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

@dataclass
class TensorContext:
    """What a method may know about the tensor it merges besides the values.

    ``state`` carries results of a method's pre-pass (e.g. global TIES thresholds per input) and
    of :meth:`MergeMethod.tensor_stats` for the current tensor.
    """

    name: str
    device: torch.device
    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    rows: tuple[int, int] = (0, 0)  # the row range of the chunk being merged
    row_size: int = 0  # entries per row (the chunk's first flat position is rows[0]·row_size)

    @property
    def offset(self) -> int:
        """The flat position of the chunk's first entry in its tensor."""
        return self.rows[0] * self.row_size

    def generator(self, *salt: object) -> torch.Generator:
        """A generator seeded from (seed, tensor name, salt): the same random draws whatever
        the order tensors are merged in or the number of workers."""
        digest = hashlib.sha256(repr((self.seed, self.name, salt)).encode()).digest()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        return gen


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

    def __init__(self, params: dict[str, Any]):
        self.params = {**self.global_params, **params}

    @classmethod
    def params_from_metrics(cls, metrics: dict[str, Any]) -> dict[str, Any]:
        """Per-model parameter defaults taken from an input's metrics (store, or JSON beside it);
        the recipe's own values win. Most methods use none."""
        return {}

    def validate(self, model_params: list[dict[str, Any]], labels: list[str]) -> None:
        """Check the resolved per-model parameters; raise ``ValueError`` naming the input."""

    def prepass_rounds(self) -> int:
        """How many full passes over all tensors :meth:`observe` needs before merging (0: none);
        asked again after each pass, so earlier passes may show that fewer are needed."""
        return 0

    def observe(self, round: int, xs: list[torch.Tensor], model_params: list[dict[str, Any]],
                ctx: TensorContext) -> None:
        """See one tensor's inputs during pre-pass ``round``."""

    def finish_round(self, round: int, state: dict[str, Any]) -> None:
        """End of pre-pass ``round``: put what :meth:`merge` needs into ``state``."""

    def tensor_stats(self, chunks: Callable[..., Iterable[tuple[torch.Tensor | None,
                                                                list[torch.Tensor]]]],
                     model_params: list[dict[str, Any]], ctx: TensorContext) -> None:
        """Before a tensor is merged: compute whole-tensor statistics into ``ctx.state``.

        ``chunks()`` (or ``chunks(which)`` for some inputs) streams (base rows, input rows)
        over the tensor, as often as needed. Elementwise methods need nothing.
        """

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
        """After a merge, a sparsifying method's :class:`~mergehub.merge.methods.sparsify.KeptTally`
        (task-vector entries kept per input); ``None`` for methods that keep every entry."""
        return None

    def planned_kept(self, densities: list[list[float]], numels: list[int]
                     ) -> tuple[list[float], str] | None:
        """Before a merge (``--dry-run``): the entries a sparsifying method will keep per input,
        from each tensor's size (``numels``) and each input's density there
        (``densities[tensor][input]``), and how sure that count is ("exactly", "at least",
        "about"); ``None`` for methods that keep every entry."""
        return None

    def mix_args(self, model_params: list[dict[str, Any]]) -> dict[str, Any]:
        """The weights, λ and normalize part of :meth:`fused`'s arguments."""
        return {"weights": [float(p["weight"]) for p in model_params],
                "lam": float(self.params["lambda"]), "normalize": bool(self.params["normalize"])}

    def merge(self, base: torch.Tensor | None, xs: list[torch.Tensor],
              model_params: list[dict[str, Any]], ctx: TensorContext) -> torch.Tensor:
        """Merge one chunk (rows ``ctx.rows`` of a tensor): return the merged weights (float32)."""
        raise NotImplementedError


METHODS: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator adding a method to :data:`METHODS` under its ``name``."""
    METHODS[cls.name] = cls
    return cls


def weighted(xs: list[torch.Tensor], model_params: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Each input multiplied by its ``weight``."""
    return [x * float(p["weight"]) for x, p in zip(xs, model_params)]
