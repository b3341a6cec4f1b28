"""``hub demo``: a tiny transformers model, fine-tune-like variants and a LoRA, stored, exported,
merged and compressed; then a LoRA trained on a synthetic task into the store.

The builders here are also what the tests use to make real checkpoints (no downloads).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from mergehub.progress import library_bars

TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def make_tiny_llama(out: str | Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                    max_shard_size: str | None = None) -> Path:
    """Save a randomly initialized tiny Llama (``save_pretrained``, safetensors) to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    with library_bars(False):
        model.save_pretrained(out, **kwargs)
    return Path(out)


def make_finetune(base: str | Path, out: str | Path, *, pattern: str, scale: float = 0.05, seed: int = 1,
                  max_shard_size: str | None = None) -> Path:
    """Copy of the model at ``base`` whose tensors with ``pattern`` in their name are perturbed.

    The perturbation is ``scale * std(W) * N(0, 1)`` per tensor, like a short full fine-tune;
    the other tensors stay bit-identical to the base.
    """
    from transformers import AutoModelForCausalLM

    with library_bars(False):
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if pattern in name:
                noise = torch.randn(param.shape, generator=gen) * param.float().std() * scale
                param.copy_((param.float() + noise).to(param.dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    with library_bars(False):
        model.save_pretrained(out, **kwargs)
    return Path(out)


def make_lora(base: str | Path, out: str | Path, *, rank: int = 4, seed: int = 2,
              target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A PEFT LoRA adapter dir for the model at ``base`` (random, non-zero A and B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with library_bars(False):
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules),
                            init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(out)
    return Path(out)


def dir_digests(path: Path) -> dict[str, str]:
    """sha256 of every file in a directory, at any depth, by relative POSIX path (a file at
    the top by its name): what "bit for bit" is checked against."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_demo(keep: Path | None = None, echo: Callable[[str], None] = print) -> None:
    """Build the demo models, store them against the base, show savings, export and check."""
    from mergehub.units import human_bytes
    from mergehub.storage.store import Store

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft/transformers deprecations
    work = Path(tempfile.mkdtemp(prefix="mergehub-demo-")) if keep is None else keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        models = work / "models"
        echo(f"building a tiny Llama, two fine-tune-like variants and a LoRA in {models}")
        base = make_tiny_llama(models / "base")
        inputs = {
            "base": (base, None),
            "ft-mlp": (make_finetune(base, models / "ft-mlp", pattern="mlp"), "base"),
            "ft-attn-sharded": (make_finetune(base, models / "ft-attn", pattern="self_attn",
                                              seed=3, max_shard_size="200KB"), "base"),
            "lora-qv": (make_lora(base, models / "lora-qv"), "base"),
        }
        with Store.init(work / "store") as store:
            echo(f"store: {store.root}")
            for name, (path, base_name) in inputs.items():
                store.add(path, name, base=base_name, progress=False)
            infos = store.ls()
            for info in infos:
                echo(f"  {info.name:16s} {info.kind:9s} base={info.base or '-':5s} "
                     f"{info.tensors:3d} tensors  {human_bytes(info.logical_bytes):>9s} logical  "
                     f"{human_bytes(info.stored_bytes):>9s} on disk  ({info.saving:.1%} saved)")
            logical = sum(i.logical_bytes for i in infos)
            stored = store.disk_bytes()
            echo(f"  all {len(infos)} models: {human_bytes(logical)} as files, "
                 f"{human_bytes(stored)} in the store ({logical / stored:.2f}x smaller)")
            for name, (path, _) in inputs.items():
                out = store.export(name, work / "exports" / name, progress=False)
                same = dir_digests(out) == dir_digests(path)
                echo(f"  export {name:16s} -> {'bit-exact' if same else 'DIFFERENT'}")
                if not same:
                    raise SystemExit(f"demo failed: export of {name} differs from its input")
            recipe = work / "ties.yaml"
            recipe.write_text("merge_method: ties\nbase_model: base\nmodels:\n"
                              "  - model: ft-mlp\n    parameters: {weight: 1.0, density: 0.3}\n"
                              "  - model: ft-attn-sharded\n    parameters: {weight: 1.0, density: 0.3}\n"
                              "  - model: lora-qv\n    parameters: {weight: 0.5, density: 0.3}\n"
                              "parameters: {lambda: 1.0}\n")
            import mergehub

            result = mergehub.merge(recipe, store=store, to_store="ties-merge", progress=False,
                                    echo=lambda text: None)
            merged = store.show("ties-merge")
            echo(f"merge: TIES of ft-mlp, ft-attn-sharded and lora-qv ({recipe}) -> store entry "
                 f"'ties-merge': {result.tensors} tensors in {result.seconds:.2f} s, "
                 f"{human_bytes(merged.stored_bytes)} on disk as a delta against base")
            small = store.compress("ft-mlp", "compeft", {"density": 0.1}, progress=False)
            lossless = store.show("ft-mlp").stored_bytes
            echo(f"compress: ft-mlp with compeft (10% of the delta as sign * alpha * std) -> "
                 f"'{small.name}': {human_bytes(small.stored_bytes)} vs "
                 f"{human_bytes(lossless)} lossless ({lossless / small.stored_bytes:.1f}x smaller)")
            from mergehub.adapters.trainer import train

            trained = train({"base": str(base), "data": {"task": "add1", "eval_examples": 64},
                             "method": "lora", "peft": {"r": 4, "lora_alpha": 8},
                             "steps": 40, "batch_size": 16, "lr": 1e-2,
                             "run_dir": str(work / "train-run"),
                             "output": {"store": "add1-lora", "base": "base"}},
                            store=store, progress=False)
            echo(f"train: a LoRA (r=4, all linear layers) on the synthetic task add1, 40 steps "
                 f"-> adapter entry 'add1-lora': loss {trained.losses[0]:.2f} -> "
                 f"{trained.metrics['loss']:.2f}, {human_bytes(trained.entry.stored_bytes)} "
                 "on disk (hub train CONFIG.yaml does the same from YAML)")
            report = store.verify(progress=False)
            echo(f"verify: {report.blobs} blobs checked, {'OK' if report.ok else report.problems}")
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
