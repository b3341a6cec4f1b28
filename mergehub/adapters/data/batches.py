"""What the trainer reads: a :class:`Batch`, the :class:`Dataset` interface (and
:class:`RowsDataset`, examples drawn per step), and the loss and scores of a batch's logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def completion_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int]:
    """(examples with every completion token right, right tokens, completion tokens) of the
    teacher-forced argmax predictions ``logits`` for ``labels`` (-100: not scored)."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    ok = (pred == target) | ~mask
    return int(ok.all(1).sum()), int((ok & mask).sum()), int(mask.sum())


def token_loss(logits: torch.Tensor, labels: torch.Tensor,
               causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropies of the scored targets, number of scored targets) of
    ``logits`` for ``labels`` (-100: not scored): the loss transformers computes, of the next
    token for a causal LM (``causal``), else of each position (a masked LM's masked tokens) or
    each row (a classifier's label), as a sum in float64 and a count, so that the loss of
    several batches, or of the parts of one batch on several ranks, is the sum of their sums
    over the sum of their counts. Both are 0-dim tensors on the logits' device: reading them
    (``float``, ``int``) waits for the device, so a caller reads them when it needs them (MeZO
    once per step, after both forwards are queued)."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    losses = torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask],
                                               reduction="none")
    return losses.double().sum(), mask.sum()


@torch.no_grad()
def accuracy(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor,
             chunk: int = 500) -> tuple[float, float]:
    """Teacher-forced (exact match, token accuracy) on the completion tokens (labels != -100).

    Exact match equals greedy-decoding exact match: greedy reproduces the target iff every
    argmax along the true prefix is right.
    """
    was_training = model.training
    model.eval()
    right = total = exact = 0
    for i in range(0, ids.shape[0], chunk):
        e, r, t = completion_scores(model(input_ids=ids[i:i + chunk]).logits, labels[i:i + chunk])
        exact, right, total = exact + e, right + r, total + t
    model.train(was_training)
    return exact / ids.shape[0], right / max(total, 1)


@dataclass
class Batch:
    """One batch; ``kwargs()`` is what a transformers model's forward takes (segment ids only
    for sentence pairs of a classifier)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None

    def kwargs(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "labels": self.labels}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out

    def inputs(self) -> dict[str, torch.Tensor]:
        """``kwargs()`` without the labels: the model returns logits and computes no loss."""
        return {k: v for k, v in self.kwargs().items() if k != "labels"}

    def to(self, device: torch.device) -> "Batch":
        """The batch on ``device`` (where the model trains)."""
        return self._map(lambda t: t.to(device))

    def part(self, rows: slice) -> "Batch":
        """The batch of ``rows`` (same width: the padding of the whole batch is kept)."""
        return self._map(lambda t: t[rows])

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        """The batch of ``fn`` of each tensor it has."""
        def each(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)
        return Batch(fn(self.input_ids), fn(self.labels), each(self.attention_mask),
                     each(self.token_type_ids))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator batch ``step`` of a run with ``seed`` is drawn from."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Dataset:
    """What the trainer draws batches from and evaluates on."""

    task_type = "causal_lm"

    def batch(self, step: int, size: int, seed: int) -> Batch:  # pragma: no cover - interface
        raise NotImplementedError

    def eval_batches(self) -> list[Batch]:
        """Held-out batches (empty when there is no eval data)."""
        return []

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


class RowsDataset(Dataset):
    """Examples read from files (``train``, ``evals``), drawn per step and collated into a
    padded batch by ``_collate``."""

    train: list[Any]
    evals: list[Any]

    def _collate(self, rows: list[Any]) -> Batch:  # pragma: no cover - interface
        raise NotImplementedError

    def batch(self, step: int, size: int, seed: int) -> Batch:
        idx = torch.randint(len(self.train), (size,), generator=step_generator(seed, step))
        return self._collate([self.train[i] for i in idx.tolist()])

    def eval_batches(self) -> list[Batch]:
        return [self._collate(self.evals[i:i + 64]) for i in range(0, len(self.evals), 64)]
