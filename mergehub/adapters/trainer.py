"""The training loop behind ``hub train``: methods, checkpoints, resume, and the store entry.

:func:`train` reads a config (:mod:`mergehub.adapters.config`), loads the base (an HF dir, or a
store entry exported to a temp dir) in float32, builds the method's trainable model, and runs
``steps`` steps with a progress bar showing the loss. Every ``checkpoint_every`` steps it writes
``RUN_DIR/checkpoint-NNNNNNN/`` atomically (trainable tensors, optimizer state, the step and the
loss history); a later run of the same config resumes from the newest one. Batches are a
function of (seed, step) and every step reseeds torch's global generator with (seed, step), so
a resumed run reproduces the uninterrupted run's loss curve exactly.

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

import hashlib
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

from mergehub.adapters import distributed, onebit, sparse
from mergehub.adapters import lora as lora_mod
from mergehub.adapters.config import PEFT_METHODS, ConfigError, TrainConfig, load_config
from mergehub.adapters.data import Batch, Dataset, build_dataset, completion_scores, token_loss
from mergehub.adapters.distributed import World
from mergehub.errors import InputError, MergehubError, StoreError, spelled
from mergehub.progress import bar_disabled
from mergehub.storage.atomic import atomic_output_dir, check_output_target, write_file_atomic
from mergehub.safejson import read_json
from mergehub.storage.checkpoint import ADAPTER_CONFIG, open_checkpoint
from mergehub.storage.store import ModelInfo, Store, base_reference, names_entry
from mergehub.storage.writer import MODEL_SIDE_FILES

STATE_FILE, TENSORS_FILE, OPTIMIZER_FILE = ("state.json", "trainable.safetensors",
                                            "optimizer.safetensors")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: config keys that may change between an interrupted run and its resumption
_RESUMABLE_CHANGES = ("steps", "output", "checkpoint_every", "keep_checkpoints", "run_dir")


def _fresh() -> str:
    """How the caller starts a run over, as it spells it (error messages)."""
    return spelled("resume=False", "`hub train --fresh`")


# --- methods ------------------------------------------------------------------------------

class Method:
    """Full fine-tuning with AdamW; the other methods override the parts that differ.

    A method owns the model it trains (``self.model``), its optimizer, one training step, the
    state a checkpoint keeps, and how the result is saved.
    """

    #: whether the parameters are sharded over the ranks (every rank must then take part in
    #: evaluating, checkpointing and saving)
    sharded = False

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, dataset: Dataset,
                 resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
                 world: World | None = None):
        self.cfg, self.dataset, self.world = cfg, dataset, world
        self.model = self.build(model, resume)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = self.make_optimizer()

    def build(self, model: torch.nn.Module,
              resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None) -> torch.nn.Module:
        model.requires_grad_(True)
        return model

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(self.params.values()), lr=self.cfg.lr,
                                 weight_decay=self.cfg.weight_decay)

    def step(self, batch: Batch, step: int) -> float:
        """One optimizer step on ``batch``; returns the batch loss before the update."""
        loss = self.model(**batch.kwargs()).loss
        loss.backward()
        self.after_backward(step)
        self.optimizer.step()
        self.before_zero_grad(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.after_step(step)
        return loss.item()

    def after_backward(self, step: int) -> None:
        """Hook: gradients are present."""

    def before_zero_grad(self, step: int) -> None:
        """Hook: after the optimizer step, gradients still present."""

    def after_step(self, step: int) -> None:
        """Hook: the step is complete."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the model: the trainable tensors by name."""
        return {n: p.detach() for n, p in self.params.items()}

    def extra_state(self) -> dict[str, Any]:
        """JSON-able method state a checkpoint keeps (besides tensors and optimizer)."""
        return {}

    def whole_model(self, fresh: Callable[[], torch.nn.Module]) -> None:
        """Before rank 0 saves: make ``self.model`` the whole model there (a sharded method
        gathers its weights into ``fresh()``, a plain copy of the model; every rank calls
        this)."""

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                if name not in tensors:
                    raise InputError(f"checkpoint has no tensor {name!r} (another method or "
                                     f"model? start afresh with {_fresh()})")
                p.copy_(tensors[name])

    #: the base's tensors, which saved results are named after (set by :func:`train`)
    layout: "BaseLayout | None" = None

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        """Write the result to ``out``; returns the store kind and facts for provenance."""
        save_full(self.model, out, dtype, self.layout)
        return "finetune", {}


