"""Build a ready ``transformers`` model from a store entry or a model dir, weights streamed in.

:func:`load` reads the entry's ``config.json``, builds the model class its ``architectures``
names (any architecture; ``model_class`` overrides) directly on the target device without
initializing the weights, then copies each stored tensor, decoded one at a time, into its
parameter or buffer: nothing is exported to disk and the host never holds more than one
tensor. A LoRA entry loads as its base with the adapter merged as ``hub merge`` would
(task arithmetic, weight 1: θ0 + B·A·scaling in float32, rounded once to the weight's dtype);
a compressed entry loads as what it decodes to (its base plus the approximated delta).

Checkpoint names are matched to the model's state-dict names as ``from_pretrained`` matches
them for the common cases (:mod:`mergehub.names`). Tied
weights (an LM head sharing the embedding) are tied before loading, so the one stored tensor
fills both. Model tensors that the checkpoint lacks are initialized by the model's own
``_init_weights`` and listed in :attr:`LoadInfo.missing` with a warning, as ``from_pretrained``
does; checkpoint tensors the model has no place for are listed in :attr:`LoadInfo.unused`.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergehub.errors import BaseMismatchError, InputError
from mergehub.names import match_names, state_tensors
from mergehub.storage.checkpoint import Checkpoint, open_checkpoint
from mergehub.storage.safetensors_format import FLOAT_DTYPES, TORCH_DTYPE
from mergehub.storage.store import Store, StoredModel, as_store, names_entry


@dataclass
class LoadInfo:
    """Where a model built by :func:`load` came from (``model.mergehub_source``).

    Attributes:
        name: the store entry or path loaded.
        store: the store it was read from (``None`` for a path).
        base: the model a :class:`~mergehub.compose.Composer` of this model merges against by
            default: the entry itself, or an adapter's base entry.
        missing: model tensors the checkpoint lacks (initialized by the model's init).
        unused: checkpoint tensors the model has no parameter or buffer for.
    """

    name: str
    store: Store | None
    base: str
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def _no_init() -> Any:
    """transformers' context that skips weight initialization (moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _model_class(config: Any, model_class: type | None, label: str) -> type:
    if model_class is not None:
        return model_class
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError:
        raise InputError(f"{label}: no transformers class for architectures "
                         f"{getattr(config, 'architectures', None)} (model_type "
                         f"{config.model_type!r}); pass model_class=") from None


def _config(config_json: bytes, label: str) -> Any:
    from transformers import CONFIG_MAPPING

    data = json.loads(config_json)
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise InputError(f"{label}: config.json has model_type {model_type!r}, which this "
                         "transformers does not know")
    return CONFIG_MAPPING[model_type].from_dict(data)


def _stored_dtype(reader: StoredModel | Checkpoint) -> torch.dtype | None:
    """The dtype of most of the float bytes stored (what ``from_pretrained(dtype="auto")``
    would pick from the weights)."""
    sizes: Counter[str] = Counter()
    for spec in reader.specs():
        if spec.dtype in FLOAT_DTYPES:
            sizes[spec.dtype] += spec.nbytes
    return TORCH_DTYPE[sizes.most_common(1)[0][0]] if sizes else None


def load(name_or_path: str | Path, store: Store | str | Path | None = None, *,
         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         model_class: type | None = None) -> Any:
    """A ready ``transformers`` model (in eval mode) of a store entry or an HF model dir.

    Args:
        name_or_path: a store entry of ``store`` (a fine-tune, merged, compressed or LoRA
            entry, or a base) or an HF model dir.
        store: the store to read entries from (a :class:`Store` or its root directory).
        device: where the model is built and its weights go (``cpu``, ``cuda``, ``cuda:1``).
        dtype: the parameters' dtype (default: the stored weights' dtype).
        model_class: the class to build (default: the config's ``architectures``).

    The result has ``model.mergehub_source`` (:class:`LoadInfo`), which
    :class:`~mergehub.compose.Composer` reads for its default store and base.
    """
    ref = str(name_or_path)
    store = as_store(store)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda: no CUDA device is available")
    if names_entry(ref, store):
        reader: StoredModel | Checkpoint = store.open(ref)
        if reader.info.format == "peft":
            return _load_adapter(ref, store, dev, dtype, model_class)
        if "config.json" not in reader.side_files:
            raise InputError(f"model {ref!r} has no config.json: only a transformers model "
                             "can be loaded as one (export it to read its tensors)")
        config_json = reader.side_file("config.json")
        info = LoadInfo(ref, store, ref)
    else:
        path = Path(ref).expanduser()
        if not path.exists():
            where = (f" nor a model in store {store.root}{store.did_you_mean(ref)}"
                     if store is not None else "")
            raise InputError(f"{ref!r} is neither a local path{where}")
        reader = open_checkpoint(path)
        if reader.format == "peft":
            raise InputError(f"{ref}: a PEFT adapter dir: add it to a store with its base "
                             "(Store.add(DIR, NAME, base=BASE)) and load that entry, or load "
                             "the base "
                             "and apply or attach the adapter with a Composer")
        if not (path / "config.json").is_file():
            raise InputError(f"{ref}: no config.json: only a transformers model dir can be "
                             "loaded as a model")
        config_json = (path / "config.json").read_bytes()
        info = LoadInfo(ref, None, ref)
    config = _config(config_json, ref)
    cls = _model_class(config, model_class, ref)
    dtype = dtype or _stored_dtype(reader) or torch.float32
    with torch.device(dev), _no_init():
        model = cls._from_config(config, dtype=dtype)
    model.tie_weights()
    _stream_weights(model, reader, dev, info)
    model.eval()
    model.mergehub_source = info
    return model


def _stream_weights(model: torch.nn.Module, reader: StoredModel | Checkpoint,
                    device: torch.device, info: LoadInfo) -> None:
    """Copy every stored tensor into the model tensor it fills, one at a time; initialize the
    model tensors nothing filled."""
    tensors = state_tensors(model)
    specs = reader.specs()
    names = match_names(model, [s.name for s in specs], tensors)
    for spec in specs:
        target = names.get(spec.name)
        if target is None:
            info.unused.append(spec.name)
            continue
        dest = tensors[target]
        if tuple(dest.shape) != tuple(spec.shape):
            raise BaseMismatchError(f"{info.name}: tensor {spec.name!r} has shape "
                                    f"{list(spec.shape)} but {type(model).__name__} has "
                                    f"{list(dest.shape)} for {target!r}")
        value = (reader.load(spec.name, device=device) if isinstance(reader, StoredModel)
                 else reader.load(spec.name))
        with torch.no_grad():
            dest.copy_(value)
    filled = {tensors[n].data_ptr() for n in names.values() if tensors[n].numel()}
    missing = [n for n, t in tensors.items() if isinstance(t, torch.nn.Parameter)
               and n not in names.values() and not (t.numel() and t.data_ptr() in filled)]
    if missing:
        _init_missing(model, missing)
        info.missing = missing
        warnings.warn(f"{info.name}: {len(missing)} parameters of {type(model).__name__} are not "
                      f"in the checkpoint and were initialized: {', '.join(missing[:5])}"
                      f"{' ...' if len(missing) > 5 else ''}", stacklevel=3)


def _init_missing(model: torch.nn.Module, missing: list[str]) -> None:
    """Initialize the ``missing`` parameters with the model's own ``_init_weights`` of their
    modules, keeping the loaded tensors of those modules as they are. (Buffers need nothing:
    the model computed them when it was built.)"""
    owners = {n.rsplit(".", 1)[0] for n in missing}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if module_name not in owners or not hasattr(model, "_init_weights"):
                continue
            keep = {n: t.detach().clone() for n, t in module.named_parameters(recurse=False)
                    if f"{module_name}.{n}" not in missing}
            model._init_weights(module)
            for n, t in keep.items():
                getattr(module, n).copy_(t)


def _load_adapter(name: str, store: Store, device: torch.device, dtype: torch.dtype | None,
                  model_class: type | None) -> Any:
    """A LoRA entry: its base, loaded, with the adapter merged by a Composer."""
    from mergehub.compose import Composer

    base = store.show(name).base
    if base is None:
        raise BaseMismatchError(f"adapter {name!r} has no base in store {store.root}: add it "
                                "with base= to load it merged into its base")
    model = load(base, store, device=device, dtype=dtype, model_class=model_class)
    Composer(model, store, base=base).apply({"merge_method": "task_arithmetic",
                                             "base_model": base, "models": [{"model": name}]})
    model.mergehub_source = LoadInfo(name, store, base, model.mergehub_source.missing,
                                     model.mergehub_source.unused)
    return model
