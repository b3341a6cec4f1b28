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

**Classification** (``task_type: seq_cls``): JSONL rows ``{"text": ..., "label": ...}``
(optionally ``"text_pair"`` for sentence pairs); labels are strings or integers, the classes
are ``data.labels`` in that order or else the sorted distinct labels of the training file.
**Masked LM** (``task_type: masked_lm``): ``{"text": ...}`` rows or a ``.txt`` file; each
batch masks ``mlm_probability`` (0.15) of the ordinary tokens as BERT does (80% ``[MASK]``,
10% a random token, 10% unchanged; the loss on those tokens only).

**Determinism.** The batch of step ``s`` depends only on (seed, s): a resumed run sees exactly
the batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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


def token_loss(logits: torch.Tensor, labels: torch.Tensor,
               causal: bool = True) -> tuple[float, int]:
    """(sum of the cross-entropies of the scored targets, number of scored targets) of
    ``logits`` for ``labels`` (-100: not scored): the loss transformers computes, of the next
    token for a causal LM (``causal``), else of each position (a masked LM's masked tokens) or
    each row (a classifier's label), as a sum in float64 and a count, so that the loss of
    several batches, or of the parts of one batch on several ranks, is the sum of their sums
    over the sum of their counts."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    losses = torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask],
                                               reduction="none")
    return float(losses.double().sum()), int(mask.sum())


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

    def part(self, rows: slice) -> "Batch":
        """The batch of ``rows`` (same width: the padding of the whole batch is kept)."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]
        return Batch(self.input_ids[rows], self.labels[rows], cut(self.attention_mask),
                     cut(self.token_type_ids))


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


class ExamplesDataset(RowsDataset):
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
        if "label" in row:
            raise InputError(f"{where}: a row with a 'label' is classification data: set "
                             "task_type: seq_cls (this config trains a causal LM)")
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


def _read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(``FILE:LINE``, object) per non-empty line of a JSONL file; a ``.txt`` file's lines are
    ``{"text": line}``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read training data: {e.strerror or e}") from e
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        row = parse_json(line, where) if path.suffix == ".jsonl" else {"text": line}
        if not isinstance(row, dict):
            raise InputError(f"{where}: each line must be a JSON object")
        rows.append((where, row))
    return rows


def _text_field(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {key!r} must be a non-empty string")
    return value


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


class Example(NamedTuple):
    """A tokenized classification row: its ids, their segment ids (a sentence pair, when the
    tokenizer gives them) and its class id."""

    ids: list[int]
    type_ids: list[int] | None
    label: int


class ClassificationDataset(RowsDataset):
    """Texts with one class each (``task_type: seq_cls``); ``labels`` names the classes in id
    order, as the model's ``id2label`` will."""

    task_type = "seq_cls"

    def __init__(self, train: list[Example], evals: list[Example], labels: list[str],
                 pad_id: int, source: str):
        if not train:
            raise InputError(f"{source}: no training examples")
        self.train, self.evals, self.labels, self.pad_id = train, evals, labels, pad_id
        self.source = source

    def _collate(self, rows: list[Example]) -> Batch:
        ids, mask = _pad([r.ids for r in rows], self.pad_id)
        types = None
        if any(r.type_ids is not None for r in rows):
            types = _pad([r.type_ids or [0] * len(r.ids) for r in rows], 0)[0]
        return Batch(ids, torch.tensor([r.label for r in rows]), mask, types)

    def describe(self) -> str:
        return (f"{self.source} ({len(self.train)} examples, {len(self.evals)} held out, "
                f"{len(self.labels)} classes)")


def read_classification(path: Path, tokenizer: Any, max_length: int,
                        labels: list[str] | None) -> tuple[list[Example], list[str]]:
    """An :class:`Example` per ``{text, label}`` (or ``{text, text_pair, label}``) row of
    ``path``, and the class names: ``labels`` when given (a row with another label is an
    error), else the file's sorted distinct labels."""
    rows = _read_rows(path)
    parsed = []
    for where, row in rows:
        if "label" not in row:
            raise InputError(f"{where}: a classification row needs 'text' and 'label'; got "
                             f"{sorted(row)}")
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise InputError(f"{where}: label must be a string or an integer, not {label!r}")
        text = _text_field(row, "text", where)
        pair = _text_field(row, "text_pair", where) if "text_pair" in row else None
        encoded = tokenizer(text, pair, truncation=True, max_length=max_length)
        types = encoded.get("token_type_ids") if pair is not None else None
        parsed.append((where, list(encoded["input_ids"]), types and list(types), label))
    if labels is None:
        kinds = {type(row[-1]) for row in parsed}
        if len(kinds) > 1:
            raise InputError(f"{path}: labels mix strings and integers; list the classes in "
                             "data labels")
        labels = [str(v) for v in sorted({row[-1] for row in parsed})]
        if len(labels) < 2:
            raise InputError(f"{path}: a classifier needs at least two classes; found "
                             f"{labels or 'none'}")
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for where, ids, types, label in parsed:
        if str(label) not in index:
            raise InputError(f"{where}: label {label!r} is not one of the classes "
                             f"({', '.join(labels)})")
        out.append(Example(ids, types, index[str(label)]))
    return out, labels


class MaskedLMDataset(Dataset):
    """Texts for masked-LM training (``task_type: masked_lm``): BERT's masking, drawn per
    batch from the step's generator; held-out batches are masked once with a fixed seed."""

    task_type = "masked_lm"

    def __init__(self, train: list[list[int]], evals: list[list[int]], tokenizer: Any,
                 probability: float, source: str):
        if not train:
            raise InputError(f"{source}: no training examples")
        self.train, self.evals, self.probability, self.source = train, evals, probability, source
        self.pad_id = tokenizer.pad_token_id or 0
        self.mask_id = tokenizer.mask_token_id
        self.vocab = len(tokenizer)
        self.special = set(tokenizer.all_special_ids)

    def _masked(self, rows: list[list[int]], gen: torch.Generator) -> Batch:
        ids, mask = _pad(rows, self.pad_id)
        ordinary = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(self.special)))
        chosen = (torch.rand(ids.shape, generator=gen) < self.probability) & ordinary
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        roll = torch.rand(ids.shape, generator=gen)
        randoms = torch.randint(self.vocab, ids.shape, generator=gen)
        ids = torch.where(chosen & (roll < 0.8), torch.full_like(ids, self.mask_id), ids)
        ids = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), randoms, ids)
        return Batch(ids, labels, mask)

    def batch(self, step: int, size: int, seed: int) -> Batch:
        gen = step_generator(seed, step)
        idx = torch.randint(len(self.train), (size,), generator=gen)
        return self._masked([self.train[i] for i in idx.tolist()], gen)

    def eval_batches(self) -> list[Batch]:
        gen = torch.Generator().manual_seed(20_000)
        return [self._masked(self.evals[i:i + 64], gen) for i in range(0, len(self.evals), 64)]

    def describe(self) -> str:
        return f"{self.source} ({len(self.train)} texts, {len(self.evals)} held out, masked LM)"


