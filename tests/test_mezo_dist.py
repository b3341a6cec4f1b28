"""MeZO on several processes (torch.distributed, gloo on the CPU) against one process.

The ranks are forked from a fork server that has torch, transformers and mergehub imported
(tests/mezo_dist_worker.py), two groups in all (2 and 3 ranks), each running every scenario
in turn; the single-process references run here. Oracles: the run on one process (of the
whole batch, or of the same per-rank batches), and the bytes torch.distributed's collectives
are handed (counted by wrapping them, independently of the code under test).
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from mergehub.adapters.trainer import train

SIZES = (2, 3)


def launch(n: int, out: Path, scenarios: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Run ``scenarios`` on ``n`` ranks (forked by the fork server; errors re-raised here)."""
    import torch.multiprocessing as mp

    from tests import mezo_dist_worker as worker

    multiprocessing.set_forkserver_preload(["tests.mezo_dist_worker"])
    mp.start_processes(worker.rank_main, args=(n, free_port(), out, scenarios), nprocs=n,
                       start_method="forkserver")


def trainer_config(base: Path, out: Path, **changes: Any) -> dict[str, Any]:
    config = dict(base=str(base), data={"task": "add1", "eval_examples": 12}, method="mezo",
                  steps=20, batch_size=6, lr=1e-3, seed=0, output={"dir": str(out)},
                  method_params={"eps": 1e-3})
    for key, value in changes.items():
        if key in ("method_params", "output"):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


#: trainer scenarios: tag -> config changes (run on every group size)
TRAIN = {"mezo": {}, "sparse": {"method": "sparse_mezo", "method_params": {"density": 0.5}},
         "p3": {"method_params": {"n_perturbations": 3}},
         "shard": {"method_params": {"shard": True}}}
