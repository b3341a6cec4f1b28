"""Training data read from files (JSONL prompt/completion pairs or text, classification
rows, masked-LM texts; see :mod:`mergehub.adapters.data`), and :func:`build_dataset`, the
dataset a config's ``data:`` section describes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from mergehub.adapters.data.batches import Batch, Dataset, RowsDataset, step_generator
from mergehub.adapters.data.synthetic import SyntheticDataset
from mergehub.errors import InputError
from mergehub.safejson import parse_json


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
