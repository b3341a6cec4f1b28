"""``hub push``: a store entry to a Hub repo, in its forms, in one commit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergehub.errors import IntegrityError, RemoteError
from mergehub.hub.remote.card import auto_class, model_card
from mergehub.hub.remote.repo import BLOBS, CARD, FORMS, MANIFEST, SHADOW, file_digest
from mergehub.progress import library_bars
from mergehub.storage.checkpoint import ADAPTER_CONFIG
from mergehub.storage.hf_hub import REPO_ID, hub_api, hub_errors, split_repo_ref
from mergehub.storage.store import ModelInfo, Store, check_manifest


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` committed."""

    repo_id: str
    revision: str
    commit: str
    url: str
    forms: list[str]
    files: list[str]
    bytes: int


def _forms(info: ModelInfo, fmt: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The forms to push: as asked, else peft for an adapter, hf + mergehub for a compressed
    entry, hf otherwise."""
    if not fmt:
        if info.format == "peft":
            return ["peft"]
        return ["hf", "mergehub"] if "codec" in info.provenance else ["hf"]
    forms = [fmt] if isinstance(fmt, str) else list(dict.fromkeys(fmt))
    for form in forms:
        if form not in FORMS:
            raise RemoteError(f"unknown format {form!r} (one of {', '.join(FORMS)})")
    if "peft" in forms and info.format != "peft":
        raise RemoteError(f"{info.name!r} is not a PEFT adapter ({info.kind}, {info.format}): "
                          "push it as hf or mergehub")
    if "hf" in forms and info.format == "peft":
        raise RemoteError(f"{info.name!r} is a PEFT adapter: push it as peft or mergehub")
    return forms


def _hub_repo_of(store: Store, info: ModelInfo) -> str | None:
    """The Hub repo id of ``info``'s base, when known (pulled from the Hub, or named by an
    adapter's ``base_model_name_or_path``)."""
    if info.base is not None:
        hub = store.show(info.base).provenance.get("hub") or {}
        if hub.get("repo_id"):
            return hub["repo_id"]
    named = info.provenance.get("base_model_name_or_path")
    return named if isinstance(named, str) and REPO_ID.match(named) else None


def _owned(path: str, prefix: str) -> bool:
    """Files a push into ``prefix`` ("" or "folder/") replaces: left over from an earlier push
    there, they are deleted in the commit. Files of other folders are not."""
    if not path.startswith(prefix):
        return False
    rel = path[len(prefix):]
    return rel.startswith("mergehub/") or "/" not in rel and (
        rel == ADAPTER_CONFIG or rel.endswith((".safetensors", ".safetensors.index.json")))


def push(store: Store, name: str, repo_id: str, *, revision: str | None = None,
         private: bool = False, fmt: str | list[str] | tuple[str, ...] | None = None,
         base_model: str | None = None, message: str | None = None,
         subfolder: str | None = None, token: str | None = None, endpoint: str | None = None,
         progress: bool | None = None) -> PushResult:
    """Push store entry ``name`` to the Hub repo ``repo_id`` in one commit.

    Args:
        revision: branch to commit to (created from ``main`` if missing); default ``main``.
        private: create the repo private (no effect on an existing repo).
        fmt: ``"peft"``, ``"hf"``, ``"mergehub"`` or a list of them (see the module
            docstring); default: peft for an adapter, hf + mergehub for a compressed entry,
            else hf.
        base_model: Hub repo id of the base for the card's ``base_model``; default: the repo
            the base was pulled from, or an adapter's ``base_model_name_or_path`` if it is one.
        message: commit message.
        subfolder: push into this folder of the repo (its own card and manifest; pulled back
            with ``pull(..., subfolder=...)``), leaving the rest of the repo as it is.
        token, endpoint: override ``HF_TOKEN`` / the saved login and ``HF_ENDPOINT``.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    repo_id, revision = split_repo_ref(repo_id, revision)
    info = store.show(name)
    forms = _forms(info, fmt)
    manifest = store.entry_manifest(name)
    manifest["forms"] = forms
    # the path it was added from means nothing elsewhere (and names the pusher's folders)
    manifest["provenance"].pop("source", None)
    base_model = base_model or _hub_repo_of(store, info)
    if manifest["base"] is not None and base_model:
        manifest["base"]["hub"] = {**(manifest["base"]["hub"] or {}), "repo_id": base_model}
    check_manifest(manifest, f"push {name!r}: the entry's manifest")
    api = hub_api(endpoint, token)
    branch = revision or "main"
    folder = (subfolder or "").strip("/")
    if folder and any(part in ("", ".", "..") for part in folder.split("/")):
        raise RemoteError(f"push {name!r}: bad subfolder {subfolder!r}")
    prefix = f"{folder}/" if folder else ""
    with store.work_folder("push") as tmp:
        files: dict[str, Path | bytes] = {}
        if "hf" in forms or "peft" in forms:
            out = store.export(name, Path(tmp) / "model", progress=progress)
            for p in sorted(q for q in out.rglob("*") if q.is_file()):
                rel = p.relative_to(out).as_posix()
                files[f"{SHADOW}/{rel}" if rel == CARD else rel] = p
            if (out / CARD).exists():
                manifest["shadowed"] = {CARD: f"{SHADOW}/{CARD}"}
        if "mergehub" in forms:
            for blob_id in manifest["blobs"]:
                path = store.blob_path(blob_id)
                if file_digest(path) != blob_id:
                    raise IntegrityError(f"model {name!r}: blob {blob_id[:16]} is corrupt in "
                                         f"{store.root} (`hub verify`)")
                files[f"{BLOBS}/{blob_id}"] = path
        files[MANIFEST] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        files[CARD] = model_card(info, manifest, forms, base_model, repo_id,
                                 auto_class(store, info)).encode()
        size = sum(len(s) if isinstance(s, bytes) else s.stat().st_size for s in files.values())
        what = f"push {name!r} to {repo_id}@{branch}" + (f" (folder {folder!r})" if folder else "")
        with hub_errors(api, what, writing=True), library_bars(progress):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                branches = {b.name for b in api.list_repo_refs(repo_id).branches}
                if branch not in branches:
                    api.create_branch(repo_id, branch=branch, exist_ok=True)
            stale = [p for p in api.list_repo_files(repo_id, revision=branch)
                     if _owned(p, prefix) and p[len(prefix):] not in files]
            ops = [CommitOperationAdd(path_in_repo=prefix + p, path_or_fileobj=src if isinstance(
                src, bytes) else str(src)) for p, src in files.items()]
            ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
            commit = api.create_commit(
                repo_id, ops, revision=branch,
                commit_message=message or f"mergehub: push {name} ({' + '.join(forms)})")
    return PushResult(repo_id, branch, commit.oid, commit.commit_url, forms,
                      sorted(prefix + p for p in files), size)