@dataclass
class BaseLayout:
    """The tensor names of the base a model was loaded from, so that a saved result lines up
    with its base tensor by tensor: a task model's ``PREFIX.name`` is saved as ``name`` when the
    base spells it so, and base tensors the task model lacks (a pooler a masked LM does not
    use, another head) are copied over unchanged."""

    base_dir: Path
    names: set[str]

    @classmethod
    def of(cls, base_dir: Path) -> "BaseLayout":
        return cls(base_dir, set(open_checkpoint(base_dir).tensors))

    def saved_name(self, name: str, prefix: str) -> str:
        """The name ``name`` of the task model is saved under."""
        if name not in self.names and prefix and name.startswith(prefix + "."):
            stripped = name[len(prefix) + 1:]
            if stripped in self.names:
                return stripped
        return name

    def new_names(self, model: torch.nn.Module) -> list[str]:
        """The model's tensors the base has under no spelling (a new head); a tensor tied to
        one the base has (a masked LM's decoder, tied to the word embeddings) is not new."""
        prefix = getattr(model, "base_model_prefix", "")
        ties: dict[tuple[int, tuple[int, ...]], list[str]] = {}
        for name, t in model.state_dict().items():
            ties.setdefault((t.data_ptr(), tuple(t.shape)), []).append(name)
        return [n for names in ties.values()
                if not any(self.saved_name(m, prefix) in self.names for m in names)
                for n in names]

    def check(self, model: torch.nn.Module, where: str) -> None:
        """Refuse a task model that shares no tensor with the base (another architecture)."""
        prefix = getattr(model, "base_model_prefix", "")
        if not any(self.saved_name(n, prefix) in self.names for n in model.state_dict()):
            raise InputError(f"{where}: the {type(model).__name__} built from base "
                             f"{self.base_dir} shares no tensor name with the base's weights")

    def align(self, out: Path, prefix: str) -> None:
        """Rename the weights ``save_pretrained`` wrote to ``out`` and add the base tensors
        they lack (unchanged, in the base's dtype), rewriting only what changes."""
        from safetensors.torch import load_file, save_file

        index_path = next(out.glob("*.safetensors.index.json"), None)
        files = sorted(p.name for p in out.glob("*.safetensors"))
        renamed: dict[str, dict[str, torch.Tensor]] = {}
        changed: set[str] = set()
        for f in files:
            tensors = load_file(str(out / f))
            renamed[f] = {self.saved_name(n, prefix): t for n, t in tensors.items()}
            if set(renamed[f]) != set(tensors):
                changed.add(f)
        carry = sorted(self.names - {n for tensors in renamed.values() for n in tensors})
        if carry:
            with open_checkpoint(self.base_dir) as base:
                renamed[files[-1]].update({n: base.load(n).clone() for n in carry})
            changed.add(files[-1])
        for f in sorted(changed):
            save_file(renamed[f], str(out / f), metadata={"format": "pt"})
        if index_path is not None:
            index = json.loads(index_path.read_text())
            index["weight_map"] = {n: f for f in files for n in renamed[f]}
            index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_full(model: torch.nn.Module, out: Path, dtype: torch.dtype,
              layout: BaseLayout | None = None) -> None:
    """``save_pretrained`` in ``dtype``, named after the base's tensors when ``layout`` says."""
    model.to(dtype).save_pretrained(out)
    if layout is not None:
        layout.align(out, getattr(model, "base_model_prefix", ""))


class PeftMethod(Method):
    """A peft tuner (LoRA by default) trained with AdamW; see :mod:`mergehub.adapters.lora`."""

    def build(self, model, resume):
        return wrap_peft(model, self.cfg)

    def before_zero_grad(self, step: int) -> None:
        if hasattr(self.model.base_model, "update_and_allocate"):  # AdaLoRA's rank allocation
            self.model.base_model.update_and_allocate(step)

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        return save_peft(self.model, self.cfg, out, dtype, self.layout)


#: the peft task type of each ``task_type`` (peft keeps a classifier's head trainable and
#: saves it with the adapter, ``modules_to_save``)
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "masked_lm": None}


