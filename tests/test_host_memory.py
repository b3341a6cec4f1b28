"""mergehub.host_memory: freed buffers are reused, not unmapped and faulted in again (each case in
a fresh interpreter: the setting is process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = """
import resource, sys, threading, torch
from mergehub.host_memory import keep_freed_memory
torch.set_num_threads(1)  # the buffer filled by this thread alone: a clean count
kept = keep_freed_memory()
assert keep_freed_memory() == kept  # once per process, the same answer

def faults_of_buffers(count, size=16 << 20):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(count):  # a small tensor that outlives each buffer: the heap fragments
        x, keep = torch.ones(size), torch.ones(1000)  # float32: every page touched
        del x
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

faults_of_buffers(10)  # the heap settles
counts = [faults_of_buffers(10)]
def on_a_thread():  # as a CPU merge's: 96 MiB buffers, beyond an own arena's 64 MiB heaps
    faults_of_buffers(10, 24 << 20)  # the heap settles (it is the main one: shared)
    counts.append(faults_of_buffers(10, 24 << 20))

worker = threading.Thread(target=on_a_thread)
worker.start()
worker.join()
print(kept, *counts)
"""


def _run(**env: str) -> tuple[bool, int, int]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
                          "GLIBC_TUNABLES", "MERGEHUB_KEEP_FREED_MEMORY")}
    root = str(Path(__file__).resolve().parents[1])
    clean["PYTHONPATH"] = os.pathsep.join([root, clean.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         env={**clean, **env}, check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_a_freed_buffer_is_reused_not_faulted_in_again():
    """With the thresholds raised and one arena, once the heap has settled, ten more 64 MiB
    buffers (16,384 pages of 4 KiB each) reuse freed pages: almost no page faults, also ten
    96 MiB buffers on another thread (at most one of them faulted in again); with malloc left alone (opted out, or malloc settings of
    the user's own in the environment, which win) each is mapped afresh and every page faults
    again (unless transparent huge pages are always on: then few either way)."""
    kept, faults, thread_faults = _run()
    if not kept:
        pytest.skip("not glibc")
    assert faults < 16384, faults  # less than one buffer's pages in all
    # the heap the threads share may grow once more while the ten are measured (one buffer
    # faulted in, in ~3 of 10 fresh interpreters of a clean venv): at most one of ten, against
    # all ten below
    assert thread_faults < 2 * 24576, thread_faults
    for env in ({"MERGEHUB_KEEP_FREED_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                {"MALLOC_ARENA_MAX": "4"}):
        kept, faults, thread_faults = _run(**env)
        assert not kept
        if not _huge_pages_always():
            assert faults > 9 * 16384, (env, faults)
            assert thread_faults > 9 * 24576, (env, thread_faults)
