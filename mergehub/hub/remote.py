"""Push store entries to, and pull models from, the Hugging Face Hub (``hub push`` / ``hub pull``).

Built on ``huggingface_hub.HfApi``; the endpoint and the token come the standard way
(``HF_ENDPOINT``, ``HF_TOKEN``, ``hf auth login``), or as arguments. The token is only ever
handed to ``huggingface_hub``: it is never printed, logged, stored in provenance or put in an
error message (messages are also scrubbed of it, in case a server echoes it).

A model goes into a repo in one or more *forms* (see ``docs/hub.md``):

* ``peft``: a PEFT adapter's own files at the repo root (``adapter_config.json``,
  ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained(base, repo_id)``;
* ``hf``: an HF model's own files (safetensors shards and index, config, tokenizer files, and
  every other file at any depth, such as a sentence-transformers model's ``1_Pooling/``), as
  they were added, loadable with ``AutoModel.from_pretrained(repo_id)``;
* ``mergehub``: the entry's own stored blobs under ``mergehub/blobs/<id>`` (a compressed delta
  stays compressed), which ``pull`` puts back into a store that holds the same base without
  decoding anything.

Every push also writes ``mergehub/manifest.json`` (kind, base name and fingerprint, files,
tensors and the sha256 of their bytes, codec, metrics, provenance) and a model card,
``README.md``, in one commit: all files or none. A pull verifies every downloaded file against
the hash the server reports for it (sha256 for LFS files, the git blob id for others) and
against the manifest before anything is added to the store; downloads go to
``STORE/transfers/pull-<repo>--<commit>/`` and an interrupted pull picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from mergehub import __version__
from mergehub.errors import (
    BaseMismatchError, InputError, IntegrityError, RemoteError, StoreError, shown, spelled)
from mergehub.progress import bar_disabled, library_bars
from mergehub.safejson import parse_json, read_json
from mergehub.storage.checkpoint import (
    ADAPTER_CONFIG, OTHER_WEIGHTS, PICKLE_SUFFIXES, not_kept_reason, open_checkpoint,
    split_listing)
from mergehub.storage.codec import sha256
from mergehub.storage.hf_hub import (
    REPO_ID, hub_api, hub_errors, public_endpoint, resolve_revision, split_repo_ref)
from mergehub.storage.parallel import ordered_map
from mergehub.storage.paths import inside, safe_relpath
from mergehub.storage.store import ModelInfo, Store, check_manifest

if TYPE_CHECKING:
    from huggingface_hub import HfApi

FORMS = ("peft", "hf", "mergehub")
MANIFEST = "mergehub/manifest.json"
BLOBS = "mergehub/blobs"
#: Where a push keeps the entry's own files that the model card displaces (its README.md).
SHADOW = "mergehub/files"
CARD = "README.md"
#: Folder of the store for pull downloads and push exports (same disk as the store).
_CHUNK = 1 << 20


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


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` added: the new entry, and where it came from."""

    info: ModelInfo
    repo_id: str
    revision: str
    commit: str
    form: str  # "mergehub", "hf" or "peft"
    downloaded: list[str]


# --- hashing ---------------------------------------------------------------------------------