def wrap_peft(model: torch.nn.Module, cfg: TrainConfig, **overrides: Any) -> torch.nn.Module:
    """``model`` wrapped with the config's peft tuner (``overrides`` win over ``peft:``)."""
    from peft import get_peft_model

    spec = {"task_type": PEFT_TASK_TYPES[cfg.task_type],
            **(cfg.peft or {"target_modules": "all-linear"}), **overrides}
    return get_peft_model(model, lora_mod.peft_config(spec, f"{cfg.source} (peft)", cfg.steps))


def save_peft(model: torch.nn.Module, cfg: TrainConfig, out: Path, dtype: torch.dtype,
              layout: BaseLayout | None = None) -> tuple[str, dict[str, Any]]:
    """An adapter dir, or (``output.as: merged``, or ``auto`` for an adapter that is not a
    plain delta, such as a classifier's LoRA with its head) the base with the adapter merged
    in."""
    config = model.peft_config["default"]
    # peft would look the name up on the Hub while saving (a store name is no repo id there);
    # the output's adapter_config.json gets the base's origin afterwards (_write_output)
    config.base_model_name_or_path = None
    mode = cfg.output.get("as", "auto")
    if mode == "auto":
        mode = "adapter" if lora_mod.is_plain_lora(config) else "merged"
    if mode == "adapter":
        model.to(dtype).save_pretrained(out)
        return "adapter", {"saved_as": "adapter"}
    save_full(model.merge_and_unload(), out, dtype, layout)
    return "finetune", {"saved_as": "merged", "peft_type": str(config.peft_type.value)}


class IncreLoRAMethod(PeftMethod):
    """IncreLoRA: LoRA whose ranks grow by importance under a budget."""

    def build(self, model, resume):
        spec = dict(self.cfg.peft or {})
        if str(spec.get("peft_type", "LORA")).upper() != "LORA":
            raise ConfigError(f"{self.cfg.source}: incrlora grows a LoRA: peft_type must be LORA")
        if "r" in spec:
            raise ConfigError(f"{self.cfg.source}: incrlora sets the rank itself: use "
                              "method_params init_r and budget instead of peft r")
        model = wrap_peft(model, self.cfg, r=int(self.cfg.param("init_r")))
        p = self.cfg.param
        self.grower = lora_mod.IncreLoRA(
            model, init_r=int(p("init_r")), budget=p("budget"), grow_every=int(p("grow_every")),
            grow_modules=int(p("grow_modules")), grow_rank=p("grow_rank"), warmup=int(p("warmup")),
            beta=float(p("beta")), beta_unc=float(p("beta_unc")), init_std=float(p("init_std")),
            score=str(p("score")), uncertainty=bool(p("uncertainty")),
            reserve=bool(p("reserve")), seed=self.cfg.seed)
        if resume is not None:
            self.grower.restore(resume[1]["incrlora"])
        return model

    def after_backward(self, step: int) -> None:
        self.grower.observe()

    def after_step(self, step: int) -> None:
        old = self.params
        if not self.grower.maybe_grow(step):
            return
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        old_opt, self.optimizer = self.optimizer, self.make_optimizer()
        for name, p in self.params.items():  # carry Adam's moments over, zero for new ranks
            state = old_opt.state.get(old[name]) if name in old else None
            if state and lora_mod.RESERVE not in name:  # a reserve is drawn anew
                self.optimizer.state[p] = {k: _pad(v, p.shape) if torch.is_tensor(v) and v.dim() else v
                                           for k, v in state.items()}

    def extra_state(self) -> dict[str, Any]:
        return {"incrlora": self.grower.state()}

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        self.grower.finish()
        self.grower.finalize_config(self.model.peft_config["default"])
        kind, facts = super().save(out, dtype)
        self.grower.write_side_config(out)
        return kind, {**facts, "incrlora_total_rank": self.grower.total_rank(),
                      "incrlora_budget": self.grower.budget}


