"""Where mergehub may write: file paths that come from stored or downloaded data, output
directories, and symlinks in model folders (see docs/hub.md, "What hub refuses, and why").

File paths in a store's catalog and in a pulled repo's manifest are chosen by whoever wrote
them. Joined to a directory unchecked, ``../../.bashrc`` or ``/home/me/.bashrc`` would write
outside it, so every such path goes through :func:`safe_relpath` (a plain relative POSIX path)
and every write through :func:`inside` (still inside the directory once symlinks are resolved).
An output directory replaced with ``--overwrite`` must not be, hold or lie in a store
(:func:`check_output_dir`), and a model folder's symlinks must stay in it
(:func:`check_links`).
"""

from __future__ import annotations

import os
from pathlib import Path

from mergehub.errors import InputError, IntegrityError, shown

#: the file that marks a directory as a mergehub store
MARKER = "mergehub-store.json"
#: work folders (``Store.transfer``, ``Store.work_folder``: pull downloads, push exports,
#: merges to the store), under a store
TRANSFERS = "transfers"
#: the store's own work folders, where its commands write temporary outputs (merges to the
#: store, push exports, pull downloads): the only output directories allowed inside a store
WORK_DIRS = ("tmp", TRANSFERS)


def safe_relpath(path: object, what: str) -> str:
    """``path`` if it names a file by a relative POSIX path that stays where it is joined:
    a non-empty string of ``/``-separated parts, none empty, ``.`` or ``..``, without a
    backslash or NUL. Else :class:`IntegrityError` ``"{what}: ... is not a safe relative
    path (why)"``: such a path only comes from a damaged catalog or a hostile manifest."""
    problem = None
    if not isinstance(path, str):
        problem = f"a {type(path).__name__}, not a string"
    elif not path:
        problem = "empty"
    elif "\0" in path:
        problem = "has a NUL character"
    elif "\\" in path:
        problem = "has a backslash"
    elif path.startswith("/"):
        problem = "absolute"
    elif any(part in ("", ".", "..") for part in path.split("/")):
        problem = "has an empty, '.' or '..' part"
    if problem:
        raise IntegrityError(f"{what}: {shown(path)} is not a safe relative path ({problem})")
    return path


def is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it once both are resolved (symlinks
    followed, ``..`` collapsed)."""
    return path.resolve().is_relative_to(folder.resolve())


def inside(folder: Path, path: object, what: str) -> Path:
    """``folder / path`` for a :func:`safe_relpath` ``path`` that, resolved, stays inside
    ``folder`` (a symlink already there cannot lead the write out); parent folders are
    created."""
    target = folder / safe_relpath(path, what)
    if not is_within(target, folder):
        raise IntegrityError(f"{what}: {shown(path)} leads outside {folder}")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def check_output_dir(target: Path, replacing: bool) -> None:
    """Refuse an output directory that is a mergehub store, lies inside one (outside its
    work folders) or, when it would be replaced (``replacing``), contains one: writing
    there would delete or corrupt the store. Raises :class:`InputError`."""
    real = target.resolve()
    for folder in (real, *real.parents):
        if (folder / MARKER).is_file():
            rel = real.relative_to(folder).parts
            if not rel:
                raise InputError(f"{target}: is a mergehub store: an output there would "
                                 "replace it; choose another directory")
            if rel[0] not in WORK_DIRS:
                raise InputError(f"{target}: is inside the mergehub store at {folder}: an "
                                 "output there would overwrite the store's own files; choose "
                                 "a directory outside it")
            break
    if replacing and real.is_dir():
        for dirpath, _dirs, files in os.walk(real):
            if MARKER in files:
                raise InputError(f"{target}: contains the mergehub store at {dirpath}: "
                                 "replacing it would delete the store; choose another "
                                 "directory")


def check_links(folder: Path, names: list[str]) -> None:
    """Refuse files of the model folder ``folder`` that are symlinks leading out of it (a
    ``config.json`` linking to a system file would be stored and pushed). Links inside the
    folder are fine, as are the Hugging Face cache's: a ``snapshots/<revision>/`` folder links
    each file to ``../../blobs/``. Raises :class:`InputError`."""
    real = folder.resolve()
    allowed = [real]
    if real.parent.name == "snapshots":
        allowed.append(real.parent.parent / "blobs")
    for name in names:
        path = folder / name
        if path.is_symlink() and not any(is_within(path, a) for a in allowed):
            raise InputError(f"{path}: a symlink to {path.resolve()}, outside the model "
                             "folder: refused (it would be stored and pushed as the model's "
                             "file); copy the file into the folder if it belongs there")
