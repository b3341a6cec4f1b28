"""The training loop behind ``hub train``, the same for every method: data, schedule,
evaluation, checkpoints, resume, and the output dir and store entry.

:func:`train` reads a config (:mod:`mergehub.adapters.config`), loads the base (an HF dir, or a
store entry exported to a temp dir) in the config's ``dtype`` (float32 unless it says
otherwise) on its ``device`` (the CPU, or a GPU; batches are drawn on the CPU and moved there,
checkpoints and results written from it), builds the method's trainable model (the method's
class in :mod:`mergehub.adapters.methods`), and runs ``steps`` steps with a progress bar
showing the loss. Every ``checkpoint_every`` steps it writes ``RUN_DIR/checkpoint-NNNNNNN/``
atomically (:mod:`mergehub.adapters.checkpoints`); a later run of the same config resumes from
the newest one (on the same device or another). Batches are a function of (seed, step) and
every step reseeds torch's global generator with (seed, step), so a resumed run reproduces
the uninterrupted run's loss curve exactly (on a GPU within float tolerance: its kernels may
sum in another order).

The model is loaded with the auto class of the config's ``task_type``: a causal LM, a sequence
classifier (``AutoModelForSequenceClassification``, e.g. a BERT-style encoder with a new
classification head) or a masked LM. Tensors are saved under the base's names (a base saved
without the task model's prefix, such as a bare ``BertModel``, keeps its names: transformers
loads either spelling), tensors of the base the task model does not use are carried over
unchanged, and a new head is kept in the result: the entry is a fine-tune of the base plus
its head. A new classification layer starts at zero (as ViT fine-tuning does, Dosovitskiy et
al. 2021), so its task vector is its trained value and merges can treat it as one.

At the end the result is written as an HF model dir (full, sparse, MeZO over all parameters;
stored as a fine-tune, i.e. a delta of the base) or a PEFT adapter dir (LoRA family, IncreLoRA,
1-bit, MeZO over an adapter; stored as an adapter when ``hub merge`` can read it as a dense
delta, else merged into the base and stored as a fine-tune), to ``output.dir`` and/or the store
as ``output.store``, with metrics ``loss`` (mean of the last 10 steps), ``step`` and the
``history`` (step, loss and eval metrics at every logging point) so that ``metric_weighted``
merging and ``hub show`` use them as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergehub.adapters import distributed
from mergehub.adapters.checkpoints import (
    OPTIMIZER_FILE, latest_checkpoint, load_optimizer_state, read_checkpoint, write_checkpoint)
from mergehub.adapters.config import DEVICE_FORM, ConfigError, TrainConfig, load_config
from mergehub.adapters.data import Batch, Dataset, build_dataset, completion_scores, token_loss
from mergehub.adapters.distributed import World
from mergehub.adapters.layout import BaseLayout
from mergehub.adapters.methods import METHODS, Method
from mergehub.errors import InputError, MergehubError, StoreError, spelled
from mergehub.progress import bar_disabled
from mergehub.safejson import read_json
from mergehub.storage.atomic import atomic_output_dir, check_output_target, write_file_atomic
from mergehub.storage.checkpoint import ADAPTER_CONFIG, open_checkpoint
from mergehub.storage.store import ModelInfo, Store, as_store, base_reference, names_entry
from mergehub.storage.writer import MODEL_SIDE_FILES

__all__ = ["TrainResult", "check_world", "evaluate", "load_task_model", "lr_at", "on_device",
           "train"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    """What :func:`train` did. ``losses[i]`` is the loss of step i + 1 (before its update)."""

    steps: int
    losses: list[float]
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    output_dir: Path | None = None
    entry: ModelInfo | None = None
    resumed_from: int | None = None
    interrupted: bool = False
    #: this process's rank when several trained together (only rank 0 writes the result)
    rank: int = 0
    last_checkpoint: Path | None = None
    facts: dict[str, Any] = field(default_factory=dict)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up, then constant or linear
    decay to zero at ``steps``."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "linear":
        warm *= max(0.0, 1 - step / cfg.steps)
    return cfg.lr * warm


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset) -> dict[str, float]:
    """Held-out metrics (empty without eval data), from one forward pass per eval batch: the
    loss and teacher-forced exact match / token accuracy of a causal LM's completions, the
    loss and accuracy of a classifier, the loss and token accuracy of a masked LM on its
    masked tokens."""
    batches = dataset.eval_batches()
    if not batches:
        return {}
    device = next(model.parameters()).device
    batches = [b.to(device) for b in batches]
    was_training = model.training
    model.eval()
    try:
        if dataset.task_type == "causal_lm":
            return _evaluate_completions(model, batches)
        loss_sum = right = total = 0.0
        for b in batches:
            logits = model(**b.inputs()).logits
            mask = b.labels != -100
            loss_sum += float(token_loss(logits, b.labels, causal=False)[0])
            right += float((logits.argmax(-1) == b.labels)[mask].sum())
            total += float(mask.sum())
        key = "eval_accuracy" if dataset.task_type == "seq_cls" else "eval_token_accuracy"
        return {"eval_loss": loss_sum / max(total, 1), key: right / max(total, 1)}
    finally:
        model.train(was_training)


def _evaluate_completions(model: torch.nn.Module, batches: list[Batch]) -> dict[str, float]:
    loss_sum = exact = right = total = examples = 0.0
    for b in batches:
        logits = model(**b.inputs()).logits
        loss_sum += float(token_loss(logits, b.labels)[0])
        e, r, t = completion_scores(logits, b.labels)
        exact, right, total, examples = exact + e, right + r, total + t, examples + len(b.labels)
    return {"eval_loss": loss_sum / max(total, 1), "eval_exact_match": exact / examples,
            "eval_token_accuracy": right / max(total, 1)}


def _resolve_base(cfg: TrainConfig, store: Store | None, tmp: Path) -> tuple[Path, str | None]:
    """(the base's HF dir, the base's store name when the result goes to the store); a store
    entry when ``names_entry`` says the reference means one, else a path: an HF model dir
    with safetensors weights, checked as ``hub add`` checks it (pickle weights are refused:
    transformers would unpickle ``pytorch_model.bin``)."""
    path = Path(cfg.base).expanduser()
    if not names_entry(cfg.base, store) and path.exists():
        if open_checkpoint(path).format != "hf":
            raise InputError(f"{cfg.source}: base {cfg.base} is not an HF model directory "
                             "(config.json and safetensors weights)")
        name = cfg.output.get("base")
        if cfg.output.get("store"):
            if name is None:
                raise ConfigError(f"{cfg.source}: base {cfg.base} is a path: name its copy in "
                                  "the store with output.base (added if missing) so that the "
                                  "result can be stored as a delta of it")
            if name not in store:
                store.add(path, name, progress=False)
        return path, name
    if store is None or cfg.base not in store:
        where = (f" nor a model in store {store.root}{store.did_you_mean(cfg.base)}"
                 if store is not None else "")
        raise InputError(f"{cfg.source}: base {cfg.base!r} is neither a path{where}")
    return store.export(cfg.base, tmp / "base", progress=False), cfg.base


def _copy_side_files(base_dir: Path, out: Path) -> None:
    """Tokenizer files of the base (config files come from ``save_pretrained``)."""
    for p in base_dir.iterdir():
        if p.is_file() and MODEL_SIDE_FILES.match(p.name) and not (out / p.name).exists():
            shutil.copyfile(p, out / p.name)


def check_world(cfg: TrainConfig, size: int) -> None:
    """Refuse a config that cannot train on ``size`` processes (the method's
    :meth:`~mergehub.adapters.methods.base.Method.check_world`: only MeZO methods run on more
    than one)."""
    METHODS[cfg.method].check_world(cfg, size)


def train(config: str | Path | dict[str, Any] | TrainConfig, *,
          store: Store | str | Path | None = None, device: str | None = None,
          resume: bool = True, progress: bool | None = None, stop_after: int | None = None,
          echo: Callable[[str], None] = lambda text: None) -> TrainResult:
    """Train as ``config`` says (a YAML path, a dict or a :class:`TrainConfig`).

    Started by torchrun as one of several processes (or in a process group already
    initialized), MeZO methods train on all of them: every rank runs this function; rank 0
    alone shows progress, writes checkpoints and the result, and returns ``output_dir`` and
    ``entry`` (see :mod:`mergehub.adapters.distributed`).

    Args:
        store: where ``output.store`` goes and store-named bases come from (a
            :class:`Store` or its root directory).
        device: ``cpu``, ``cuda`` or ``cuda:N``, instead of the config's ``device``
            (under torchrun ``cuda`` is each process's local GPU). Refused before anything
            loads where there is no such device.
        resume: continue from the newest checkpoint in the run dir if there is one (else
            its checkpoints are removed and training starts afresh).
        progress: a progress bar with the loss on stderr: None (default) on a terminal
            only (:mod:`mergehub.progress`), True always, False never.
        stop_after: stop after this many steps (counted from 0) as if interrupted: the last
            checkpoint stays and no output is written. For tests and step-wise runs.
        echo: receives one-line status messages.
    """
    store = as_store(store)
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    cfg = on_device(cfg, device)
    world, created = distributed.join(torch.device(cfg.device).type)
    try:
        check_world(cfg, world.size if world else 1)
        if world is not None and not world.main:
            progress, echo = False, lambda text: None
        return _train(cfg, world, store, resume, progress, stop_after, echo)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def on_device(cfg: TrainConfig, device: str | None = None) -> TrainConfig:
    """``cfg`` on ``device`` (``cpu``, ``cuda`` or ``cuda:N``; None: the config's own),
    refused where this machine has no such device: checked before anything loads (and
    before ``hub train --nproc`` starts its processes)."""
    if device is not None:
        if not (isinstance(device, str) and DEVICE_FORM.fullmatch(device)):
            raise InputError(f"device must be cpu, cuda or cuda:N, not {device!r}")
        cfg = dataclasses.replace(cfg, device=device)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{cfg.source}: device {cfg.device}: this machine has no CUDA device "
                         f"torch can use (torch.cuda.is_available() is false)")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise InputError(f"{cfg.source}: device {cfg.device}: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return cfg


def _train(cfg: TrainConfig, world: World | None, store: Store | None, resume: bool,
           progress: bool | None, stop_after: int | None,
           echo: Callable[[str], None]) -> TrainResult:
    """:func:`train` on this rank (``world`` None: the only one)."""
    import transformers

    main = world is None or world.main
    if cfg.output.get("store") and store is None:
        raise StoreError(f"{cfg.source}: output.store needs a store "
                         f"({spelled('store=', '--store, or MERGEHUB_HOME')})")
    if cfg.output.get("store") and cfg.output["store"] in store:
        raise StoreError(f"{cfg.source}: a model named {cfg.output['store']!r} already exists "
                         f"in store {store.root}")
    if cfg.output.get("dir"):
        try:
            check_output_target(cfg.output["dir"], bool(cfg.output.get("overwrite")),
                                "set output overwrite: true")
        except InputError as e:
            raise InputError(f"{cfg.source}: output dir {e}") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    started = time.time()
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="hub-train-") as tmp_name:
        warnings.simplefilter("ignore", FutureWarning)  # peft/transformers deprecation notices
        tmp = Path(tmp_name)
        if not main:  # rank 0 adds a base given as a path to the store first
            distributed.barrier()
        base_dir, base_name = _resolve_base(cfg, store, tmp)
        if main and world is not None:
            distributed.barrier()
        dataset = build_dataset(cfg.data, base_dir, cfg.task_type)
        model, layout = load_task_model(cfg, base_dir, dataset)
        base_dtype = next(model.parameters()).dtype
        train_dtype = base_dtype if cfg.dtype == "base" else DTYPES[cfg.dtype]
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:  # this process's (join chose it)
            device = torch.device("cuda", torch.cuda.current_device())
        model = model.to(device=device, dtype=train_dtype)
        model.train()

        ckpt = latest_checkpoint(cfg.run_dir) if resume else None
        if world is not None:
            _same_checkpoint(ckpt, world)
        if main and not resume and cfg.run_dir.exists():
            shutil.rmtree(cfg.run_dir)
        state, tensors = read_checkpoint(ckpt, cfg) if ckpt else ({}, {})
        torch.manual_seed(cfg.seed)
        method = METHODS[cfg.method](cfg, model, dataset,
                                     (tensors, state["method_state"]) if ckpt else None, world)
        method.layout = layout
        start = 0
        losses: list[float] = []
        history: list[dict[str, Any]] = []
        if ckpt:
            method.load_tensors(tensors)
            method.optimizer.load_state_dict(load_optimizer_state(ckpt / OPTIMIZER_FILE))
            start, losses, history = state["step"], state["losses"], state["history"]
            echo(f"resuming from {ckpt} (step {start}, loss {state['loss']:.4f})")
        log_every = cfg.checkpoint_every or max(1, cfg.steps // 10)
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.method}", unit="step",
                   disable=bar_disabled(progress), leave=False)
        with bar:
            for step in range(start, cfg.steps):
                if stop_after is not None and step >= stop_after:
                    return TrainResult(step, losses, history, {}, resumed_from=start or None,
                                       interrupted=True,
                                       last_checkpoint=latest_checkpoint(cfg.run_dir),
                                       rank=world.rank if world else 0)
                _set_lr(method.optimizer, lr_at(cfg, step))
                torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout etc.: same on resume
                loss = method.step(dataset.batch(step, cfg.batch_size, cfg.seed).to(device),
                                   step)
                if not math.isfinite(loss):
                    raise InputError(f"{cfg.source}: loss is {loss} at step {step + 1} (lower lr?)")
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update(1)
                done = step + 1
                if done % log_every == 0 or done == cfg.steps:
                    recent = losses[-min(len(losses), log_every):]
                    # sharded, every rank takes part in the forward passes
                    scores = evaluate(method.model, dataset) if main or method.sharded else {}
                    history.append({"step": done, "loss": sum(recent) / len(recent),
                                    **(scores if main else {})})
                if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps) \
                        and (main or method.sharded):
                    write_checkpoint(cfg, method, done, losses, history, main)
        last = losses[-10:]
        metrics = {"loss": sum(last) / len(last), "step": cfg.steps,
                   **{k: v for k, v in history[-1].items() if k.startswith("eval_")},
                   "history": history}
        out_dtype = base_dtype if cfg.output.get("dtype", "base") == "base" \
            else DTYPES[cfg.output["dtype"]]
        result = TrainResult(cfg.steps, losses, history, metrics, resumed_from=start or None,
                             rank=world.rank if world else 0)
        method.whole_model(lambda: load_task_model(cfg, base_dir, dataset)[0].to(train_dtype))
        if not main:
            return result
        result.output_dir, result.entry, result.facts = _write_output(
            cfg, method, out_dtype, base_dir, base_name, store, dataset, metrics, tmp,
            time.time() - started, start)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # the result is safe: checkpoints are spent
    return result


AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM",
                "seq_cls": "AutoModelForSequenceClassification",
                "masked_lm": "AutoModelForMaskedLM"}


def load_task_model(cfg: TrainConfig, base_dir: Path,
                    dataset: Dataset) -> tuple[torch.nn.Module, BaseLayout]:
    """The base loaded for ``cfg.task_type`` (a classifier with ``dataset``'s classes), with
    the new layer of a classification head at zero; refused before any step when the base's
    architecture has no such model or shares no tensor with it."""
    import transformers

    kwargs: dict[str, Any] = {}
    if cfg.task_type == "seq_cls":
        labels = dataset.labels
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {name: i for i, name in enumerate(labels)}}
    auto = getattr(transformers, AUTO_CLASSES[cfg.task_type])
    torch.manual_seed(cfg.seed)  # a new head's initialization (masked LM)
    try:
        model = auto.from_pretrained(base_dir, dtype="auto", use_safetensors=True, **kwargs)
    except (ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{cfg.source}: base {cfg.base} cannot be loaded as "
                         f"{AUTO_CLASSES[cfg.task_type]} (task_type {cfg.task_type}): "
                         f"{first}") from None
    layout = BaseLayout.of(base_dir)
    layout.check(model, cfg.source)
    new = layout.new_names(model)
    if cfg.task_type == "seq_cls":
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in new:  # the output layer: one row per class
                if name in params and params[name].shape[0] == len(dataset.labels):
                    params[name].zero_()
    elif cfg.task_type == "masked_lm" and new and METHODS[cfg.method].trains_adapter(cfg):
        raise ConfigError(f"{cfg.source}: base {cfg.base} has no masked-LM head ({new[0]}, ... "
                          "would start untrained and an adapter would not keep it); use "
                          "method full, or a base with its MLM head")
    return model, layout


def _same_checkpoint(ckpt: Path | None, world: World) -> None:
    """Refuse to start when this rank would resume from another step than rank 0 (a run dir
    that is not on a file system every node shares)."""
    mine = int(ckpt.name.split("-")[1]) if ckpt else 0
    theirs = distributed.broadcast_int(mine)
    if mine != theirs:
        raise InputError(f"rank {world.rank} would resume from step {mine} ({ckpt}), rank 0 "
                         f"from step {theirs}: run_dir must be on a file system every node "
                         "shares")


def stable_adapter_config(config: dict[str, Any]) -> dict[str, Any]:
    """``adapter_config.json``'s content with ``target_modules`` sorted: peft writes the set
    it holds in the set's order, which changes with Python's hash seed, so the same training
    would give another file (and, in a store that keeps files bit for bit, another blob)."""
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


def _write_output(cfg: TrainConfig, method: Method, dtype: torch.dtype, base_dir: Path,
                  base_name: str | None, store: Store | None, dataset: Dataset,
                  metrics: dict[str, Any], tmp: Path, seconds: float,
                  resumed_from: int) -> tuple[Path | None, ModelInfo | None, dict[str, Any]]:
    target = Path(cfg.output["dir"]) if cfg.output.get("dir") else None
    facts: dict[str, Any] = {}

    def fill(out: Path) -> str:
        kind, more = method.save(out, dtype)
        facts.update(more)
        if kind == "finetune":
            _copy_side_files(base_dir, out)
        if (out / ADAPTER_CONFIG).is_file():
            config = stable_adapter_config(read_json(out / ADAPTER_CONFIG))
            config["base_model_name_or_path"] = base_reference(cfg.base, store)
            write_file_atomic(out / ADAPTER_CONFIG, (json.dumps(config, indent=2, sort_keys=True)
                                                     + "\n").encode())
        write_file_atomic(out / "metrics.json", json.dumps(metrics, indent=2).encode())
        return kind

    if target is not None:
        with atomic_output_dir(target, overwrite=bool(cfg.output.get("overwrite"))) as out:
            kind = fill(out)
        written = target
    else:
        written = tmp / "result"
        written.mkdir()
        kind = fill(written)
    entry = None
    if cfg.output.get("store"):
        provenance = {"source": f"hub train {cfg.source}", "trainer": {
            "method": cfg.method, "task_type": cfg.task_type, "config": cfg.raw,
            "data": dataset.describe(), "base": cfg.base, "seconds": round(seconds, 2),
            "resumed_from_step": resumed_from or None, **facts}}
        head = sorted(set(open_checkpoint(written).tensors) - method.layout.names) \
            if kind == "finetune" and method.layout is not None else []
        try:
            entry = store.add(written, cfg.output["store"], base=base_name, kind=kind,
                              metrics=metrics, provenance=provenance, progress=False,
                              new_tensors=head)
        except (MergehubError, OSError) as e:
            kept = written
            if target is None:  # in the temp dir, which goes: keep it beside the checkpoints
                kept = cfg.run_dir / "result"
                shutil.rmtree(kept, ignore_errors=True)
                cfg.run_dir.mkdir(parents=True, exist_ok=True)
                shutil.move(str(written), kept)
            raise StoreError(f"{e}; the trained result is kept in {kept}") from e
    return target, entry, facts