def _file_digest(path: Path, git_blob: bool = False) -> str:
    """sha256 of a file, or its git blob id (sha1 of ``blob <size>\\0`` + content)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()) if git_blob else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _server_check(local: Path, remote: Any) -> str | None:
    """Why ``local`` does not match the server's ``RepoFile`` ``remote``, or ``None``: the
    sha256 of an LFS file (what its pointer records), else the git blob id."""
    if remote.lfs is not None:
        digest = _file_digest(local)
        if digest != remote.lfs.sha256 or local.stat().st_size != remote.lfs.size:
            return f"sha256 {digest[:16]} but the server reports {remote.lfs.sha256[:16]}"
    elif (digest := _file_digest(local, git_blob=True)) != remote.blob_id:
        return f"git blob id {digest[:16]} but the server reports {remote.blob_id[:16]}"
    return None


# --- push --------------------------------------------------------------------------------------

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


def _auto_class(store: Store, info: ModelInfo) -> str:
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
                if _file_digest(path) != blob_id:
                    raise IntegrityError(f"model {name!r}: blob {blob_id[:16]} is corrupt in "
                                         f"{store.root} (`hub verify`)")
                files[f"{BLOBS}/{blob_id}"] = path
        files[MANIFEST] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        files[CARD] = model_card(info, manifest, forms, base_model, repo_id,
                                 _auto_class(store, info)).encode()
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


# --- pull --------------------------------------------------------------------------------------

def _download(api: "HfApi", repo_id: str, commit: str, remote: dict[str, Any],
              paths: list[str], into: Path, progress: bool | None) -> list[str]:
    """Download ``paths`` of the repo at ``commit`` into ``into`` (same relative paths), a few
    at a time, each checked against the server's hash; returns those fetched. A file already
    there and matching is kept (an interrupted pull resumes); a mismatching download is deleted
    and reported."""
    from huggingface_hub import hf_hub_download

    for path in paths:
        inside(into, path, f"{repo_id}@{commit[:12]}: a file to download")
        if path not in remote:
            raise RemoteError(f"{repo_id}@{commit[:12]}: {path} is missing from the repo "
                              "(listed in the manifest)")
    todo = [p for p in paths if not ((into / p).is_file()
                                     and _server_check(into / p, remote[p]) is None)]

    def fetch(path: str) -> str:
        with hub_errors(api, f"{repo_id}@{commit[:12]}: {path}"):
            hf_hub_download(repo_id, path, revision=commit, local_dir=into,
                            endpoint=api.endpoint, token=api.token)
        problem = _server_check(into / path, remote[path])
        if problem:
            (into / path).unlink()
            raise IntegrityError(f"{repo_id}@{commit[:12]}: {path}: downloaded bytes have "
                                 f"{problem} (corrupted in transit or on the server)")
        return path

    # one bar for the whole pull instead of one per file
    with library_bars(False), tqdm(total=sum(remote[p].size for p in todo), unit="B",
                                   unit_scale=True, desc=f"pull {repo_id}",
                                   disable=bar_disabled(progress), leave=False) as bar:
        for path in ordered_map(fetch, todo, workers=8):
            bar.update(remote[path].size)
    return todo


def _find_base(store: Store, want: dict[str, Any] | None, base: str | None) -> str | None:
    """The store model with the manifest's base fingerprint: ``base`` if given (checked), else
    one found by fingerprint (preferring the same name), else ``None``."""
    if want is None:
        return base
    if base is not None:
        got = store.fingerprint(base)
        if got != want["fingerprint"]:
            raise BaseMismatchError(
                f"{want['name']!r} (fingerprint {want['fingerprint'][:16]}) is the base this "
                f"model needs, but {base!r} has other tensors (fingerprint {got[:16]})")
        return base
    matches = store.find_fingerprint(want["fingerprint"])
    return (want["name"] if want["name"] in matches else matches[0]) if matches else None


def _missing_base(repo_id: str, manifest: dict[str, Any], store: Store) -> BaseMismatchError:
    want = manifest["base"]
    hub = (want.get("hub") or {}).get("repo_id")
    hint = spelled(f"pull(store, {hub!r})", f"`hub pull {hub}`") if hub else "add that base"
    return BaseMismatchError(
        f"{repo_id}: {manifest['name']!r} is stored as a delta against base {want['name']!r} "
        f"({want['tensors']} tensors, fingerprint {want['fingerprint'][:16]}), which no model in "
        f"store {store.root} matches: {hint} first, or pass "
        f"{spelled('base=NAME', '--base NAME')}")


def _peft_base(store: Store, model_dir: Path) -> str | None:
    """The stored model a plain PEFT adapter's ``base_model_name_or_path`` names: an entry of
    that name, or one that came from there (:meth:`Store.origin`: pulled from that Hub repo,
    or added from that folder)."""
    try:
        config = read_json(model_dir / ADAPTER_CONFIG)
    except InputError:
        return None
    named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(named, str) or not named:
        return None
    if named in store:
        return named
    for info in store.ls():
        if store.origin(info.name) == named:
            return info.name
    return None


def _check_free(store: Store, name: str) -> None:
    """Refuse a taken name before downloading anything."""
    if name in store:
        raise StoreError(f"a model named {name!r} already exists in store {store.root} "
                         f"(pass {spelled('name=', '--name')}, or remove it first)")


def _read_manifest(path: Path, what: str) -> dict[str, Any]:
    """The pulled manifest at ``path``, checked (:func:`~mergehub.storage.store.check_manifest`
    and the push fields ``forms`` and ``shadowed``) before anything uses it: a malformed one
    is one :class:`IntegrityError` ``"{what}: FIELD: problem"`` (``what`` names the repo)."""
    manifest = parse_json(path.read_bytes(), what)
    check_manifest(manifest, what)
    forms = manifest.setdefault("forms", [])
    if not isinstance(forms, list) or any(f not in FORMS for f in forms):
        raise IntegrityError(f"{what}: forms: {shown(forms)} is not a list of "
                             f"{', '.join(FORMS)}")
    shadowed = manifest.setdefault("shadowed", {})
    if not isinstance(shadowed, dict):
        raise IntegrityError(f"{what}: shadowed: not a JSON object")
    files = {f[0] for f in manifest["files"]}
    for file, source in shadowed.items():
        safe_relpath(file, f"{what}: shadowed")
        safe_relpath(source, f"{what}: shadowed[{shown(file)}]")
        if file not in files:
            raise IntegrityError(f"{what}: shadowed: {shown(file)} is not a file of the "
                                 "manifest")
    return manifest


def _model_folder(staging: Path, files: dict[str, str], repo_id: str) -> Path:
    """The folder ``hub add`` reads a pulled model from: each model path of ``files`` holds
    the downloaded file (a path under ``staging``) it maps to, hard-linked (copied where links
    fail), and nothing else: not the manifest, the model card a push wrote, nor the download
    tool's data."""
    folder = staging / ".mergehub-model"
    if folder.exists():
        shutil.rmtree(folder)
    for rel, downloaded in files.items():
        source = inside(staging, downloaded, repo_id)
        target = inside(folder, rel, f"{repo_id}: a model file")
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return folder


