"""MeZO on more than one process, on ``torch.distributed``: joining the ranks, splitting a batch,
sharding a model with FSDP2, and counting the bytes the ranks exchange.

A zeroth-order step needs no gradient exchange: ranks that share the seed draw the same z and
only have to agree on the loss values (:class:`mergehub.adapters.mezo.MeZO` with a
``process_group``). ``torchrun --nproc-per-node N -m mergehub train CONFIG.yaml`` (or ``hub
train CONFIG.yaml --nproc N``) starts N processes; :func:`join` puts each in the process group
torchrun describes in its environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``): gloo for CPU tensors, NCCL for CUDA ones. docs/training.md, "More than one
device", says how the trainer uses it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run."""

    rank: int
    size: int

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, the result and the progress bar."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process is one of several that a launcher (torchrun) started together."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device | str = "cpu") -> tuple[World | None, bool]:
    """(this process's :class:`World`, whether this call created the process group): the
    group torchrun's environment describes, initialized here unless it already is (gloo for
    a CPU ``device``, NCCL for CUDA); (None, False) for a process started alone."""
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return None, False
    created = False
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
        if local is not None:
            torch.cuda.set_device(local)
        # NCCL told its device up front (else it guesses one per rank, and warns)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=local)
        created = True
    if dist.get_world_size() == 1:
        return None, created
    return World(dist.get_rank(), dist.get_world_size()), created


def _wire_device(group: Any) -> torch.device:
    """Where a collective's tensors must live for ``group``'s backend (NCCL: the GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: Sequence[float], group: Any = None) -> list[float]:
    """``values`` summed element-wise over the ranks of ``group`` (all ranks by default), in
    float64: one all-reduce of ``8 * len(values)`` bytes."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_wire_device(group))
    dist.all_reduce(t, group=group)
    return t.cpu().tolist()


def broadcast_int(value: int, group: Any = None) -> int:
    """Rank 0's ``value`` on every rank (8 bytes; no pickling, unlike
    ``broadcast_object_list``)."""
    t = torch.tensor([value], dtype=torch.int64, device=_wire_device(group))
    dist.broadcast(t, src=0, group=group)
    return int(t.item())


