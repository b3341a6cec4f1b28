"""Training configs for ``hub train``: YAML (or a dict), every key checked.

An example (``docs/training.md`` lists every key)::

    base: base                      # a store name or an HF model dir
    data: {task: add3}              # or {path: train.jsonl, eval_path: eval.jsonl}
    task_type: causal_lm            # causal_lm | seq_cls ({text, label} rows) | masked_lm
    method: lora                    # full | lora | incrlora | sparse | onebit | mezo | sparse_mezo
    peft: {r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}
    steps: 200
    batch_size: 16
    lr: 3.0e-3
    seed: 0
    checkpoint_every: 50
    output: {store: add3-lora}      # and/or {dir: ./add3-lora}

Unknown keys are errors naming the YAML line (and the closest known key): a typo must not be
ignored silently. Method parameters (``method_params``) are checked against each method's own
list and rules (its class in :mod:`mergehub.adapters.methods`); ``peft`` is handed to peft,
whose config classes reject unknown options.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from mergehub.adapters.methods import METHODS
from mergehub.adapters.schema import ConfigError, TrainConfig
from mergehub.errors import shown
from mergehub.merge.recipe import LineDict, did_you_mean, leaves, load_yaml, scalar_text

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_config"]

TOP_LEVEL = {"base", "data", "task_type", "method", "method_params", "peft", "steps",
             "batch_size", "lr", "weight_decay", "schedule", "warmup_steps", "seed",
             "checkpoint_every", "keep_checkpoints", "run_dir", "output", "device", "dtype"}
DATA_KEYS = {"task", "path", "eval_path", "max_length", "eval_examples", "labels",
             "mlm_probability"}
#: what the model is trained to do: the transformers auto class it is loaded with
#: (``AutoModelForCausalLM``, ``AutoModelForSequenceClassification``, ``AutoModelForMaskedLM``)
TASK_TYPES = ("causal_lm", "seq_cls", "masked_lm")
OUTPUT_KEYS = {"store", "base", "dir", "as", "dtype", "overwrite"}
SCHEDULES = ("constant", "linear")
OUTPUT_AS = ("auto", "adapter", "merged")
OUTPUT_DTYPES = ("base", "float32", "bfloat16", "float16")
DEVICE_FORM = re.compile(r"cpu|cuda(:\d+)?")
TRAIN_DTYPES = ("float32", "bfloat16", "float16", "base")


def load_config(path_or_dict: str | Path | dict[str, Any]) -> TrainConfig:
    """Read and check a config from a YAML file or a dict."""
    if isinstance(path_or_dict, dict):
        return parse_config(LineDict(path_or_dict), "<config>", Path.cwd())
    path = Path(path_or_dict)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from e
    return parse_config(load_yaml(text, str(path), ConfigError), str(path), path.parent)


def _check_keys(section: Any, known: set[str], source: str, where: str, what: str) -> LineDict:
    """``section`` as a LineDict, after checking it is a mapping with only ``known`` keys;
    ``where`` locates the section, ``source`` is the file (for a key's own line)."""
    if section is None:
        return LineDict()
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: {what} must be a mapping")
    section = section if isinstance(section, LineDict) else LineDict(section)
    for key in section:
        if key not in known:
            line = section.line_of(key)
            raise ConfigError(f"{source}{f':{line}' if line else ''}: unknown key {shown(key)} "
                              f"in {what}{did_you_mean(key, sorted(known))}")
    return section


def parse_config(doc: Any, source: str = "<config>", root: Path | None = None) -> TrainConfig:
    """Check a parsed YAML mapping and build a :class:`TrainConfig`."""
    root = root or Path.cwd()
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a training config is a YAML mapping (base, data, method, "
                          "...)")
    doc = _check_keys(doc, TOP_LEVEL, source, source, "the config")

    def at(section: LineDict, key: str) -> str:
        line = section.line_of(key)
        return f"{source}:{line}" if line else source

    for key in ("base", "data", "method"):
        if key not in doc:
            raise ConfigError(f"{source}: missing {key!r}")
    method = doc["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"{at(doc, 'method')}: unknown method {shown(method)} (one of "
                          f"{', '.join(METHODS)}){did_you_mean(method, list(METHODS))}")
    trainer = METHODS[method]
    data = _check_keys(doc["data"], DATA_KEYS, source, at(doc, "data"), "data")
    if bool(data.get("task")) == bool(data.get("path")):
        raise ConfigError(f"{at(doc, 'data')}: data needs exactly one of 'task' (a built-in "
                          "synthetic task) and 'path' (a JSONL or text file)")
    task_type = doc.get("task_type", "causal_lm")
    if task_type not in TASK_TYPES:
        raise ConfigError(f"{at(doc, 'task_type')}: task_type must be one of "
                          f"{', '.join(TASK_TYPES)}, not {shown(task_type)}"
                          f"{did_you_mean(str(task_type), list(TASK_TYPES))}")
    _check_task_data(data, task_type, source, at)
    data = dict(data)
    for key in ("path", "eval_path"):
        if data.get(key):
            data[key] = str((root / scalar_text(data, key, source, "a file path",
                                                ConfigError)).expanduser())
    given = doc.get("method_params")
    for key in given if isinstance(given, dict) else ():
        if key in trainer.renamed:
            new, why = trainer.renamed[key]
            line = given.line_of(key) if isinstance(given, LineDict) else 0
            raise ConfigError(f"{source}{f':{line}' if line else ''}: {method} parameter "
                              f"{key!r} was renamed {new!r}: {why}")
    params = _check_keys(doc.get("method_params"), set(trainer.params), source,
                         at(doc, "method_params"), f"method_params of {method}")
    peft_cfg = doc.get("peft")
    if peft_cfg is not None and not isinstance(peft_cfg, dict):
        raise ConfigError(f"{at(doc, 'peft')}: peft must be a mapping of peft config options")
    for section, what in ((params, "method_params"), (peft_cfg or {}, "peft")):
        for key, value in section.items():
            if any(isinstance(v, float) and not math.isfinite(v) for v in leaves(value)):
                raise ConfigError(f"{at(section, key) if isinstance(section, LineDict) else source}"
                                  f": {what} {shown(key)} must be finite, not {shown(value)}")
    trainer.check_params(params, peft_cfg, task_type, at, doc)
    output = _check_keys(doc.get("output"), OUTPUT_KEYS, source, at(doc, "output"), "output")
    if not output.get("store") and not output.get("dir"):
        raise ConfigError(f"{at(doc, 'output') if 'output' in doc else source}: output needs "
                          "'store' (a store entry name) and/or 'dir' (a directory)")
    for key, choices in (("as", OUTPUT_AS), ("dtype", OUTPUT_DTYPES)):
        if key in output and output[key] not in choices:
            raise ConfigError(f"{at(output, key)}: output {key} must be one of {', '.join(choices)}")
    for key in ("store", "base", "dir"):
        scalar_text(output, key, source, "a name or path", ConfigError)
    output = dict(output)
    if output.get("dir"):
        output["dir"] = str((root / str(output["dir"])).expanduser())
    base = scalar_text(doc, "base", source, "a store name or an HF model dir", ConfigError)
    if not base:
        raise ConfigError(f"{at(doc, 'base')}: base is empty")
    if (root / base).exists():
        base = str((root / base).resolve())

    def number(key: str, kind: type, default: Any, minimum: float) -> Any:
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or (kind is int and not float(value).is_integer()) \
                or value < minimum:
            raise ConfigError(f"{at(doc, key)}: {key} must be a{'n integer' if kind is int else ' number'}"
                              f" >= {minimum}, got {shown(value)}")
        return kind(value)

    schedule = doc.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise ConfigError(f"{at(doc, 'schedule')}: schedule must be one of {', '.join(SCHEDULES)}"
                          f", not {shown(schedule)}")
    device = doc.get("device", "cpu")
    if not (isinstance(device, str) and DEVICE_FORM.fullmatch(device)):
        raise ConfigError(f"{at(doc, 'device')}: device must be cpu, cuda or cuda:N, not "
                          f"{shown(device)}")
    dtype = doc.get("dtype", "float32")
    if dtype not in TRAIN_DTYPES:
        raise ConfigError(f"{at(doc, 'dtype')}: dtype (the weights' while training) must be one "
                          f"of {', '.join(TRAIN_DTYPES)}, not {shown(dtype)}")
    run_dir = scalar_text(doc, "run_dir", source, "a directory", ConfigError)
    if run_dir is None and output.get("dir"):
        run_dir = output["dir"] + ".run"
    elif run_dir is None:
        run_dir = root / f".hub-train-{str(output['store']).replace('/', '_')}"
    return TrainConfig(
        base=base, method=method, data=data, task_type=task_type,
        steps=number("steps", int, 100, 1), batch_size=number("batch_size", int, 8, 1),
        lr=number("lr", float, 1e-3, 0), weight_decay=number("weight_decay", float, 0.0, 0),
        schedule=schedule, warmup_steps=number("warmup_steps", int, 0, 0),
        seed=number("seed", int, 0, 0), checkpoint_every=number("checkpoint_every", int, 0, 0),
        keep_checkpoints=number("keep_checkpoints", int, 2, 1), device=device, dtype=dtype,
        run_dir=(root / str(run_dir)).expanduser(), method_params=dict(params),
        peft=dict(peft_cfg) if peft_cfg is not None else None, output=output, source=source,
        raw=_plain(doc), param_defaults=dict(trainer.params))


def _check_task_data(data: LineDict, task_type: str, source: str, at: Any) -> None:
    """The data keys that only some task types take, and what each task type needs."""
    if task_type != "causal_lm" and data.get("task"):
        raise ConfigError(f"{at(data, 'task')}: the synthetic tasks train causal LMs; "
                          f"task_type {task_type} needs data path: (a JSONL file)")
    if "labels" in data:
        labels = data["labels"]
        if task_type != "seq_cls":
            raise ConfigError(f"{at(data, 'labels')}: data labels applies to task_type seq_cls")
        if not isinstance(labels, list) or len(labels) < 2 or \
                len({str(v) for v in labels}) != len(labels) or \
                not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in labels):
            raise ConfigError(f"{at(data, 'labels')}: data labels must be a list of at least "
                              "two distinct strings or integers (the classes, in id order)")
    if "mlm_probability" in data:
        p = data["mlm_probability"]
        if task_type != "masked_lm":
            raise ConfigError(f"{at(data, 'mlm_probability')}: data mlm_probability applies "
                              "to task_type masked_lm")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
            raise ConfigError(f"{at(data, 'mlm_probability')}: data mlm_probability must be "
                              f"a number between 0 and 1, not {shown(p)}")


def _plain(obj: Any) -> Any:
    """A JSON-able copy (LineDicts to dicts) for provenance."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj
