"""``hub pull``: a model from a Hub repo into a store, every file checked before anything is
added; a repo pushed by mergehub restored from its manifest."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from mergehub.errors import (
    BaseMismatchError, InputError, IntegrityError, RemoteError, StoreError, shown, spelled)
from mergehub.hub.remote.repo import BLOBS, FORMS, MANIFEST, server_check
from mergehub.progress import bar_disabled, library_bars
from mergehub.safejson import parse_json, read_json
from mergehub.storage.checkpoint import (
    ADAPTER_CONFIG, OTHER_WEIGHTS, PICKLE_SUFFIXES, not_kept_reason, open_checkpoint,
    split_listing)
from mergehub.storage.blob_format import sha256
from mergehub.storage.hf_hub import (
    hub_api, hub_errors, public_endpoint, resolve_revision, split_repo_ref)
from mergehub.storage.parallel import ordered_map
from mergehub.storage.paths import inside, safe_relpath
from mergehub.storage.store import ModelInfo, Store, check_manifest

if TYPE_CHECKING:
    from huggingface_hub import HfApi


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` added: the new entry, and where it came from."""

    info: ModelInfo
    repo_id: str
    revision: str
    commit: str
    form: str  # "mergehub", "hf" or "peft"
    downloaded: list[str]


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
                                     and server_check(into / p, remote[p]) is None)]

    def fetch(path: str) -> str:
        with hub_errors(api, f"{repo_id}@{commit[:12]}: {path}"):
            hf_hub_download(repo_id, path, revision=commit, local_dir=into,
                            endpoint=api.endpoint, token=api.token)
        problem = server_check(into / path, remote[path])
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
