"""SIGKILL at any point of ``add`` leaves the store consistent; two writers both succeed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mergehub.hub.demo import dir_digests
from mergehub.storage.safetensors_format import TensorSpec
from mergehub.storage.store import Store
from mergehub.storage.writer import write_model_dir

WORKER = Path(__file__).with_name("store_worker.py")


def _synthetic(out: Path, seed: int, changed_from: Path | None = None, n: int = 48) -> Path:
    """A bf16 model of ``n`` 256x1024 tensors (24 MiB); a fine-tune changes every other one."""
    specs = [TensorSpec(f"layers.{i}.weight", "BF16", (256, 1024)) for i in range(n)]

    def get(spec: TensorSpec) -> torch.Tensor:
        i = int(spec.name.split(".")[1])
        gen = torch.Generator().manual_seed(i)
        w = torch.randn(spec.shape, generator=gen) * 0.02
        if changed_from is not None and i % 2 == 0:
            w += torch.randn(spec.shape, generator=torch.Generator().manual_seed(seed * 1000 + i)) * 1e-3
        return w.to(torch.bfloat16)

    return write_model_dir(out, specs, get, max_shard_size="8MB", progress=False,
                           side_files={"config.json": b'{"model_type": "synthetic"}'})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    base = _synthetic(root / "base", 0)
    return {"base": base, "ft1": _synthetic(root / "ft1", 1, base),
            "ft2": _synthetic(root / "ft2", 2, base), "other": _synthetic(root / "other", 9, base)}


def _spawn(root: Path, path: Path, name: str, base: str = "-", go: str = "-") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(WORKER), str(root), str(path), name, base, go],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _leftovers(root: Path, store: Store) -> int:
    known = {r[0] for r in store._db.execute("SELECT id FROM blobs")}
    orphans = sum(1 for p in (root / "blobs").rglob("*") if p.is_file()
                  and p.parent.name + p.name not in known)
    return orphans + len(list((root / "tmp").iterdir()))


def test_sigkill_during_add_leaves_store_consistent(tmp_path, synthetic):
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add(synthetic["base"], "base", progress=False)
    # time one uninterrupted add of the fine-tune, to spread the kills over its duration
    proc = _spawn(root, synthetic["ft1"], "timing", "base")
    t0 = time.monotonic()
    assert proc.stdout.readline().strip() == "done", proc.stderr.read()
    duration = time.monotonic() - t0
    proc.wait()
    with Store(root) as store:
        store.rm("timing")
        store.gc()

    outcomes = []
    for i, fraction in enumerate([0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.3, 2.0, 4.0]):
        name, source, base = (("ft", synthetic["ft1"], "base") if i % 2 == 0
                              else ("fresh", synthetic["other"], "-"))
        proc = _spawn(root, source, name, base)
        time.sleep(duration * fraction)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with Store(root) as store:
            report = store.verify(progress=False)
            assert report.ok, (fraction, report.problems)
            committed = name in {m.name for m in store.ls()}
            partial = _leftovers(root, store)
            outcomes.append("committed" if committed else "partial" if partial else "clean")
            if not committed:  # the same add succeeds afterwards
                store.add(source, name, base=None if base == "-" else base, progress=False)
            out = store.export(name, tmp_path / f"out{i}", progress=False)
            assert dir_digests(out) == dir_digests(source)
            store.rm(name)
            store.gc()
            assert _leftovers(root, store) == 0 and store.verify(progress=False).ok
    assert "partial" in outcomes, outcomes  # some kill really landed in the middle of an add


def test_two_writers_at_once(tmp_path, synthetic):
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add(synthetic["base"], "base", progress=False)
    go = tmp_path / "go"
    jobs = [("ft1", synthetic["ft1"], "base"), ("ft2", synthetic["ft2"], "base"),
            ("other-a", synthetic["other"], "-"), ("other-b", synthetic["other"], "-")]
    procs = [_spawn(root, path, name, base, str(go)) for name, path, base in jobs]
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip() == "done", err
    with Store(root) as store:
        assert sorted(m.name for m in store.ls()) == ["base", "ft1", "ft2", "other-a", "other-b"]
        assert store.verify(progress=False).ok
        for name, path, _ in jobs:
            out = store.export(name, tmp_path / name, progress=False)
            assert dir_digests(out) == dir_digests(path)
        # the two copies of "other" share every blob
        assert store.show("other-b").stored_bytes == store.show("other-a").stored_bytes
        blobs = {n: {r[0] for r in store._db.execute(
            "SELECT blob FROM tensors t JOIN models m ON m.id = t.model_id WHERE m.name = ?", (n,))}
            for n in ("other-a", "other-b")}
        assert blobs["other-a"] == blobs["other-b"]
