"""Merges on a Ray cluster (``--ray``): one local Ray instance with 2 worker CPUs for the
module. The oracle is the single-process merge of the same recipe: the Ray output must be the
same files, byte for byte. Skipped when ``ray`` cannot be imported (``pip install
'mergehub[ray]'``), except the test of what ``--ray`` says then."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import mergehub
from mergehub.errors import InputError
from mergehub.hub.cli import cli
from mergehub.hub.demo import dir_digests
from mergehub.merge.cluster import balanced_groups
from mergehub.merge.plan import MergeError
from mergehub.storage.store import Store

#: small shards, so that the tiny models' output has several, split among several tasks
SHARD = "60KB"


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray instance with 2 CPUs whose workers import this checkout and carry the
    fault hook of ``tests/ray_faults.py``; yields the path that arms it."""
    ray = pytest.importorskip("ray")
    root = Path(__file__).resolve().parents[1]
    work = tmp_path_factory.mktemp("ray")
    kill = work / "kill"
    path = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {"PYTHONPATH": path, "MERGEHUB_TEST_KILL": str(kill),
           # the workers' own Hugging Face cache (Hub inputs), no saved login, no Xet
           "HF_HUB_CACHE": str(work / "hf-cache"), "HF_TOKEN_PATH": str(work / "no-token"),
           "HF_HUB_DISABLE_XET": "1"}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20,
             logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "tests.ray_faults.arm"})
    yield kill
    ray.shutdown()


@pytest.fixture(scope="module")
def tree_base(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bf16 base as a whole model folder: besides its weights and config, a
    sentence-transformers module's config one folder down, a model card and a pickle."""
    base = tmp_path_factory.mktemp("tree") / "base"
    shutil.copytree(models["base-bf16"], base)
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    (base / "modules.json").write_text('[{"idx": 1, "path": "1_Pooling"}]\n')
    (base / "README.md").write_text("# the base's card\n")
    (base / "pytorch_model.bin").write_bytes(b"a pickle would be here")
    return base


def _recipe(tmp_path: Path, models: dict[str, Path], method: str, extra: str = "",
            base: Path | None = None) -> Path:
    """Two dense fine-tunes and a LoRA on the bf16 base (``base``: a copy of it);
    densities for the sparsifying methods."""
    density = (lambda d: "" if method == "task_arithmetic" else f", density: {d}")
    path = tmp_path / f"{method}.yaml"
    path.write_text(f"""merge_method: {method}
base_model: {base or models['base-bf16']}
models:
  - model: {models['ft-mlp']}
    parameters: {{weight: 1.0{density(0.4)}}}
  - model: {models['ft-attn']}
    parameters: {{weight: 0.7{density(0.6)}}}
  - model: {models['lora']}
    parameters: {{weight: 0.5{density(0.5)}}}
parameters: {{lambda: 0.9{extra}}}
""")
    return path


def _both(recipe: Path, tmp_path: Path, **kw) -> tuple[mergehub.merge.tensors.MergeResult, ...]:
    """The recipe merged in this process and on Ray; both outputs' digests must be equal."""
    local = mergehub.merge(recipe, tmp_path / "local", max_shard_size=SHARD, progress=False,
                           echo=lambda t: None, **kw)
    on_ray = mergehub.merge(recipe, tmp_path / "ray", max_shard_size=SHARD, progress=False,
                            echo=lambda t: None, executor="ray", **kw)
    return local, on_ray


def test_balanced_groups_by_bytes():
    """Graham's LPT rule by hand: 9, 7, 6, 5, 4, 3 into 3 groups -> {9, 3}, {7, 4}, {6, 5}."""
    assert balanced_groups([3, 9, 5, 7, 4, 6], 3) == [[0, 1], [2, 5], [3, 4]]
    assert balanced_groups([1, 1], 8) == [[0], [1]]  # no empty groups
    assert balanced_groups([5], 1) == [[0]]


@pytest.mark.parametrize("method, extra", [
    ("task_arithmetic", ""),
    ("ties", ""),
    ("dare_ties", ""),
    ("ties", ", trim_scope: global"),  # a pre-pass on the driver, its cuts shipped to tasks
])
def test_ray_output_is_the_single_process_output(ray_instance, models, tree_base, tmp_path,
                                                 method, extra):
    """Several tasks (7 shards in groups over 2 workers), dense and LoRA inputs: the Ray output
    is the single-process one file for file, byte for byte (the base's files at any depth
    included), and so is the count of kept entries the tasks send back."""
    local, on_ray = _both(_recipe(tmp_path, models, method, extra, tree_base), tmp_path, seed=3)
    want = dir_digests(tmp_path / "local")
    assert len([n for n in want if n.endswith(".safetensors")]) >= 4
    assert {"1_Pooling/config.json", "modules.json", "config.json"} <= set(want)
    assert dir_digests(tmp_path / "ray") == want
    if local.report:
        assert on_ray.report["kept"] == local.report["kept"]
        assert sum(local.report["kept"].seen) > 0


def test_ray_store_inputs_and_to_store(ray_instance, models, tmp_path):
    """Store inputs reach the tasks (the store reopened there by its path) and ``--to-store``
    adds the tasks' output: exported, it is the single-process output."""
    with Store.init(tmp_path / "store") as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["ft-mlp"], "ft", base="base", progress=False)
        recipe = tmp_path / "r.yaml"
        recipe.write_text("merge_method: dare_linear\nbase_model: base\nmodels:\n"
                          "  - model: ft\n    parameters: {weight: 1.0, density: 0.5}\n"
                          f"  - model: {models['ft-attn']}\n    parameters: {{weight: 1.0}}\n")
        mergehub.merge(recipe, tmp_path / "local", store=store, max_shard_size=SHARD,
                       progress=False)
        mergehub.merge(recipe, store=store, to_store="merged", max_shard_size=SHARD,
                       progress=False, executor="ray")
        store.export("merged", tmp_path / "exported", progress=False)
        assert list((store.root / "tmp").iterdir()) == []
    assert dir_digests(tmp_path / "exported") == dir_digests(tmp_path / "local")