def barrier() -> None:
    """Wait until every rank gets here (when there are several)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rows(n: int, rank: int, size: int) -> slice:
    """The rows of an ``n``-row batch that ``rank`` of ``size`` evaluates: consecutive parts
    whose sizes differ by at most one, the first ``n % size`` ranks taking one more (as
    ``numpy.array_split``); concatenated in rank order they are the batch."""
    share, extra = divmod(n, size)
    start = rank * share + min(rank, extra)
    return slice(start, start + share + (rank < extra))


#: tensor types that are no DTensor (asked of every parameter at every MeZO step)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter)."""
    if type(t) in _PLAIN or not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_run(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the entries of ``p`` this process holds, the position of the first in the flattened
    whole tensor): ``p`` itself at 0, or a DTensor's local shard, which must be one run of the
    flattened tensor (sharded along dim 0 only, as FSDP2 shards); ``ValueError`` otherwise."""
    if not is_dtensor(p):
        return p.data, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = p.to_local()
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if p.dim() == 0:
        return local, 0
    if tuple(shape[1:]) != tuple(p.shape[1:]) or any(offset[1:]) or not local.is_contiguous():
        raise ValueError(f"a DTensor of shape {tuple(p.shape)} placed {p.placements} holds "
                         f"a local shard {tuple(shape)} at {tuple(offset)} that is not one run "
                         "of the flattened tensor (shard along dim 0 only, as FSDP2 does)")
    return local, int(offset[0]) * int(torch.Size(p.shape[1:]).numel())


def whole(p: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
    """The whole tensor ``p`` (for a DTensor: gathered from every rank, a collective all ranks
    must call in the same order); ``local`` replaces a DTensor's own local shard (e.g. its
    float32 copy)."""
    if not is_dtensor(p):
        return p.detach() if local is None else local
    if local is None:
        return p.detach().full_tensor()
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                              stride=p.stride()).full_tensor()


def set_whole(p: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole tensor ``value`` into ``p`` (for a DTensor: its local shard's part)."""
    with torch.no_grad():
        local, offset = local_run(p)
        local.copy_(value.reshape(-1)[offset:offset + local.numel()].view(local.shape))


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` sharded over all ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``):
    each of its repeated blocks (transformers' ``_no_split_modules`` classes, the decoder
    layers) is a unit whose parameters are gathered for its forward and freed after it, then
    the rest (embeddings, final norm, head) as the root's unit. Every parameter becomes a
    DTensor sharded along dim 0: a rank holds 1/N of each."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    # the root too is resharded after its forward: MeZO steps on the shards between forwards
    fully_shard(model, reshard_after_forward=True)
    return model


#: the collectives :func:`count_bytes` counts, by module (torch.distributed's, and the
#: functional ones DTensor calls), with the argument (position, name) holding the tensor(s) a
#: rank hands to each
_COLLECTIVES: dict[str, dict[str, tuple[int, str]]] = {
    "torch.distributed.distributed_c10d": {
        "all_reduce": (0, "tensor"), "all_reduce_coalesced": (0, "tensors"),
        "broadcast": (0, "tensor"), "reduce": (0, "tensor"), "all_gather": (1, "tensor"),
        "all_gather_single": (1, "input_tensor"), "all_gather_into_tensor": (1, "input_tensor"),
        "all_gather_coalesced": (1, "input_tensor_list"), "reduce_scatter": (1, "input_list"),
        "reduce_scatter_single": (1, "input"), "reduce_scatter_tensor": (1, "input"),
        "all_to_all_single": (1, "input"), "all_to_all": (1, "input_tensor_list"),
        "gather": (0, "tensor"), "scatter": (1, "scatter_list"), "send": (0, "tensor"),
        "isend": (0, "tensor")},
    "torch.distributed._functional_collectives": {
        name: (0, "self") for name in (
            "broadcast", "all_reduce", "all_gather_single", "all_gather_tensor",
            "reduce_scatter_single", "reduce_scatter_tensor", "all_to_all_single")},
}


@dataclass
class ByteCount:
    """What :func:`count_bytes` saw: payload bytes this rank handed to collectives, and how
    many collective calls."""

    bytes: int = 0
    calls: int = 0


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


@contextlib.contextmanager
def count_bytes() -> Iterator[ByteCount]:
    """Count the payload of every collective called inside the block: the bytes of the
    tensor(s) this rank contributes (an all-reduce's tensor, an all-gather's input, ...), what
    the algorithm has to move per rank whatever ring or tree the backend uses. For benchmarks
    and tests: the functions of ``torch.distributed`` and of its functional collectives
    (which DTensor uses) are wrapped where callers look them up at call time (MeZO, FSDP2,
    DTensor); a collective that calls another is counted once."""
    import importlib

    count = ByteCount()
    depth = threading.local()
    saved: list[tuple[Any, str, Any]] = []

    def wrap(fn: Any, position: int, keyword: str) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            outer = not getattr(depth, "n", 0)
            if outer:
                payload = kwargs.get(keyword, args[position] if len(args) > position else None)
                count.bytes += _nbytes(payload)
                count.calls += 1
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth.n -= 1
        return counted

    try:
        for module_name, functions in _COLLECTIVES.items():
            module = importlib.import_module(module_name)
            for name, (position, keyword) in functions.items():
                original = getattr(module, name, None)
                if original is None:  # not in this torch version
                    continue
                counted = wrap(original, position, keyword)
                for holder in (module, dist):
                    if getattr(holder, name, None) is original:
                        saved.append((holder, name, original))
                        setattr(holder, name, counted)
        yield count
    finally:
        for holder, name, fn in reversed(saved):
            setattr(holder, name, fn)
