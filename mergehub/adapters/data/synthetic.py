"""The built-in synthetic tasks (``copy``, ``reverse``, ..., ``prefmax``): their sequences,
batches and held-out splits, and :class:`SyntheticDataset` (see :mod:`mergehub.adapters.data`)."""

from __future__ import annotations

import torch

from mergehub.adapters.data.batches import Batch, Dataset, step_generator
from mergehub.errors import InputError


SYMBOLS, N_IN = 16, 8
BOS, SEP, PAD = 16, 17, 18
SEQ_LEN = 3 + 3 * N_IN  # BOS, marker, x (8), SEP, y (at most 16)


def _swap(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, 2).flip(2).reshape(x.shape[0], -1)


PRETRAIN_TASKS = {
    "copy": lambda x: x,
    "reverse": lambda x: x.flip(1),
    "add1": lambda x: (x + 1) % SYMBOLS,
    "rotl1": lambda x: x.roll(-1, 1),
}
TASKS = {
    "add3": lambda x: (x + 3) % SYMBOLS,
    "sort": lambda x: x.sort(1).values,
    "repeat": lambda x: x.repeat_interleave(2, 1),
    "swap": _swap,
    "rotr2": lambda x: x.roll(2, 1),
    "prefmax": lambda x: x.cummax(1).values,
}
MARKER = {name: 20 + i for i, name in enumerate([*PRETRAIN_TASKS, *TASKS])}
ALL_TASKS = {**PRETRAIN_TASKS, **TASKS}


def make_batch(task: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of ``task``: input ids and labels (-100 outside the completion)."""
    x = torch.randint(0, SYMBOLS, (n, N_IN), generator=gen)
    y = ALL_TASKS[task](x)
    ids = torch.full((n, SEQ_LEN), PAD)
    ids[:, 0], ids[:, 1], ids[:, 2:2 + N_IN], ids[:, 2 + N_IN] = BOS, MARKER[task], x, SEP
    ids[:, 3 + N_IN:3 + N_IN + y.shape[1]] = y
    labels = torch.full((n, SEQ_LEN), -100)
    labels[:, 3 + N_IN:3 + N_IN + y.shape[1]] = y
    return ids, labels


def mixture(tasks: list[str], n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n // len(tasks)`` examples of each task, concatenated."""
    parts = [make_batch(t, n // len(tasks), gen) for t in tasks]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def eval_split(task: str, n: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed held-out examples of ``task`` (own seeds, never drawn by training batches)."""
    offset = {"val": 10_000, "test": 20_000}[split]
    return make_batch(task, n, torch.Generator().manual_seed(offset + list(ALL_TASKS).index(task)))


class SyntheticDataset(Dataset):
    """A built-in task, or a mixture of tasks (equal shares per batch)."""

    def __init__(self, tasks: list[str], eval_examples: int = 200):
        unknown = [t for t in tasks if t not in ALL_TASKS]
        if unknown:
            raise InputError(f"unknown synthetic task {unknown[0]!r} (known: "
                             f"{', '.join(ALL_TASKS)})")
        self.tasks = tasks
        self.eval_examples = eval_examples

    def batch(self, step: int, size: int, seed: int) -> Batch:
        ids, labels = mixture(self.tasks, max(size, len(self.tasks)), step_generator(seed, step))
        return Batch(ids, labels)

    def eval_batches(self) -> list[Batch]:
        return [Batch(*eval_split(t, self.eval_examples)) for t in self.tasks] \
            if self.eval_examples else []

    def describe(self) -> str:
        return f"synthetic task {'+'.join(self.tasks)}"