#: optimizer scenarios: tag -> options (run on every group size)
OPTIMIZER = {
    "sharded-mezo": dict(shard=True, report="rank0", chunk=300, weight_decay=0.1),
    "sharded-sparse": dict(shard=True, report="rank0", chunk=300, density=0.3, steps=10),
    "sharded-master": dict(shard=True, report="rank0", chunk=300, master_weights=True,
                           density=0.5, steps=10),
    "bytes-32": dict(hidden=32, steps=5), "bytes-64": dict(hidden=64, steps=5),
    "bytes-p3": dict(n_perturbations=3, steps=5),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every scenario on 2 and on 3 ranks, and the single-process references."""
    from mergehub.hub.demo import make_tiny_llama
    # imported here, not at collection: transformers' Llama imports Triton, which must come
    # after tests/test_mezo.py asks for its interpreter
    from tests import mezo_dist_worker as worker

    root = tmp_path_factory.mktemp("mezo-dist")
    base = make_tiny_llama(root / "base", dtype=torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {tag: train(trainer_config(base, root / "single" / tag, **changes))
                  for tag, changes in TRAIN.items() if tag != "shard"}
        for tag, options in OPTIMIZER.items():
            if tag.startswith("sharded"):
                worker.optimizer_run(root, f"single-{tag}", **{
                    k: v for k, v in options.items() if k not in ("shard", "report")})
        for n in SIZES:
            out = root / f"n{n}"
            out.mkdir()
            scenarios = [("train", tag, {"config": trainer_config(base, out / tag, **changes)})
                         for tag, changes in TRAIN.items()]
            resumable = trainer_config(base, out / "resumed", checkpoint_every=5,
                                       method_params=TRAIN["shard"]["method_params"] if n == 3
                                       else {})
            scenarios += [("train", "stopped", {"config": resumable, "stop_after": 10}),
                          ("train", "resumed", {"config": resumable})]
            scenarios += [("optimizer", tag, options) for tag, options in OPTIMIZER.items()]
            launch(n, out, scenarios)
    finally:
        torch.set_num_threads(before)
    return {"root": root, "single": single}


def result(runs: dict[str, Any], n: int, tag: str, rank: int = 0) -> dict[str, Any]:
    return json.loads((runs["root"] / f"n{n}" / f"{tag}.rank{rank}.json").read_text())


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(path.glob("*.safetensors")) if path.is_dir() else path))


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("tag", ["mezo", "sparse", "p3"])
def test_data_parallel_training_equals_one_process_on_the_whole_batch(runs, n, tag):
    """N ranks (each evaluating its rows, or with 3 perturbations each rank its own
    perturbations) train as one process does on the concatenated batch: the same losses, and
    weights within 1e-6 relative after 20 steps, which moved far more than that."""
    single = runs["single"][tag]
    mine = result(runs, n, tag)
    assert mine["losses"] == pytest.approx(single.losses, rel=1e-6, abs=0)
    ours, theirs = weights(runs["root"] / f"n{n}" / tag), weights(single.output_dir)
    assert relative_gap(theirs, ours) <= 1e-6
    base = weights(runs["root"] / "base")
    assert relative_gap(theirs, base) > 1e-2
    for rank in range(1, n):  # rank 0 alone wrote the result
        assert result(runs, n, tag, rank)["output_dir"] is None
        assert result(runs, n, tag, rank)["losses"] == mine["losses"]


@pytest.mark.parametrize("n", SIZES)
def test_sharded_training_equals_replicated_bit_for_bit(runs, n):
    """shard: true (FSDP2: every rank holds 1/N of each parameter and perturbs and updates
    only it) gives the replicated run's losses and weights exactly: same per-rank batches."""
    assert result(runs, n, "shard")["losses"] == result(runs, n, "mezo")["losses"]
    out = runs["root"] / f"n{n}"
    ours, theirs = weights(out / "shard"), weights(out / "mezo")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("tag", [t for t in OPTIMIZER if t.startswith("sharded")])
def test_sharded_mezo_does_not_depend_on_the_number_of_ranks(runs, n, tag):
    """FSDP2-sharded MeZO / Sparse MeZO (weight decay, float32 copies) on N ranks, blocks of
    the torch stream (CHUNK = 300 entries) cut by the shard edges, whole batch on every rank:
    bit for bit the run of one process with whole parameters."""
    root = runs["root"]
    single = json.loads((root / f"single-{tag}.json").read_text())
    mine = json.loads((root / f"n{n}" / f"{tag}.json").read_text())
    assert mine["losses"] == single["losses"]
    ours, theirs = weights(root / f"n{n}" / f"{tag}.safetensors"), \
        weights(root / f"single-{tag}.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert mine["bytes_per_step"] > 0  # the counter sees FSDP's all-gathers


@pytest.mark.parametrize("n", SIZES)
def test_a_data_parallel_step_exchanges_a_few_bytes_whatever_the_model(runs, n):
    """Bytes handed to torch.distributed's collectives per step: 4 float64 (the two loss sums
    and their weights) for one perturbation, 2 per perturbation when the ranks share out 3:
    the same for a model of 4x the parameters. A sharded step moves the weights."""
    out = runs["root"] / f"n{n}"
    per_step = {tag: json.loads((out / f"{tag}.json").read_text())["bytes_per_step"]
                for tag in ("bytes-32", "bytes-64", "bytes-p3", "sharded-mezo")}
    assert per_step["bytes-32"] == per_step["bytes-64"] == 4 * 8
    assert per_step["bytes-p3"] == 3 * 2 * 8
    assert per_step["sharded-mezo"] > 1000 * per_step["bytes-32"]
    for tag in ("bytes-32", "bytes-p3"):  # and the ranks' weights stay the same
        assert len({(out / f"{tag}.rank{r}.digest").read_text() for r in range(n)}) == 1


@pytest.mark.parametrize("n", SIZES)
def test_an_interrupted_run_resumes_as_if_uninterrupted(runs, n):
    """Stopped after 10 steps (checkpoints every 5, written by rank 0; gathered from the
    shards on 3 ranks), the same config resumes and ends with the uninterrupted run's losses
    and weights."""
    stopped, resumed = result(runs, n, "stopped"), result(runs, n, "resumed")
    uninterrupted = result(runs, n, "mezo")
    assert stopped["interrupted"] and len(stopped["losses"]) == 10
    assert resumed["losses"] == uninterrupted["losses"]
    out = runs["root"] / f"n{n}"
    ours, theirs = weights(out / "resumed"), weights(out / "mezo")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _cli_config(tmp_path: Path, name: str = "train", **changes: Any) -> Path:
    text = {"base": "base", "data": "{task: add1}", "method": "mezo", "steps": 20,
            "batch_size": 6, "lr": "1.0e-3", "checkpoint_every": 5,
            "output": "{store: add1-mezo, base: tiny}", **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in text.items()))
    return path


def test_hub_train_nproc_starts_torchrun_with_the_command_s_options(tmp_path, monkeypatch):
    """``hub train --nproc N`` checks the config, then runs torchrun with ``-m mergehub train``
    and this command's options (nothing started on a bad config or option: one error line)."""
    import subprocess
    import sys

    from click.testing import CliRunner

    from mergehub.hub.cli import cli

    started = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: started.append((cmd, env)) or 0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    store, config = str(tmp_path / "s"), str(_cli_config(tmp_path))

    def hub(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(cli, ["--store", store, *args])
        assert result.exit_code == code, (result.output, result.exception)
        return result.output

    hub("-q", "train", config, "--nproc", "3", "--fresh", "--stop-after", "4")
    hub("train", config, "--nproc", "2", "--nnodes", "2", "--rdzv-endpoint", "node0:29400")
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    assert [cmd for cmd, _ in started] == [
        [*launcher, "--nproc-per-node=3", "--standalone", "-m", "mergehub", "train", config,
         "--fresh", "--stop-after=4", f"--store={store}", "--quiet"],
        [*launcher, "--nproc-per-node=2", "--nnodes=2", "--rdzv-backend=c10d",
         "--rdzv-endpoint=node0:29400", "-m", "mergehub", "train", config, f"--store={store}"]]
    import os
    assert started[0][1]["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 3))
    started.clear()
    for args, words in [
            ((str(_cli_config(tmp_path, "lora", method="lora")), "--nproc", "2"),
             ("method lora trains on one process", "mezo and sparse_mezo")),
            ((str(_cli_config(tmp_path, "small", batch_size=2)), "--nproc", "3"),
             ("batch_size 2 is smaller than the 3 processes",)),
            ((config, "--nproc", "2", "--nnodes", "2"), ("--rdzv-endpoint",)),
            ((config, "--nnodes", "2"), ("go with --nproc",)),
            ((str(_cli_config(tmp_path, "shard", method_params="{shard: true, over: adapter}",
                              peft="{r: 2}")), "--nproc", "2"),
             ("shard: true shards the model's own weights",))]:
        output = hub("train", *args, code=2)
        lines = output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), output
        assert all(w in lines[0] for w in words), (words, lines[0])
    assert not started


@pytest.mark.slow
def test_hub_train_nproc_trains_resumes_and_stores_once(tmp_path):
    """The real thing: torchrun starts 2 processes of ``python -m mergehub train``; stopped
    after 10 steps and run again, the result is stored once, and rank 0 alone prints."""
    import subprocess
    import sys

    from mergehub.hub.demo import make_tiny_llama
    from mergehub.storage.store import Store

    make_tiny_llama(tmp_path / "base", dtype=torch.float32)
    config = _cli_config(tmp_path)
    hub = [sys.executable, "-m", "mergehub", "--store", str(tmp_path / "s"), "train",
           str(config), "--nproc", "2"]
    first = subprocess.run([*hub, "--stop-after", "10"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("stopped after step 10") and first.stdout.count("\n") == 1
    second = subprocess.run(hub, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr and second.stderr.count("resuming from") == 1
    assert second.stdout.startswith("trained 20 steps") and second.stdout.count("\n") == 1
    single = train(trainer_config(tmp_path / "base", tmp_path / "single", checkpoint_every=5))
    with Store(tmp_path / "s") as store:
        metrics = store.show("add1-mezo").metrics
    assert metrics["loss"] == pytest.approx(single.metrics["loss"], rel=1e-6)


def test_count_bytes_skips_collectives_this_torch_lacks(monkeypatch):
    """torch versions differ in the collectives they define (2.11 has no
    ``all_gather_single`` in ``distributed_c10d``): counting wraps those that exist, restores
    them afterwards, and leaves the missing ones missing."""
    import torch.distributed._functional_collectives  # noqa: F401  (imports c10d's names)
    import torch.distributed.distributed_c10d as c10d

    from mergehub.adapters import distributed

    monkeypatch.delattr(c10d, "all_gather_single", raising=False)
    monkeypatch.delattr(c10d, "all_to_all", raising=True)
    before = c10d.all_reduce
    with distributed.count_bytes():
        assert c10d.all_reduce is not before  # wrapped
        assert not hasattr(c10d, "all_to_all")
    assert c10d.all_reduce is before
    assert not hasattr(c10d, "all_to_all")