def _pad(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = value.new_zeros(shape)
    out[tuple(slice(0, s) for s in value.shape)] = value
    return out


class OneBitMethod(PeftMethod):
    """LoRA factors trained through a 1-bit code (see :mod:`mergehub.adapters.onebit`)."""

    def build(self, model, resume):
        model = super().build(model, resume)
        try:
            onebit.attach(model, *self.options())
        except InputError as e:
            raise ConfigError(f"{self.cfg.source}: {e}") from None
        return model

    def options(self) -> tuple[str, str, bool]:
        """(group, quantizer, mean) of the config."""
        p = self.cfg.param
        return str(p("group")), str(p("quantizer")), bool(p("mean"))

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        latent = {}
        for name, module in self.model.named_modules():
            if hasattr(module, "parametrizations") and "weight" in module.parametrizations:
                saved = name.removesuffix(".default") + ".weight"
                latent[saved] = module.parametrizations.weight.original.detach().float()
        onebit.detach(self.model)
        kind, facts = super().save(out, dtype)
        if kind == "adapter":
            onebit.write_packed(out, latent, *self.options())
            facts["onebit_packed_bytes"] = (out / onebit.PACKED_FILE).stat().st_size
        return kind, facts


class SparseMethod(Method):
    """FISH-mask sparse fine-tuning (see :mod:`mergehub.adapters.sparse`)."""

    def build(self, model, resume):
        p = self.cfg.param
        selected = sparse.select(model, p("include"), p("exclude"))
        if resume is not None:  # a global mask may leave a tensor out
            masks = {n: resume[0][f"mask:{n}"] for n in selected if f"mask:{n}" in resume[0]}
        else:
            model.requires_grad_(True)
            batches = (self.dataset.batch(10**9 + i, self.cfg.batch_size, self.cfg.seed).kwargs()
                       for i in range(int(p("fisher_batches"))))
            masks = sparse.fisher_masks(model, selected, batches, float(p("density")),
                                        str(p("scope")))
        sparse.attach(model, masks)
        return model

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().state_tensors(),
                **{f"mask:{n}": idx for n, idx in sparse.masks_of(self.model).items()}}

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        masked = sum(idx.numel() for idx in sparse.masks_of(self.model).values())
        sparse.detach(self.model)
        save_full(self.model, out, dtype, self.layout)
        return "finetune", {"sparse_entries": masked}


class MezoMethod(Method):
    """MeZO / Sparse MeZO (zeroth order, two forward passes per step) over every parameter or
    over a peft adapter's; the optimizer is :class:`mergehub.adapters.mezo.MeZO`. On several
    processes the ranks share out each batch (or, with ``n_perturbations`` > 1, the
    perturbations) and exchange only loss values; with ``shard: true`` each rank holds 1/N of
    every parameter (FSDP2, :func:`mergehub.adapters.distributed.shard_model`)."""

    def build(self, model, resume):
        # the trained parameters are those that require grad (MeZO's rule); the closure runs
        # under no_grad, so no autograd graph is built: the memory of inference
        if self.cfg.param("over") == "adapter":
            return wrap_peft(model, self.cfg)
        model.requires_grad_(True)
        if self.cfg.param("shard"):
            self.sharded = True
            return distributed.shard_model(model)
        return model

    def make_optimizer(self) -> torch.optim.Optimizer:
        from mergehub.adapters.mezo import MeZO

        density = float(self.cfg.param("density")) if self.cfg.method == "sparse_mezo" else None
        return MeZO(list(self.params.values()), lr=self.cfg.lr, eps=float(self.cfg.param("eps")),
                    weight_decay=self.cfg.weight_decay, seed=self.cfg.seed, density=density,
                    n_perturbations=int(self.cfg.param("n_perturbations")),
                    process_group=None if self.world is None else torch.distributed.group.WORLD)

    def step(self, batch: Batch, step: int) -> float:
        from mergehub.adapters.mezo import forward_only

        objective = self.cfg.param("objective")  # checked by the config
        part = batch.part(self.optimizer.batch_rows(len(batch.input_ids)))

        def closure() -> tuple[float, int]:
            """(loss sum, scored tokens) of this rank's rows: the ranks' sums and counts add
            up to the loss of the whole batch."""
            logits = self.model(**part.inputs()).logits
            if objective == "loss":
                return token_loss(logits, part.labels, self.cfg.task_type == "causal_lm")
            _, right, total = completion_scores(logits, part.labels)
            return total - right, total

        with forward_only(self.model):  # eval mode: both passes see the same function
            return float(self.optimizer.step(closure))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors; sharded, gathered one at a time (every rank must call this)
        and kept by rank 0 only."""
        if not self.sharded:
            return super().state_tensors()
        keep = self.world.main
        return {n: t for n, p in self.params.items()
                for t in [distributed.whole(p)] if keep}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self.sharded:
            return super().load_tensors(tensors)
        for name, p in self.params.items():
            if name not in tensors or tensors[name].shape != p.shape:
                raise InputError(f"checkpoint has no tensor {name!r} of shape {tuple(p.shape)} "
                                 f"(another method or model? start afresh with {_fresh()})")
            distributed.set_whole(p, tensors[name])

    def whole_model(self, fresh: Callable[[], torch.nn.Module]) -> None:
        if not self.sharded:
            return
        tensors = self.state_tensors()
        if self.world.main:
            self.model = fresh().requires_grad_(True)
            self.params = dict(self.model.named_parameters())
            self.sharded = False
            self.load_tensors(tensors)

    def save(self, out: Path, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
        if self.cfg.param("over") == "adapter":
            return save_peft(self.model, self.cfg, out, dtype, self.layout)
        return super().save(out, dtype)


METHODS: dict[str, type[Method]] = {
    "full": Method, "lora": PeftMethod, "incrlora": IncreLoRAMethod, "sparse": SparseMethod,
    "onebit": OneBitMethod, "mezo": MezoMethod, "sparse_mezo": MezoMethod}


# --- the loop -----------------------------------------------------------------------------

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
    was_training = model.training
    model.eval()
    try:
        if dataset.task_type == "causal_lm":
            return _evaluate_completions(model, batches)
        loss_sum = right = total = 0.0
        for b in batches:
            logits = model(**b.inputs()).logits
            mask = b.labels != -100
            loss_sum += token_loss(logits, b.labels, causal=False)[0]
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
        loss_sum += token_loss(logits, b.labels)[0]
        e, r, t = completion_scores(logits, b.labels)
        exact, right, total, examples = exact + e, right + r, total + t, examples + len(b.labels)
    return {"eval_loss": loss_sum / max(total, 1), "eval_exact_match": exact / examples,
            "eval_token_accuracy": right / max(total, 1)}


def _digest(cfg: TrainConfig) -> str:
    keep = {k: v for k, v in cfg.raw.items() if k not in _RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``run_dir`` (they appear atomically)."""
    found = sorted(run_dir.glob("checkpoint-*")) if run_dir.is_dir() else []
    found = [p for p in found if (p / STATE_FILE).is_file()]
    return found[-1] if found else None


