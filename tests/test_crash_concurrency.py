"""SIGKILL at any point of ``add`` (and, in the slow loops, of merge, compress, gc and pull)
leaves the store consistent and its catalog rebuildable from the entry records; concurrent
writers, and concurrent creators of a new store, all succeed."""

from __future__ import annotations

import json
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


def _spawn(root: Path, path: Path | str, name: str, base: str = "-", go: str = "-",
           op: str = "add") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(WORKER), str(root), str(path), name, base, go,
                             op], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_first_adds_into_a_new_store_path_at_once(tmp_path):
    """Item 16: processes adding at once into a store path that does not exist yet all
    succeed (creating the store used to race: "directory is not empty")."""
    source = write_model_dir(tmp_path / "m", [TensorSpec("w", "F32", (32, 32))],
                             lambda spec: torch.ones(spec.shape), progress=False)
    for attempt in range(2):
        root = tmp_path / f"new{attempt}" / "store"
        go = tmp_path / f"go{attempt}"
        procs = [_spawn(root, source, f"m{i}", "-", str(go)) for i in range(5)]
        go.touch()
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and out.strip() == "done", err[-2000:]
        with Store(root) as store:
            assert sorted(m.name for m in store.ls()) == [f"m{i}" for i in range(5)]
            assert store.verify(progress=False).ok


def _catalog_lost_and_rebuilt(root: Path) -> set[str]:
    """Delete the catalog, rebuild it from the records, check it; returns the models."""
    for suffix in ("", "-wal", "-shm"):
        (root / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    report = Store.repair(root)
    assert not report.problems, report.problems
    with Store(root) as store:
        check = store.verify(progress=False)
        assert check.ok, check.problems
        return {m.name for m in store.ls()}


@pytest.mark.slow
@pytest.mark.parametrize("op", ["add", "merge", "compress", "gc", "pull"])
def test_sigkill_loop_then_catalog_rebuilt(op, tmp_path, synthetic, request):
    """SIGKILL at spread points of one operation, MERGEHUB_CRASH_KILLS times (default 6):
    after each, verify is OK and the models are those before plus, at most, the operation's
    whole new model (exported bit for bit); then the catalog is deleted and rebuilt from the
    records: the same models come back (plus the new one where the kill fell between its
    record and its commit), a removed one never. Outcomes go to MERGEHUB_CRASH_REPORT (JSON)."""
    kills = int(os.environ.get("MERGEHUB_CRASH_KILLS", "6"))
    root = tmp_path / "store"
    with Store.init(root) as store:
        store.add(synthetic["base"], "base", progress=False)
        store.add(synthetic["ft1"], "ft1", base="base", progress=False)
        store.add(synthetic["ft2"], "ft2", base="base", progress=False)
    new, base, source = "new", "-", synthetic["other"]
    if op == "add":
        base = "base"
    elif op == "merge":
        source = tmp_path / "recipe.yaml"
        source.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                          "  - model: ft1\n    parameters: {weight: 0.6}\n"
                          "  - model: ft2\n    parameters: {weight: 0.6}\n")
    elif op == "compress":
        source = "ft1"
    elif op == "gc":
        new = None
    else:
        from mergehub.hub.remote import push

        request.getfixturevalue("hf")
        with Store(root) as store:
            store.compress("ft1", "bit1", {"scope": "all"}, as_name="ft1-bit1", progress=False)
            repos = [f"org/crash-{i}-{os.getpid()}-{time.monotonic_ns()}" for i in range(2)]
            push(store, "ft1", repos[0], progress=False)  # hf form: pulled by add
            push(store, "ft1-bit1", repos[1], progress=False)  # its blobs: pulled by import
        base = "base"

    def junk() -> None:  # for gc: blobs of a removed model to delete
        with Store(root) as store:
            store.add(synthetic["other"], "junk", base="base", progress=False)
            store.rm("junk")

    def run(i: int, delay: float | None) -> float:
        if op == "gc":
            junk()
        path = repos[i % 2] if op == "pull" else source
        proc = _spawn(root, path, new or "-", base, "-", op)
        t0 = time.monotonic()
        if delay is None:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0 and out.strip() == "done", err[-3000:]
        else:
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
        return time.monotonic() - t0

    reference: list[dict[str, str] | None] = [None, None]
    durations = []
    for i in range(2 if op == "pull" else 1):  # uninterrupted: the duration and the result
        durations.append(run(i, None))
        if new is not None:
            with Store(root) as store:
                reference[i] = dir_digests(store.export(new, tmp_path / f"ref{i}",
                                                        progress=False))
                store.rm(new)
        with Store(root) as store:
            store.gc()
    duration = max(durations)
    with Store(root) as store:
        before = {m.name for m in store.ls()}

    outcomes = []
    for i in range(kills):
        run(i, duration * 1.3 * (i + 0.5) / kills)
        with Store(root) as store:
            report = store.verify(progress=False)
            assert report.ok, (i, report.problems)
            names = {m.name for m in store.ls()}
            assert names - {new} == before, (i, names)
            committed = new in names
            if committed:
                out = store.export(new, tmp_path / f"out{i}", progress=False)
                assert dir_digests(out) == reference[i % 2 if op == "pull" else 0]
            partial = _leftovers(root, store) + report.unreferenced_records + (
                len(list((root / "transfers").iterdir())) if (root / "transfers").is_dir() else 0)
        rebuilt = _catalog_lost_and_rebuilt(root)
        assert rebuilt - {new} == before and (committed <= (new in rebuilt)), (i, rebuilt)
        outcomes.append("committed" if committed else "resurrected" if new in rebuilt
                        else "partial" if partial else "clean")
        with Store(root) as store:
            if new in rebuilt:
                out = store.export(new, tmp_path / f"again{i}", progress=False)
                assert dir_digests(out) == reference[i % 2 if op == "pull" else 0]
                store.rm(new)
            store.gc()
            assert _leftovers(root, store) == 0 and store.verify(progress=False).ok
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    if os.environ.get("MERGEHUB_CRASH_REPORT"):
        with open(os.environ["MERGEHUB_CRASH_REPORT"], "a") as f:
            f.write(json.dumps({"op": op, "kills": kills, "duration_s": round(duration, 2),
                                "outcomes": counts}) + "\n")
    assert len(outcomes) == kills
