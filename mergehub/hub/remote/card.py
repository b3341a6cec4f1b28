"""The model card (``README.md``) a push writes: the Hub's front matter conventions plus a
``mergehub`` block, and how to load the model."""

from __future__ import annotations

import json
from typing import Any

from mergehub import __version__
from mergehub.errors import InputError
from mergehub.safejson import parse_json
from mergehub.storage.checkpoint import ADAPTER_CONFIG
from mergehub.storage.store import ModelInfo, Store


def auto_class(store: Store, info: ModelInfo) -> str:
    """The transformers Auto class the card's snippet loads the model (or an adapter's base)
    with: the causal-LM one when its config, its base's or an adapter's task type says so, else
    ``AutoModel``."""
    for name in [info.name, *([info.base] if info.base else [])]:
        model = store.open(name)
        for path in ("config.json", ADAPTER_CONFIG):
            if path not in model.side_files:
                continue
            try:
                config = parse_json(model.side_file(path), path)
            except InputError:
                continue
            if not isinstance(config, dict):
                continue
            if (any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])
                    or config.get("task_type") == "CAUSAL_LM"):
                return "AutoModelForCausalLM"
    return "AutoModel"


def model_card(info: ModelInfo, manifest: dict[str, Any], forms: list[str],
               base_model: str | None, repo_id: str, auto_class: str = "AutoModel") -> str:
    """The README.md written on push: YAML front matter after the Hub's model card conventions
    (``base_model``, ``base_model_relation``, ``library_name``, ``tags``) plus a ``mergehub``
    block (entry, base fingerprint, forms, codec and ratio, metrics), then a text body with how
    to load it (with transformers' ``auto_class``), the merge recipe, compression and
    metrics."""
    from huggingface_hub import ModelCard, ModelCardData

    prov = info.provenance
    method, codec = prov.get("merge_method"), prov.get("codec")
    files = {f[0] for f in manifest["files"]}
    library = ("peft" if "peft" in forms else
               "transformers" if "hf" in forms and "config.json" in files else "mergehub")
    tags = ["mergehub"]
    if info.kind == "merged":
        tags += ["merge", *([method] if method else [])]
    if info.format == "peft" and any(".lora_" in t[0] for t in manifest["tensors"]):
        tags.append("lora")
    if codec:
        tags += ["compressed", codec]
    relation = {"adapter": "adapter", "merged": "merge", "finetune": "finetune"}.get(info.kind)
    block: dict[str, Any] = {"name": info.name, "kind": info.kind, "forms": forms,
                             "version": __version__}
    if manifest["base"]:
        block["base"] = {"name": manifest["base"]["name"],
                         "fingerprint": manifest["base"]["fingerprint"]}
    ratio = None
    if codec:
        stats = info.codecs.get(codec, {})
        ratio = stats.get("raw_bytes", 0) / max(1, stats.get("stored_bytes", 0))
        block.update(codec=codec, codec_params=prov.get("codec_params", {}),
                     compression_ratio=round(ratio, 3))
    if info.metrics:
        block["metrics"] = info.metrics
    data = ModelCardData(base_model=base_model, library_name=library, tags=tags,
                         **({"base_model_relation": relation} if base_model and relation else {}),
                         mergehub=block)
    against = f", against base `{manifest['base']['name']}`" if manifest["base"] else ""
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"`{info.name}` ({info.kind}), pushed by mergehub {__version__}{against}.", ""]
    lines += ["## Load it", ""]
    if "peft" in forms:
        base_ref = base_model
        if base_ref is None and manifest["base"]:
            # the base is not on the Hub: the reader exports it from the store that holds it
            base_ref = f"{manifest['base']['name']}-model"
            lines += [f"Its base, `{manifest['base']['name']}`, is not on the Hub: export it "
                      "from a mergehub store that holds it,", "",
                      "```bash", f"hub export {manifest['base']['name']} -o {base_ref}", "```",
                      ""]
        if base_ref is None:
            lines += ["Load it onto the model it was trained on with "
                      f"`PeftModel.from_pretrained(base, {repo_id!r})` (that model is not "
                      "recorded).", ""]
        else:
            lines += ["```python", "from peft import PeftModel",
                      f"from transformers import {auto_class}", "",
                      f"base = {auto_class}.from_pretrained({base_ref!r})",
                      f"model = PeftModel.from_pretrained(base, {repo_id!r})", "```", ""]
    elif "hf" in forms:
        lines += ["```python", f"from transformers import {auto_class}", "",
                  f"model = {auto_class}.from_pretrained({repo_id!r})", "```", ""]
    lines += ["Into a mergehub store (" + (
        "restores the compressed blobs without decoding; needs the base in the store"
        if "mergehub" in forms else "verified against `mergehub/manifest.json`") + "):", "",
              "```bash", f"hub pull {repo_id}", "```", ""]
    if prov.get("recipe"):
        lines += ["## Merge recipe", "", "```yaml", prov["recipe"].rstrip(), "```", ""]
    if codec:
        lines += ["## Compression", "",
                  f"Changed tensors stored with `{codec}` "
                  f"({json.dumps(prov.get('codec_params', {}), sort_keys=True)}): "
                  f"{ratio:.2f}x smaller than their raw bytes."
                  + (" The dense weights here are decoded from it;" if "hf" in forms else "")
                  + (" `mergehub/blobs/` holds the compressed form." if "mergehub" in forms
                     else ""), ""]
    if info.metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in sorted(info.metrics.items())), ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))