def _read_checkpoint(path: Path, cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    if state.get("config_digest") != _digest(cfg):
        raise ConfigError(f"{path}: this checkpoint was made with another config (only "
                          f"{', '.join(_RESUMABLE_CHANGES)} may change to resume); start "
                          f"afresh with {_fresh()} or use another run_dir")
    return state, load_file(str(path / TENSORS_FILE))


def save_optimizer_state(state: dict[str, Any], path: Path) -> None:
    """Write an optimizer's ``state_dict()`` as one safetensors file, no pickle: its tensors as
    tensors, the nesting around them (with dict keys' types: torch keys ``state`` by parameter
    index) and the plain values as JSON in the file's metadata."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().contiguous().clone()
            return {"tensor": key}
        if isinstance(value, dict):
            return {"dict": [[k, encode(v)] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return {"list": [encode(v) for v in value]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise TypeError(f"optimizer state holds a {type(value).__name__}, which a checkpoint "
                        "cannot store")

    structure = json.dumps(encode(state))
    save_file(tensors, str(path), metadata={"mergehub.optimizer_state": structure})


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """Read what :func:`save_optimizer_state` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        structure = (f.metadata() or {}).get("mergehub.optimizer_state")
        if structure is None:
            raise InputError(f"{path}: not a mergehub optimizer state (no structure metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def decode(node: dict[str, Any]) -> Any:
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "dict" in node:
            return {k: decode(v) for k, v in node["dict"]}
        if "list" in node:
            return [decode(v) for v in node["list"]]
        return node["value"]

    return decode(json.loads(structure))


def _write_checkpoint(cfg: TrainConfig, method: Method, step: int, losses: list[float],
                      history: list[dict[str, Any]], main: bool = True) -> Path | None:
    """Write ``checkpoint-STEP`` (on rank 0 only; the other ranks of a sharded run take part
    in gathering the tensors); returns its path."""
    from safetensors.torch import save_file

    state_tensors = method.state_tensors()
    if not main:
        return None
    path = cfg.run_dir / f"checkpoint-{step:07d}"
    with atomic_output_dir(path, overwrite=True) as tmp:
        tensors = {n: t.detach().contiguous().clone() for n, t in state_tensors.items()}
        save_file(tensors, str(tmp / TENSORS_FILE))
        save_optimizer_state(method.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({
            "step": step, "loss": losses[-1], "losses": losses, "history": history,
            "method": cfg.method, "method_state": method.extra_state(),
            "config_digest": _digest(cfg)}))
    old = sorted(cfg.run_dir.glob("checkpoint-*"))[:-cfg.keep_checkpoints]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return path


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


#: the methods that train on several processes (torchrun)
PARALLEL_METHODS = ("mezo", "sparse_mezo")


def check_world(cfg: TrainConfig, size: int) -> None:
    """Refuse a config that cannot train on ``size`` processes: only MeZO methods run on more
    than one, a batch shared out among the ranks needs a row for each, and ``shard`` needs
    several processes and whole-model training."""
    shard = cfg.method in PARALLEL_METHODS and cfg.param("shard")
    if shard and cfg.param("over") == "adapter":
        raise ConfigError(f"{cfg.source}: shard: true shards the model's own weights; MeZO over "
                          "an adapter trains a few tensors: run it data-parallel without shard")
    if size == 1:
        if shard:
            raise ConfigError(f"{cfg.source}: shard: true needs more than one process (torchrun "
                              "--nproc-per-node N, or hub train --nproc N)")
        return
    if cfg.method not in PARALLEL_METHODS:
        raise ConfigError(f"{cfg.source}: method {cfg.method} trains on one process; of the "
                          f"methods only {' and '.join(PARALLEL_METHODS)} run on {size} "
                          f"processes")
    by_batch = shard or int(cfg.param("n_perturbations")) == 1
    if by_batch and cfg.batch_size < size:
        raise ConfigError(f"{cfg.source}: batch_size {cfg.batch_size} is smaller than the {size} "
                          f"processes that share out each batch (one row each at least)")


def train(config: str | Path | dict[str, Any] | TrainConfig, *, store: Store | None = None,
          resume: bool = True, progress: bool | None = None, stop_after: int | None = None,
          echo: Callable[[str], None] = lambda text: None) -> TrainResult:
    """Train as ``config`` says (a YAML path, a dict or a :class:`TrainConfig`).

    Started by torchrun as one of several processes (or in a process group already
    initialized), MeZO methods train on all of them: every rank runs this function; rank 0
    alone shows progress, writes checkpoints and the result, and returns ``output_dir`` and
    ``entry`` (see :mod:`mergehub.adapters.distributed`).

    Args:
        store: where ``output.store`` goes and store-named bases come from.
        resume: continue from the newest checkpoint in the run dir if there is one (else
            its checkpoints are removed and training starts afresh).
        progress: a progress bar with the loss on stderr: None (default) on a terminal
            only (:mod:`mergehub.progress`), True always, False never.
        stop_after: stop after this many steps (counted from 0) as if interrupted: the last
            checkpoint stays and no output is written. For tests and step-wise runs.
        echo: receives one-line status messages.
    """
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    world, created = distributed.join()
    try:
        check_world(cfg, world.size if world else 1)
        if world is not None and not world.main:
            progress, echo = False, lambda text: None
        return _train(cfg, world, store, resume, progress, stop_after, echo)
    finally:
        if created:
            torch.distributed.destroy_process_group()


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
        model = model.float()
        model.train()

        ckpt = latest_checkpoint(cfg.run_dir) if resume else None
        if world is not None:
            _same_checkpoint(ckpt, world)
        if main and not resume and cfg.run_dir.exists():
            shutil.rmtree(cfg.run_dir)
        state, tensors = _read_checkpoint(ckpt, cfg) if ckpt else ({}, {})
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
                loss = method.step(dataset.batch(step, cfg.batch_size, cfg.seed), step)
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
                    _write_checkpoint(cfg, method, done, losses, history, main)
        last = losses[-10:]
        metrics = {"loss": sum(last) / len(last), "step": cfg.steps,
                   **{k: v for k, v in history[-1].items() if k.startswith("eval_")},
                   "history": history}
        out_dtype = base_dtype if cfg.output.get("dtype", "base") == "base" \
            else DTYPES[cfg.output["dtype"]]
        result = TrainResult(cfg.steps, losses, history, metrics, resumed_from=start or None,
                             rank=world.rank if world else 0)
        method.whole_model(lambda: load_task_model(cfg, base_dir, dataset)[0].float())
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
    elif cfg.task_type == "masked_lm" and new and (cfg.method in PEFT_METHODS or
                                                     cfg.method_params.get("over") == "adapter"):
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
            config = read_json(out / ADAPTER_CONFIG)
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
