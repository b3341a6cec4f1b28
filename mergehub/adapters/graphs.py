"""A closure replayed from CUDA graphs: the model's forward pass launched by one call.

A MeZO step is two forward passes and three passes over the weights. On a GPU the passes over
the weights are three launches (:mod:`mergehub.kernels.zo`), but an eager forward pass of a
transformer is hundreds of small launches, and a host that launches them no faster than the
GPU runs them leaves the GPU waiting (``benchmarks/RESULTS.md``, issue 16, item 1). A CUDA graph
records the launches of one call once and replays them all with one: :func:`cuda_graphed`
wraps a function of tensors so that each call copies its inputs into the graph's input
buffers, replays, and returns copies of the outputs.

What it assumes of ``fn``, as CUDA graphs do: the same kernels on every call for inputs of one
shape (no host synchronization such as ``.item()`` or boolean-mask indexing, no data-dependent
shapes, no host-side branching on values), tensors it reads other than its inputs (the
model's weights) kept at their addresses and changed in place only (what MeZO does), and
tensors (or a tuple / list of tensors) as its result. One graph is captured per distinct input
shapes, up to ``max_graphs`` (inputs of other shapes then run eagerly); all graphs share one
memory pool, which is safe because each replay's outputs are copied before the next replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mergehub.errors import InputError

__all__ = ["GraphedCallable", "cuda_graphed"]

Key = tuple[tuple[str, tuple[int, ...], torch.dtype, torch.device], ...]


def _copy(out: Any) -> Any:
    """``out`` (a tensor, or a tuple / list of tensors and other values) with every tensor
    cloned: the graph's own outputs are overwritten by its next replay."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_copy(v) for v in out)
    return out


@dataclass
class _Graph:
    """One captured call: its input buffers, the graph and the outputs it writes."""

    inputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph
    outputs: Any


class GraphedCallable:
    """``fn(**inputs)`` replayed from a CUDA graph captured once per distinct input shapes
    (see the module docstring for what ``fn`` must allow). Calling it returns what ``fn``
    returns, computed on the current values of the tensors it reads.

    ``warmup`` eager calls (on a side stream, as torch's graph capture asks) precede each
    capture, so that lazily created state (cuBLAS handles, autotuned kernels) exists before
    the launches are recorded; their results are discarded."""

    def __init__(self, fn: Callable[..., Any], max_graphs: int = 8, warmup: int = 2):
        if max_graphs < 1 or warmup < 1:
            raise ValueError(f"cuda_graphed: max_graphs and warmup must be >= 1, got "
                             f"max_graphs={max_graphs}, warmup={warmup}")
        self.fn, self.max_graphs, self.warmup = fn, max_graphs, warmup
        self.graphs: dict[Key, _Graph] = {}
        self._pool: Any = None

    def __call__(self, **inputs: torch.Tensor) -> Any:
        key = self._key(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(**inputs)
            entry = self.graphs[key] = self._capture(inputs)
        for name, value in inputs.items():
            entry.inputs[name].copy_(value, non_blocking=True)
        entry.graph.replay()
        return _copy(entry.outputs)

    @staticmethod
    def _key(inputs: dict[str, torch.Tensor]) -> Key:
        """What a graph is captured for: each input's name, shape, dtype and device (all on
        one CUDA device)."""
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor) or value.device.type != "cuda":
                what = (f"a tensor on {value.device}" if isinstance(value, torch.Tensor)
                        else f"of type {type(value).__name__}")
                raise InputError(f"cuda_graphed: input {name!r} is {what}; every input must "
                                 "be a CUDA tensor (call the function itself on the CPU)")
        return tuple((name, tuple(v.shape), v.dtype, v.device)
                     for name, v in sorted(inputs.items()))

    def _capture(self, inputs: dict[str, torch.Tensor]) -> _Graph:
        """Warm ``fn`` up on a side stream, then record one call on buffers of the inputs'
        shapes (filled with this call's values, so the warm-up computes real numbers)."""
        buffers = {name: value.clone() for name, value in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(**buffers)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.fn(**buffers)
        self._pool = graph.pool()
        return _Graph(buffers, graph, outputs)


def cuda_graphed(fn: Callable[..., Any], max_graphs: int = 8,
                 warmup: int = 2) -> GraphedCallable:
    """``fn`` (called with CUDA tensors as keyword arguments) replayed from CUDA graphs, e.g.
    MeZO's closure on a GPU::

        loss = cuda_graphed(lambda input_ids: model(input_ids=input_ids, labels=input_ids).loss)
        opt.step(lambda: loss(input_ids=ids))

    Bit for bit the results of ``fn`` itself where ``fn`` launches the same kernels while it
    is captured (code that checks for a capture may not: transformers builds an attention
    mask under capture that an eager call skips when it is all ones); see
    :class:`GraphedCallable`."""
    return GraphedCallable(fn, max_graphs, warmup)