def read_texts(path: Path, tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids (with the tokenizer's special tokens) of each ``{text}`` row or text line."""
    return [list(tokenizer(_text_field(row, "text", where), truncation=True,
                           max_length=max_length)["input_ids"]) for where, row in _read_rows(path)]


def load_tokenizer(base_dir: Path) -> Any:
    """The base's tokenizer if its dir has tokenizer files, else ``None``."""
    if not any(base_dir.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def build_dataset(spec: dict[str, Any], base_dir: Path, task_type: str = "causal_lm") -> Dataset:
    """The dataset a config's ``data:`` section describes (already checked by the config) for
    a model of ``task_type``."""
    if spec.get("task"):
        tasks = spec["task"] if isinstance(spec["task"], list) else [spec["task"]]
        return SyntheticDataset([str(t) for t in tasks], int(spec.get("eval_examples", 200)))
    tokenizer = load_tokenizer(base_dir)
    max_length = int(spec.get("max_length", 256))
    train_path = Path(spec["path"]).expanduser()
    eval_path = Path(spec["eval_path"]).expanduser() if spec.get("eval_path") else None
    if task_type != "causal_lm":
        if tokenizer is None:
            raise InputError(f"{train_path}: task_type {task_type} reads text, and the base "
                             f"{base_dir} has no tokenizer files")
        if task_type == "seq_cls":
            given = [str(v) for v in spec["labels"]] if spec.get("labels") else None
            train, labels = read_classification(train_path, tokenizer, max_length, given)
            evals = (read_classification(eval_path, tokenizer, max_length, labels)[0]
                     if eval_path else [])
            return ClassificationDataset(train, evals, labels, tokenizer.pad_token_id or 0,
                                         str(train_path))
        if tokenizer.mask_token_id is None:
            raise InputError(f"{base_dir}: task_type masked_lm needs a tokenizer with a mask "
                             "token")
        return MaskedLMDataset(read_texts(train_path, tokenizer, max_length),
                               read_texts(eval_path, tokenizer, max_length) if eval_path else [],
                               tokenizer, float(spec.get("mlm_probability", 0.15)),
                               str(train_path))
    train = _read_examples(train_path, tokenizer, max_length)
    evals = _read_examples(eval_path, tokenizer, max_length) if eval_path else []
    pad = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return ExamplesDataset(train, evals, pad, str(train_path))
