"""Merge inputs that live on the Hugging Face Hub: ``hf://org/name[@revision]`` in a recipe, or
``org/name[@revision]`` when that is neither a local path nor a store name.

To plan a merge only headers are read: the repo's file list at one commit (the revision is
resolved once, so every machine of a Ray merge reads the same files), the index json, the
adapter config, and each weight file's safetensors header through an HTTP range request (the
first 100 kB, and the rest of a longer header), checked by the same parser as a local file's.
A weight file is downloaded only when a tensor in it is first read, by ``huggingface_hub``
(``hf_hub_download``: its cache, shared by every process of the machine, and its resume of an
interrupted download), and checked against the listed size and the header the plan was made
from. So a merge fetches only the shard files that hold tensors it reads, and each task of a
Ray merge only those of its own tensors. The repo is a model folder as a local one is
(:func:`~mergehub.storage.checkpoint.open_listing`): its files at any depth are side files, but
pickles and tools' data (:func:`~mergehub.storage.checkpoint.split_listing`), named in
``not_kept``; the side files a merge output carries are downloaded by the driver when it writes
them. Each machine uses its own Hugging Face login
(``HF_TOKEN`` or ``hf auth login``) and cache (``HF_HOME``); the endpoint (``HF_ENDPOINT``) is
the driver's, recorded with the input.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from mergehub.errors import InputError
from mergehub.safejson import parse_json
from mergehub.storage.checkpoint import Checkpoint, Format, open_listing, split_listing
from mergehub.storage.hf_hub import hub_api, hub_errors, resolve_revision, split_repo_ref
from mergehub.storage.safetensors_format import SafetensorsHeader, parse_header

#: how a recipe names a Hub repo explicitly
HF_PREFIX = "hf://"
#: bytes asked for first: the whole header of nearly every safetensors file
HEADER_PROBE = 100_000
_REPO_REF = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def hub_ref(ref: str) -> bool:
    """Whether a recipe's model reference can name a Hub repo: ``hf://...``, or
    ``org/name[@revision]`` (asked of the Hub only when it is no local path or store name)."""
    return ref.startswith(HF_PREFIX) or bool(_REPO_REF.fullmatch(ref))


class HubCheckpoint(Checkpoint):
    """A checkpoint in a Hub repo at one commit: headers read over HTTP, each weight file
    downloaded into the Hugging Face cache when first read (see the module docstring).
    :attr:`root` is ``org/name@revision`` (for messages; nothing is read through it)."""

    def __init__(self, repo_id: str, revision: str, commit: str, endpoint: str,
                 sizes: dict[str, int], format: Format, weight_files: list[str],
                 side_files: list[str], adapter_config: dict[str, Any] | None = None,
                 not_kept: dict[str, str] | None = None):
        self.repo_id = repo_id
        self.commit = commit
        self.endpoint = endpoint
        self.sizes = sizes
        self._local: dict[str, Path] = {}
        label = PurePosixPath(f"{repo_id}@{revision}")
        super().__init__(label, format, label, weight_files, side_files,  # type: ignore[arg-type]
                         adapter_config, not_kept)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to a Ray task) without this machine's download paths."""
        return {**super().__getstate__(), "_local": {}}

    def _url(self, rel: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, rel, revision=self.commit, endpoint=self.endpoint)

    def _read_header(self, rel: str) -> SafetensorsHeader:
        where = f"{self.root / rel}"
        url = self._url(rel)
        first = _get_range(self.endpoint, url, 0, min(HEADER_PROBE, self.sizes[rel]), where)

        def read(offset: int, n: int) -> bytes:
            if offset + n <= len(first):
                return first[offset:offset + n]
            return _get_range(self.endpoint, url, offset, n, where)

        return parse_header(where, self.sizes[rel], read)

    def local_file(self, rel: str) -> Path:
        """Download file ``rel`` of the repo at :attr:`commit` into the Hugging Face cache
        (once; a later call, or another process, finds it there) and return its path. A weight
        file must have the listed size and the header that was read to plan."""
        path = self._local.get(rel)
        if path is not None:
            return path
        from huggingface_hub import hf_hub_download

        where = f"{self.root / rel}"
        with endpoint_errors(self.endpoint, where):
            path = Path(hf_hub_download(self.repo_id, rel, revision=self.commit,
                                        endpoint=self.endpoint))
        header = self.headers.get(rel)
        if header is not None:
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw = f.read(len(header.raw))
            if size != self.sizes[rel] or raw != header.raw:
                raise InputError(f"{where}: the downloaded file ({path}) is not the one whose "
                                 f"header was read ({size} bytes, {self.sizes[rel]} listed): "
                                 "a damaged download or cache; delete it and retry")
        self._local[rel] = path
        return path


