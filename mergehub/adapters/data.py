"""Training data for ``hub train``: built-in synthetic tasks, JSONL prompt/completion pairs and
plain text, turned into causal-LM batches (``input_ids``, ``labels`` with -100 where no loss is
taken, ``attention_mask``).

**Synthetic tasks** (no tokenizer needed; the ones the tests, the demo and the benchmarks train
on). A sequence is ``[BOS, marker, x1..x8, SEP, y1..ym]`` over 16 data symbols with one marker
token per task; the loss and the accuracy are on the completion ``y`` only. Pre-training tasks
(``copy``, ``reverse``, ``add1``, ``rotl1``) and fine-tuning tasks (``add3``, ``sort``,
``repeat``, ``swap``, ``rotr2``, ``prefmax``). Token ids stay below 30, so any model with a
vocabulary of at least 30 tokens can learn them.

**Files.** JSONL with one object per line: ``{"prompt": ..., "completion": ...}`` (loss on the
completion only) or ``{"text": ...}`` (loss on every token); a ``.txt`` file is one example per
non-empty line. Text is tokenized with the base model's tokenizer (its tokenizer files must be
in the base dir); without one, JSONL rows may give token ids directly (``prompt_ids`` /
``completion_ids`` or ``input_ids``).

**Determinism.** The batch of step ``s`` depends only on (seed, s): a resumed run sees exactly
the batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergehub.errors import InputError
from mergehub.safejson import parse_json

# --- synthetic tasks ----------------------------------------------------------------------

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


def completion_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int]:
    """(examples with every completion token right, right tokens, completion tokens) of the
    teacher-forced argmax predictions ``logits`` for ``labels`` (-100: not scored)."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    ok = (pred == target) | ~mask
    return int(ok.all(1).sum()), int((ok & mask).sum()), int(mask.sum())


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


# --- datasets -----------------------------------------------------------------------------

@dataclass
class Batch:
    """One causal-LM batch; ``kwargs()`` is what a transformers model's forward takes."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def kwargs(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "labels": self.labels}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return out


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator batch ``step`` of a run with ``seed`` is drawn from."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Dataset:
    """What the trainer draws batches from and evaluates on."""

    def batch(self, step: int, size: int, seed: int) -> Batch:  # pragma: no cover - interface
        raise NotImplementedError

    def eval_batches(self) -> list[Batch]:
        """Held-out batches (empty when there is no eval data)."""
        return []

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


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


class ExamplesDataset(Dataset):
    """Tokenized examples (prompt ids, completion ids) from files, padded per batch."""

    def __init__(self, train: list[tuple[list[int], list[int]]],
                 evals: list[tuple[list[int], list[int]]], pad_id: int, source: str):
        if not train:
            raise InputError(f"{source}: no training examples")
        self.train, self.evals, self.pad_id, self.source = train, evals, pad_id, source

    def _collate(self, rows: list[tuple[list[int], list[int]]]) -> Batch:
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), self.pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, c) in enumerate(rows):
            n = len(p) + len(c)
            ids[i, :n] = torch.tensor(p + c)
            labels[i, len(p):n] = torch.tensor(c)
            mask[i, :n] = 1
        return Batch(ids, labels, mask)

    def batch(self, step: int, size: int, seed: int) -> Batch:
        idx = torch.randint(len(self.train), (size,), generator=step_generator(seed, step))
        return self._collate([self.train[i] for i in idx.tolist()])

    def eval_batches(self) -> list[Batch]:
        return [self._collate(self.evals[i:i + 64]) for i in range(0, len(self.evals), 64)]

    def describe(self) -> str:
        return f"{self.source} ({len(self.train)} examples, {len(self.evals)} held out)"


def _read_examples(path: Path, tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per example of a JSONL or text file, cut to ``max_length``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read training data: {e.strerror or e}") from e

    def encode(s: str, where: str) -> list[int]:
        if tokenizer is None:
            raise InputError(f"{where}: text needs a tokenizer, and the base model has no "
                             "tokenizer files (give token ids: prompt_ids/completion_ids or "
                             "input_ids, or use a synthetic task)")
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    def ids_field(row: dict, key: str, where: str) -> list[int]:
        value = row[key]
        if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
            raise InputError(f"{where}: {key} must be a list of integers")
        return value

    out = []
    bos = [tokenizer.bos_token_id] if tokenizer is not None and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if path.suffix != ".jsonl":
            out.append((bos, encode(line, where) + eos))
            continue
        row = parse_json(line, where)
        if not isinstance(row, dict):
            raise InputError(f"{where}: each line must be a JSON object")
        if "prompt_ids" in row or "input_ids" in row:
            prompt = ids_field(row, "prompt_ids", where) if "prompt_ids" in row else []
            completion = ids_field(row, "completion_ids" if "completion_ids" in row
                                   else "input_ids", where)
        elif "prompt" in row and "completion" in row:
            prompt = bos + encode(str(row["prompt"]), where)
            completion = encode(str(row["completion"]), where) + eos
        elif "text" in row:
            prompt, completion = bos, encode(str(row["text"]), where) + eos
        else:
            raise InputError(f"{where}: expected keys prompt+completion, text, or token ids "
                             f"(prompt_ids+completion_ids / input_ids); got {sorted(row)}")
        if not completion:
            raise InputError(f"{where}: empty completion")
        out.append((prompt[:max_length - 1], completion[:max(1, max_length - len(prompt))]))
    return out


def load_tokenizer(base_dir: Path) -> Any:
    """The base's tokenizer if its dir has tokenizer files, else ``None``."""
    if not any(base_dir.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def build_dataset(spec: dict[str, Any], base_dir: Path) -> Dataset:
    """The dataset a config's ``data:`` section describes (already checked by the config)."""
    if spec.get("task"):
        tasks = spec["task"] if isinstance(spec["task"], list) else [spec["task"]]
        return SyntheticDataset([str(t) for t in tasks], int(spec.get("eval_examples", 200)))
    tokenizer = load_tokenizer(base_dir)
    max_length = int(spec.get("max_length", 256))
    train_path = Path(spec["path"]).expanduser()
    train = _read_examples(train_path, tokenizer, max_length)
    evals = (_read_examples(Path(spec["eval_path"]).expanduser(), tokenizer, max_length)
             if spec.get("eval_path") else [])
    pad = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return ExamplesDataset(train, evals, pad, str(train_path))