def _check_dense(model_dir: Path, manifest: dict[str, Any], repo_id: str) -> None:
    """Check the downloaded files against the manifest: every tensor's bytes and every side
    file's content hash to what the pushing store recorded."""
    raw = {**{k: v["raw_sha256"] for k, v in manifest["blobs"].items()}, **manifest["external"]}
    with open_checkpoint(model_dir) as ckpt:
        for tname, file, _, _, _, blob in manifest["tensors"]:
            if tname not in ckpt.tensors or sha256(ckpt.read_bytes(tname)) != raw[blob]:
                raise IntegrityError(f"{repo_id}: tensor {tname!r} in {file} does not match "
                                     "the manifest's sha256")
        for path, role, blob in manifest["files"]:
            data = (ckpt.headers[path].raw if role == "weights"
                    else (model_dir / path).read_bytes())
            if sha256(data) != raw[blob]:
                raise IntegrityError(f"{repo_id}: {path} does not match the manifest's sha256")


def pull(store: Store, repo_id: str, *, revision: str | None = None, name: str | None = None,
         subfolder: str | None = None, base: str | None = None, token: str | None = None,
         endpoint: str | None = None, progress: bool | None = None) -> PullResult:
    """Add the model in Hub repo ``repo_id`` (``ORG/NAME`` or ``ORG/NAME@REVISION``) to
    ``store``.

    A repo pushed by mergehub is restored from its manifest: the ``mergehub`` form (blobs,
    never decoded) when present, else the hf/peft files, checked tensor by tensor against the
    manifest; its base is the store model with the base fingerprint the manifest records.
    Any other PEFT adapter or HF model repo (safetensors) is added like ``hub add`` would.

    Args:
        revision: branch, tag or commit sha, the same as ``repo_id``'s ``@REVISION`` (given
            both ways, they must agree); default ``main``.
        name: name of the new entry (default: the pushed entry's name, else the repo's name).
        subfolder: the model is in this folder of the repo.
        base: stored model to use as the base (checked against the manifest's fingerprint); by
            default found by fingerprint, or for a plain PEFT adapter by its
            ``base_model_name_or_path`` (an entry of that name, or pulled from that repo).
        token, endpoint: override ``HF_TOKEN`` / the saved login and ``HF_ENDPOINT``.
    """
    from huggingface_hub.hf_api import RepoFile

    repo_id, revision = split_repo_ref(repo_id, revision)
    api = hub_api(endpoint, token)
    revision, commit = resolve_revision(api, repo_id, revision)
    folder = subfolder.strip("/") if subfolder else ""
    prefix = f"{folder}/" if folder else ""
    with hub_errors(api, f"{repo_id}@{revision}" + (f": folder {folder!r}" if folder else "")):
        remote = {f.path: f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True,
                                                       path_in_repo=folder or None)
                  if isinstance(f, RepoFile)}
    if not remote:
        raise RemoteError(f"{repo_id}@{revision}: no files" + (f" under {folder!r}" if folder
                                                               else ""))
    slug = "--".join([repo_id.replace("/", "--"), commit, *([folder.replace("/", "--")]
                                                            if folder else [])])
    hub = {"repo_id": repo_id, "revision": revision, "commit": commit,
           "endpoint": public_endpoint(api), **({"subfolder": folder} if folder else {})}
    #: where it came from, instead of the transfer folder `store.add` would record as source
    origin = {"source": f"{hub['endpoint']}/{repo_id}@{commit}" + (f"/{folder}" if folder else ""),
              "hub": hub}
    fetched: list[str] = []
    with store.transfer(f"pull-{slug}") as staging:

        def get(paths: list[str]) -> None:
            fetched.extend(_download(api, repo_id, commit, remote, paths, staging, progress))

        if prefix + MANIFEST in remote:
            get([prefix + MANIFEST])
            manifest = _read_manifest(staging / prefix / MANIFEST, f"{repo_id}: {prefix}{MANIFEST}")
            name = name or manifest["name"]
            _check_free(store, name)
            base_name = _find_base(store, manifest["base"], base)
            if "mergehub" in manifest["forms"]:
                if manifest["base"] is not None and base_name is None:
                    raise _missing_base(repo_id, manifest, store)
                blobs = {f"{prefix}{BLOBS}/{b}": meta for b, meta in manifest["blobs"].items()}
                for path, meta in blobs.items():  # before downloading: a blob cannot be larger
                    if path in remote and remote[path].size != meta["size"]:
                        raise IntegrityError(f"{repo_id}: {path}: is {remote[path].size} bytes "
                                             f"on the server, the manifest says {meta['size']}")
                get(list(blobs))
                info = store.import_entry(manifest, staging / prefix / BLOBS, name, base=base_name,
                                          provenance=origin, progress=progress)
                form = "mergehub"
            else:
                where = {p: prefix + manifest["shadowed"].get(p, p) for p, _, _ in manifest["files"]}
                get(list(where.values()))
                model_dir = _model_folder(staging, where, repo_id)
                _check_dense(model_dir, manifest, repo_id)
                info = store.add(model_dir, name, base=base_name, kind=manifest["kind"],
                                 metrics=manifest["metrics"],
                                 provenance={**manifest["provenance"], **origin}, progress=progress)
                form = manifest["format"]
        else:
            rels = sorted(p[len(prefix):] for p in remote if p.startswith(prefix))
            top = [r for r in rels if "/" not in r]
            if not any(r.endswith(".safetensors") for r in top):
                pickles = [prefix + r for r in top if r.lower().endswith(PICKLE_SUFFIXES)]
                raise RemoteError(f"{repo_id}@{revision}: no safetensors weights" + (
                    f" ({pickles[0]} is a pickle checkpoint, which mergehub refuses to load: it "
                    "can run arbitrary code)" if pickles
                    else (f" under {folder!r}" if folder else "")))
            name = name or repo_id.split("/")[-1] + (f"-{folder.replace('/', '-')}" if folder
                                                     else "")
            _check_free(store, name)
            kept, skipped = split_listing(rels, lambda rel: not_kept_reason(rel) or (
                "weights in another format: not downloaded"
                if rel.lower().endswith(OTHER_WEIGHTS) else None))
            wanted = {r: prefix + r for r in kept}
            get(list(wanted.values()))
            model_dir = _model_folder(staging, wanted, repo_id)
            form = "peft" if ADAPTER_CONFIG in top else "hf"
            if base is None and form == "peft":
                base = _peft_base(store, model_dir)
            info = store.add(model_dir, name, base=base, progress=progress, provenance={
                **origin, **({"not_kept": skipped} if skipped else {})})
        shutil.rmtree(staging, ignore_errors=True)
    return PullResult(info, repo_id, revision, commit, form, fetched)
