"""Where a push puts things in a repo (the manifest, the blobs, the files a model card
displaces) and how a file is checked against the hash the server reports for it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

FORMS = ("peft", "hf", "mergehub")
MANIFEST = "mergehub/manifest.json"
BLOBS = "mergehub/blobs"
#: Where a push keeps the entry's own files that the model card displaces (its README.md).
SHADOW = "mergehub/files"
CARD = "README.md"
#: files are hashed in reads of this many bytes
_CHUNK = 1 << 20


def file_digest(path: Path, git_blob: bool = False) -> str:
    """sha256 of a file, or its git blob id (sha1 of ``blob <size>\\0`` + content)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()) if git_blob else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def server_check(local: Path, remote: Any) -> str | None:
    """Why ``local`` does not match the server's ``RepoFile`` ``remote``, or ``None``: the
    sha256 of an LFS file (what its pointer records), else the git blob id."""
    if remote.lfs is not None:
        digest = file_digest(local)
        if digest != remote.lfs.sha256 or local.stat().st_size != remote.lfs.size:
            return f"sha256 {digest[:16]} but the server reports {remote.lfs.sha256[:16]}"
    elif (digest := file_digest(local, git_blob=True)) != remote.blob_id:
        return f"git blob id {digest[:16]} but the server reports {remote.blob_id[:16]}"
    return None