def endpoint_errors(endpoint: str, what: str) -> Any:
    """``huggingface_hub`` errors as one-line :class:`RemoteError`\\ s (as ``hub pull``'s)."""
    return hub_errors(hub_api(endpoint, None), what)


def _get_range(endpoint: str, url: str, offset: int, n: int, where: str) -> bytes:
    """Bytes [offset, offset + n) of the file at ``url`` (an HTTP range request with this
    machine's Hub token); never more than ``n`` bytes are read, whatever the server sends."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(), "Range": f"bytes={offset}-{offset + n - 1}"}
    session = get_session()
    out = bytearray()
    with endpoint_errors(endpoint, where):
        if callable(getattr(session, "stream", None)):  # httpx (huggingface_hub >= 1.0)
            with session.stream("GET", url, headers=headers, follow_redirects=True) as response:
                hf_raise_for_status(response)
                _take(response.iter_bytes(), response.status_code, offset, n, out)
        else:  # requests
            with session.get(url, headers=headers, stream=True) as response:
                hf_raise_for_status(response)
                _take(response.iter_content(1 << 16), response.status_code, offset, n, out)
    if len(out) < n:
        raise InputError(f"{where}: the server sent {len(out)} of bytes {offset}-"
                         f"{offset + n - 1} (truncated file?)")
    return bytes(out)


def _take(pieces: Any, status: int, offset: int, n: int, out: bytearray) -> None:
    """Fill ``out`` with bytes [offset, offset + n) from a response body: a 206 answer starts
    at ``offset``, a 200 one (range ignored) at 0."""
    skip = 0 if status == 206 else offset
    for piece in pieces:
        if skip:
            cut = min(skip, len(piece))
            piece, skip = piece[cut:], skip - cut
        out += piece[:n - len(out)]
        if len(out) >= n:
            return


def open_hub_input(ref: str, where: str) -> HubCheckpoint:
    """Open the Hub repo ``ref`` names (``hf://org/name[@revision]`` or ``org/name[@revision]``)
    as a checkpoint, reading headers only; a :class:`RemoteError` naming ``where`` when the
    repo, the revision or its weights are not there."""
    from huggingface_hub.hf_api import RepoFile


    repo_id, revision = split_repo_ref(ref.removeprefix(HF_PREFIX))
    api = hub_api(None, None)
    revision, commit = resolve_revision(api, repo_id, revision)
    label = f"{repo_id}@{revision}"
    with hub_errors(api, label):
        listing = {f.path: f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                   if isinstance(f, RepoFile)}
    tree, not_kept = split_listing(list(listing))
    sizes = {p: int(f.size) for p, f in listing.items()}

    def read(name: str) -> Any:
        with hub_errors(api, f"{label}/{name}"):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id, name, revision=commit, endpoint=api.endpoint)
        return parse_json(Path(path).read_bytes(), f"{label}/{name}")

    try:
        return open_listing(label, tree, not_kept, read,
                            lambda fmt, weights, side, config: HubCheckpoint(
                                repo_id, revision, commit, api.endpoint, sizes, fmt, weights,
                                side, config, not_kept))
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