def test_killed_worker_is_retried_same_bytes(ray_instance, models, tmp_path):
    """A worker SIGKILLed after writing part of a shard: Ray runs its task again and the
    output is still complete and the same."""
    ray_instance.write_text("armed")
    try:
        _both(_recipe(tmp_path, models, "ties"), tmp_path)
        claimed = Path(f"{ray_instance}.claimed")
        assert claimed.is_file(), "no worker was killed"
        assert "ray" in claimed.read_text()  # the kill was in the Ray merge's output
    finally:
        ray_instance.unlink(missing_ok=True)
        Path(f"{ray_instance}.claimed").unlink(missing_ok=True)
    assert dir_digests(tmp_path / "ray") == dir_digests(tmp_path / "local")


def test_user_error_in_a_task_stops_the_merge(ray_instance, models, tmp_path):
    """Weights that sum to zero in layer 1 only: the task merging it fails; the merge stops
    with the engine's error (one line from the CLI) and nothing is left at OUT or beside it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n"
                      f"  - model: {models['ft-mlp']}\n    parameters: {{weight: [1.0, 1.0]}}\n"
                      f"  - model: {models['ft-attn']}\n    parameters: {{weight: [1.0, -1.0]}}\n")
    with pytest.raises(MergeError, match=r"layers\.1\..*sum to 0"):
        mergehub.merge(recipe, tmp_path / "out", max_shard_size=SHARD, progress=False,
                       executor="ray")
    result = CliRunner().invoke(cli, ["merge", str(recipe), "-o", str(tmp_path / "out"),
                                      "--max-shard-size", SHARD, "--ray"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tensor 'model.layers.1."), lines
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


def test_ray_cli_merges(ray_instance, models, tmp_path):
    """``hub merge RECIPE -o OUT --ray``: the output of the CLI is the library's."""
    recipe = _recipe(tmp_path, models, "task_arithmetic")
    mergehub.merge(recipe, tmp_path / "local", progress=False, echo=lambda t: None)
    result = CliRunner().invoke(cli, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--ray"])
    assert result.exit_code == 0, result.output
    assert dir_digests(tmp_path / "out") == dir_digests(tmp_path / "local")


def test_one_progress_bar_over_all_tasks(ray_instance, models, tmp_path, monkeypatch, capsys):
    """A Ray merge shows one bar, the driver's: bytes (and bytes/s) over all tasks, at the
    total of the merge's tensors when it ends; the tasks show none of their own."""
    import mergehub.merge.cluster as cluster

    bars = []

    def byte_bar(total: int, desc: str, progress: bool | None):  # noqa: ANN202 (a tqdm)
        bars.append(real(total, desc, progress))
        return bars[-1]

    real = cluster.byte_bar
    monkeypatch.setattr(cluster, "byte_bar", byte_bar)
    result = mergehub.merge(_recipe(tmp_path, models, "ties"), tmp_path / "out",
                            max_shard_size=SHARD, progress=True, executor="ray")
    assert len(bars) == 1 and bars[0].unit == "B"
    assert bars[0].total == bars[0].n == result.bytes
    shown = capsys.readouterr().err
    assert "merge:" in shown and "B/s" in shown
    assert not re.search(r"(?m)(^|\r)(?!merge:)[\w -]+:\s+\d+%", shown), shown


def test_ray_missing_says_how_to_install(models, tmp_path, monkeypatch):
    """Without ray, ``--ray`` is a one-line error naming the extra to install, before any work."""
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    recipe = _recipe(tmp_path, models, "task_arithmetic")
    with pytest.raises(InputError, match=r"pip install 'mergehub\[ray\]'"):
        mergehub.merge(recipe, tmp_path / "out", executor="ray", progress=False)
    result = CliRunner().invoke(cli, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--ray"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --ray needs Ray, which is not installed: "
                                     "pip install 'mergehub[ray]'")
    assert not (tmp_path / "out").exists()


def test_ray_hub_inputs_are_fetched_by_the_tasks(ray_instance, hf, models, tmp_path):
    """Hub inputs on Ray: the driver reads headers only (its cache gets no weight file), the
    tasks download the shards into their own cache (the endpoint recorded in the plan), and
    the output is the merge of the local folders."""
    from huggingface_hub import HfApi, constants

    from tests.hub_server import new_repo_id

    repos = {}
    for key in ("sharded-bf16", "ft-sharded"):
        repos[key] = new_repo_id(key)
        HfApi().create_repo(repos[key])
        HfApi().upload_folder(repo_id=repos[key], folder_path=str(models[key]))
    text = ("merge_method: dare_ties\nbase_model: BASE\nmodels:\n"
            "  - model: FT\n    parameters: {weight: 1.0, density: 0.5}\n"
            f"  - model: {models['ft-attn']}\n    parameters: {{weight: 0.5, density: 0.7}}\n")
    (tmp_path / "local.yaml").write_text(text.replace("BASE", str(models["sharded-bf16"]))
                                         .replace("FT", str(models["ft-sharded"])))
    (tmp_path / "hub.yaml").write_text(text.replace("BASE", f"hf://{repos['sharded-bf16']}")
                                       .replace("FT", repos["ft-sharded"]))
    mergehub.merge(tmp_path / "local.yaml", tmp_path / "local", max_shard_size=SHARD,
                   progress=False)
    mergehub.merge(tmp_path / "hub.yaml", tmp_path / "ray", max_shard_size=SHARD,
                   progress=False, executor="ray")
    assert dir_digests(tmp_path / "ray") == dir_digests(tmp_path / "local")
    driver = list(Path(constants.HF_HUB_CACHE).rglob("*.safetensors"))
    workers = list((ray_instance.parent / "hf-cache").rglob("*.safetensors"))
    assert driver == [] and len(workers) >= 6
