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

The parts: :mod:`~mergehub.adapters.data.batches` (batches, the dataset interface, losses and
scores), :mod:`~mergehub.adapters.data.synthetic` (the synthetic tasks) and
:mod:`~mergehub.adapters.data.files` (data from files, and ``build_dataset``).
"""

from mergehub.adapters.data.batches import (
    Batch, Dataset, RowsDataset, accuracy, completion_scores, step_generator, token_loss)
from mergehub.adapters.data.files import (
    ClassificationDataset, Example, ExamplesDataset, MaskedLMDataset, build_dataset,
    load_tokenizer, read_classification, read_texts)
from mergehub.adapters.data.synthetic import (
    ALL_TASKS, BOS, MARKER, N_IN, PAD, PRETRAIN_TASKS, SEP, SEQ_LEN, SYMBOLS, TASKS,
    SyntheticDataset, eval_split, make_batch, mixture)

__all__ = ["ALL_TASKS", "BOS", "MARKER", "N_IN", "PAD", "PRETRAIN_TASKS", "SEP", "SEQ_LEN",
           "SYMBOLS", "TASKS", "Batch", "ClassificationDataset", "Dataset", "Example",
           "ExamplesDataset", "MaskedLMDataset", "RowsDataset", "SyntheticDataset", "accuracy",
           "build_dataset", "completion_scores", "eval_split", "load_tokenizer", "make_batch",
           "mixture", "read_classification", "read_texts", "step_generator", "token_loss"]
