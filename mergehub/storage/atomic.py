"""Atomic, durable writes: build in a temp path beside the target, fsync, then rename.

A crash or an exception at any point leaves either the old state or the complete new one at the
target path, never a half-written file or directory.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mergehub.errors import InputError, spelled
from mergehub.storage.paths import check_output_dir


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` of ``fd`` to disk now,
    without waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op elsewhere).

    A large file written and then fsynced spends the fsync flushing everything at once; started
    early, the flushing overlaps the rest of the work and the final fsync has little left.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # advisory: errors ignored


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def check_output_target(target: str | Path, overwrite: bool, how: str | None = None) -> None:
    """Raise :class:`InputError` if :func:`atomic_output_dir` would refuse ``target``, so that
    work whose result goes there (training) can be refused before it starts. ``how`` says how
    to allow replacing it as the caller's user spells that (default: ``overwrite=True`` from
    Python, ``--overwrite`` under the CLI)."""
    target = Path(target).absolute()
    replacing = False
    if target.exists():
        if not target.is_dir():
            raise InputError(f"{target}: exists and is not a directory")
        replacing = any(target.iterdir())
    check_output_dir(target, replacing and overwrite)
    if replacing and not overwrite:
        how = how or f"pass {spelled('overwrite=True', '--overwrite')}"
        raise InputError(f"{target}: exists and is not empty ({how} to replace it)")


@contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir to fill; on success it replaces ``target`` in one rename.

    ``target`` must not exist, be an empty directory, or ``overwrite`` must be set (the old
    directory is then moved aside and deleted only after the new one is in place). It must
    not be, lie in, or (when replaced) contain a mergehub store (see
    :func:`~mergehub.storage.paths.check_output_dir`). On any exception the temp dir is removed
    and ``target`` is untouched.
    """
    target = Path(target).absolute()
    check_output_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists() and any(target.iterdir()):
            old = target.with_name(f".{target.name}.old-{tag}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)  # replaces an empty directory atomically
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
