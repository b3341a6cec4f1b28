"""Live composition: mergehub.load and Composer against their oracles.

The oracle of every apply is ``hub merge``'s own output for the same recipe (``mergehub.merge``
writing an HF dir, read back from its files): a composed model must hold exactly those bits.
The oracle of ``load`` is ``from_pretrained`` of the same files (or of ``hub merge``'s /
``hub export``'s output for adapter and compressed entries). Without CUDA, the kernel paths
run under Triton's interpreter (as in test_kernels.py); the same checks on a GPU are marked
``gpu``.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import mergehub  # noqa: E402
from mergehub.compose import composer as compose  # noqa: E402  (the module tests patch)
from mergehub.compose import Composer, DeltaCache  # noqa: E402
from mergehub.errors import BaseMismatchError, InputError, IntegrityError, StoreError  # noqa: E402
from mergehub.hub.demo import make_finetune, make_lora, make_tiny_llama  # noqa: E402
from mergehub.names import state_tensors  # noqa: E402
from mergehub.merge.recipe import RecipeError  # noqa: E402
from mergehub.storage.checkpoint import open_checkpoint  # noqa: E402
from mergehub.storage.store import Store  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])
_count = itertools.count()


def recipe(method: str, inputs: list[tuple[str, dict]], params: dict | None = None,
           base: str | None = "base", extra: str = "") -> str:
    """Recipe text: ``inputs`` are (reference, per-model parameters)."""
    lines = [f"merge_method: {method}"] + ([f"base_model: {base}"] if base else []) + ["models:"]
    for ref, p in inputs:
        lines.append(f"  - model: {ref}")
        if p:
            lines.append(f"    parameters: {{{', '.join(f'{k}: {v}' for k, v in p.items())}}}")
    if params:
        lines.append(f"parameters: {{{', '.join(f'{k}: {v}' for k, v in params.items())}}}")
    return "\n".join(lines) + "\n" + extra


def hub_merge(text: str, store: Store | None, tmp_path: Path, **kwargs) -> dict[str, torch.Tensor]:
    """What ``hub merge -o DIR --format hf`` writes for ``text``, tensor by tensor."""
    out = tmp_path / f"hub-merge-{next(_count)}"
    mergehub.merge(text, out=out, store=store, output_format="hf", progress=False,
                   echo=lambda line: None, **kwargs)
    ckpt = open_checkpoint(out)
    return {name: ckpt.load(name) for name in ckpt.tensors}


def assert_holds(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``expected`` is in the model's state dict (names as without PEFT's
    wrapping) with the same dtype and bits."""
    state = state_tensors(model)
    for name, want in expected.items():
        got = state[name]
        assert got.dtype == want.dtype, name
        assert torch.equal(got.cpu(), want), name


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), name


@pytest.fixture(scope="module")
def hub(models, tmp_path_factory) -> tuple[Store, dict[str, Path]]:
    """A store with the tiny Llama base, fine-tunes (lossless, and bit1 / compeft / lowrank /
    TALL copies), LoRAs, fine-tunes of fp16 and fp32 bases and of another base."""
    root = tmp_path_factory.mktemp("compose")
    paths = dict(models)
    paths["lora-qo"] = make_lora(models["base-bf16"], root / "lora-qo", seed=9,
                                 target_modules=("q_proj", "o_proj"))
    paths["other-base"] = make_tiny_llama(root / "other-base", seed=3)
    paths["other-ft"] = make_finetune(paths["other-base"], root / "other-ft", pattern="mlp")
    for tag in ("fp16", "fp32"):
        paths[f"ft-{tag}"] = make_finetune(models[f"base-{tag}"], root / f"ft-{tag}",
                                           pattern="mlp", seed=4)
    store = Store.init(root / "store")
    entries = [("base", models["base-bf16"], None, None),
               ("mlp", models["ft-mlp"], "base", {"loss": 0.5}),
               ("attn", models["ft-attn"], "base", {"loss": 0.8}),
               ("lora", models["lora"], "base", None), ("lora-qo", paths["lora-qo"], "base", None),
               ("other-base", paths["other-base"], None, None),
               ("other-ft", paths["other-ft"], "other-base", None)]
    for tag in ("fp16", "fp32"):
        entries += [(f"base-{tag}", models[f"base-{tag}"], None, None),
                    (f"ft-{tag}", paths[f"ft-{tag}"], f"base-{tag}", None)]
    for name, path, base, metrics in entries:
        store.add(path, name, base=base, metrics=metrics, progress=False)
    store.compress("mlp", "bit1", progress=False)
    store.compress("attn", "compeft", {"density": 0.2}, progress=False)
    store.compress("mlp", "lowrank", {"rank": 4}, progress=False)
    store.compress_tall(["mlp", "attn"], progress=False)
    yield store, paths
    store.close()


INPUT_SETS = {
    "lossless+dir+lora": lambda p: ["mlp", str(p["ft-attn"]), "lora"],
    "compressed": lambda p: ["mlp-bit1", "attn-compeft", "mlp-lowrank"],
    "tall+lora-dir": lambda p: ["mlp-tall", "attn-tall", str(p["lora"])],
}
METHODS = {  # per-model parameters (the same for every input but the weight), global ones
    "linear": ({}, {}),
    "task_arithmetic": ({}, {"lambda": 0.8}),
    "ties": ({"density": 0.4}, {"lambda": 0.9}),
    "dare_linear": ({"density": 0.5}, {}),
    "dare_ties": ({"density": 0.5}, {"rescale": "l1"}),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.05}, {}),
    "breadcrumbs_ties": ({"density": 0.5, "gamma": 0.05}, {"lambda": 1.1}),
    "consensus_task_arithmetic": ({}, {"k": 1}),
    "consensus_ties": ({"density": 0.5}, {"k": 1}),
    "metric_weighted": ({}, {}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_apply_equals_hub_merge(hub, tmp_path, method):
    """For every method and every kind of input (store fine-tunes lossless and compressed with
    each codec, model and adapter dirs, stored LoRAs), one composer applying recipe after
    recipe holds exactly what ``hub merge`` writes for each; reset gives back the loaded base."""
    store, paths = hub
    model = mergehub.load("base", store)
    before = snapshot(model)
    composer = Composer(model)
    for set_name, refs in INPUT_SETS.items():
        per_model, params = METHODS[method]
        inputs = [(ref, {**per_model, "weight": w}) for ref, w in zip(refs(paths), (1.0, 0.6, 0.3))]
        if method == "metric_weighted":
            inputs = [(ref, {"loss": loss}) for (ref, _), loss in zip(inputs, (0.5, 0.7, 0.9))]
        text = recipe(method, inputs, params)
        composer.apply(text, seed=3)
        assert_holds(model, hub_merge(text, store, tmp_path, seed=3))
        assert composer.active.recipe == text and composer.active.merge_method == method
    composer.reset()
    assert_same(model, before)
    assert composer.active is None


@pytest.mark.parametrize("method", sorted(METHODS))
def test_apply_again_with_the_remembered_plan(hub, tmp_path, method):
    """The same recipe applied again (after reset, and after another recipe) reuses its
    remembered plan and merger: for every method (random ones included: the same seed, the
    same masks) the model again holds what ``hub merge`` writes."""
    store, paths = hub
    per_model, params = METHODS[method]
    inputs = [(ref, {**per_model, "weight": w}) for ref, w in zip(
        ["mlp", "attn-compeft", "mlp-bit1"], (1.0, 0.6, 0.3))]
    if method == "metric_weighted":
        inputs = [(ref, {"loss": loss}) for (ref, _), loss in zip(inputs, (0.5, 0.7, 0.9))]
    text = recipe(method, inputs, params)
    want = hub_merge(text, store, tmp_path, seed=3)
    model = mergehub.load("base", store)
    composer = Composer(model)
    composer.apply(text, seed=3)
    composer.reset()
    composer.apply(text, seed=3)
    assert_holds(model, want)
    composer.apply(recipe("task_arithmetic", [("attn", {})]))
    composer.apply(text, seed=3)
    assert_holds(model, want)


def test_global_trim_and_gradients(hub, tmp_path):
    """A method with a pre-pass over every tensor (TIES' global trim) and per-layer gradient
    and filter parameters."""
    store, paths = hub
    model = mergehub.load("base", store)
    composer = Composer(model)
    for text in (recipe("ties", [("mlp", {"density": 0.3}), ("attn-compeft", {"density": 0.5})],
                        {"trim_scope": "global"}),
                 recipe("task_arithmetic", [("mlp", {"weight": "[0.2, 1.0]"}),
                                            ("lora", {"weight": "[{filter: v_proj, value: 2.0}, "
                                                                "{value: 0.5}]"})])):
        composer.apply(text)
        assert_holds(model, hub_merge(text, store, tmp_path))


@pytest.mark.parametrize("tag", ["fp16", "fp32"])
def test_other_dtypes(hub, tmp_path, tag):
    """fp16 and fp32 bases, and a bf16 model loaded as fp32 for a recipe writing fp32."""
    store, _ = hub
    model = mergehub.load(f"base-{tag}", store)
    assert model.dtype == {"fp16": torch.float16, "fp32": torch.float32}[tag]
    composer = Composer(model)
    text = recipe("ties", [(f"ft-{tag}", {"density": 0.3})], base=f"base-{tag}")
    composer.apply(text)
    assert_holds(model, hub_merge(text, store, tmp_path))

    wide = mergehub.load("base", store, dtype=torch.float32)
    text = recipe("dare_ties", [("mlp", {"density": 0.5}), ("lora", {"density": 0.5})],
                  extra="out_dtype: float32\n")
    Composer(wide).apply(text)
    assert_holds(wide, hub_merge(text, store, tmp_path))


def test_missing_take_base(hub, tmp_path):
    """``missing: take-base`` for an input without a tensor of the base (as hub merge
    --missing take-base)."""
    store, paths = hub
    from safetensors.torch import save_file

    partial = {n: t for n, t in open_checkpoint(paths["ft-mlp"]).tensors.items()}
    ckpt = open_checkpoint(paths["ft-mlp"])
    file = tmp_path / "partial.safetensors"
    save_file({n: ckpt.load(n) for n in list(partial)[1:]}, str(file))
    model = mergehub.load("base", store)
    text = recipe("task_arithmetic", [(str(file), {}), ("attn", {})])
    with pytest.raises(BaseMismatchError, match="has no tensor"):
        Composer(model).apply(text)
    Composer(model).apply(text, missing="take-base")
    assert_holds(model, hub_merge(text, store, tmp_path, missing="take-base"))


@pytest.mark.parametrize("method", ["task_arithmetic", "consensus_task_arithmetic"])
def test_kernel_path_equals_hub_merge(hub, tmp_path, monkeypatch, method):
    """The fused path with the Triton kernels (interpreter on CPU): merge_tensor and the
    decompress-and-apply decode of compressed entries run in Triton in both the composer and
    hub merge, and both equal the default CPU merge. (TIES' threshold kernels take minutes in
    the interpreter: the GPU tests cover them, test_gpu_compose.py.)"""
    pytest.importorskip("triton")
    from mergehub import kernels
    from mergehub.kernels import dispatch
    from mergehub.merge import engine, plan, tensors

    store, _ = hub
    per_model, params = METHODS[method]
    text = recipe(method, [("mlp-bit1", {**per_model, "weight": 1.0}),
                           ("attn-compeft", {**per_model, "weight": 0.5}),
                           ("attn", {**per_model, "weight": 0.7})], params)
    cpu = hub_merge(text, store, tmp_path)
    calls = []
    use = dispatch.use_triton
    monkeypatch.setattr(dispatch, "use_triton",
                        lambda backend, t: calls.append(1) or use(backend or "triton", t))
    monkeypatch.setattr(compose, "TensorMerger", functools.partial(tensors.TensorMerger, fused=True))
    # the interpreter is not thread-safe: decode on the merging thread
    monkeypatch.setattr(compose, "READ_WORKERS", 1)
    monkeypatch.setattr(tensors, "READ_WORKERS", 1)
    model = mergehub.load("base", store)
    composer = Composer(model)
    composer.apply(text)
    assert calls
    assert_holds(model, cpu)
    # warm (every input in the cache): the merges are queued and launched together
    runs = []
    run = kernels.MergeBatch.run
    monkeypatch.setattr(kernels.MergeBatch, "run", lambda self: runs.append(len(self)) or run(self))
    composer.reset()
    composer.apply(text)
    assert runs and runs[0] >= 8
    assert_holds(model, cpu)
    # the same recipe again onto the same cached inputs: the recorded launches run again
    replays = []
    replay = kernels.MergeReplay.__call__
    monkeypatch.setattr(kernels.MergeReplay, "__call__",
                        lambda self: replays.append(replay(self)) or replays[-1])
    composer.reset()
    model.model.layers[0].mlp.up_proj.weight.data.fill_(3.0)  # overwritten by the apply
    runs.clear()
    composer.apply(text)
    assert replays == [True] and not runs
    fused = tmp_path / "fused"
    engine.execute(plan.plan_merge(mergehub.merge.recipe.load_recipe(text), store=store), fused,
                   fused=True, progress=False)
    ckpt = open_checkpoint(fused)
    for name, want in cpu.items():
        assert torch.equal(ckpt.load(name), want), name
    assert_holds(model, cpu)


def test_a_plan_is_remembered_until_the_catalog_changes(models, tmp_path, monkeypatch):
    """Applying a recipe of store entries again plans it once; a change of the catalog, by
    this Store or by another connection, plans it anew, so an entry removed and added again
    under its name with other content is merged as it is now. Recipes that read a folder are
    planned every time (its files could change unseen)."""
    store = Store.init(tmp_path / "store")
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "ft", base="base", progress=False)
    plans = []
    real = compose.plan_merge
    monkeypatch.setattr(compose, "plan_merge", lambda *a, **k: plans.append(1) or real(*a, **k))
    text = recipe("task_arithmetic", [("ft", {})], {"lambda": 0.5})
    model = mergehub.load("base", store)
    composer = Composer(model)
    for _ in range(3):
        composer.apply(text)
        composer.reset()
    composer.apply(yaml.safe_load(text))
    composer.apply(yaml.safe_load(text))
    assert len(plans) == 2
    store.add(models["ft-attn"], "other", base="base", progress=False)
    composer.apply(text)
    assert len(plans) == 3
    with Store(store.root) as elsewhere:
        elsewhere.rm("ft")
        elsewhere.add(models["ft-attn"], "ft", base="base", progress=False)
    composer.apply(text)
    assert len(plans) == 4
    assert_holds(model, hub_merge(text, store, tmp_path))
    folder = recipe("task_arithmetic", [(str(models["ft-mlp"]), {})])
    composer.apply(folder)
    composer.apply(folder)
    assert len(plans) == 6


def test_cpu_apply_merges_tensors_at_once_as_hub_merge_does(hub, tmp_path, monkeypatch):
    """On the CPU a composer merges as hub merge does: as many tensors at once as torch has
    threads, each on one intra-op thread (TensorMerger.map_tensors; intra-op threads split
    a chunk's short operations badly, and stall at every barrier where other processes keep
    the cores busy: a composer on two of them took 115 s where hub merge took 17 s on a
    loaded 2-core machine), in place, with the bits of hub merge; torch gets its threads
    back afterwards."""
    import threading

    from mergehub.merge import tensors

    store, _ = hub
    monkeypatch.setattr(tensors, "busy_machine", lambda: True)
    monkeypatch.setattr(tensors, "BUSY_CHECK_BYTES", 0)
    seen = []
    chunked = tensors.TensorMerger._chunked
    monkeypatch.setattr(tensors.TensorMerger, "_chunked",
                        lambda self, spec: seen.append((threading.current_thread().name,
                                                        torch.get_num_threads()))
                        or chunked(self, spec))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        text = recipe("ties", [("mlp", {"density": 0.5}), ("attn", {"density": 0.5})])
        model = mergehub.load("base", store)
        Composer(model).apply(text)
        assert seen and {n for _, n in seen} == {1}
        assert len({name for name, _ in seen}) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert_holds(model, hub_merge(text, store, tmp_path))


def test_swap_rewrites_only_changed_tensors(hub, tmp_path):
    """A second apply rewrites only the tensors whose result changes (those where an input's
    tensor differs), and the ones it keeps are still exactly hub merge's."""
    store, paths = hub
    model = mergehub.load("base", store)
    composer = Composer(model)
    base = store.open("base")
    changed = {name: {s.name for s in store.open(name).specs()
                      if store.open(name).blob(s.name) != base.blob(s.name)}
               for name in ("mlp", "attn")}
    first = composer.apply(recipe("task_arithmetic", [("lora", {})]))
    assert first.rewritten == first.tensors == len(base.specs())
    text = recipe("task_arithmetic", [("lora-qo", {})])
    # lora targets q and v, lora-qo q and o: in 2 layers, q, v and o change
    assert composer.apply(text).rewritten == 2 * 3
    assert_holds(model, hub_merge(text, store, tmp_path))
    assert composer.apply(text).rewritten == 0
    composer.apply(recipe("ties", [("mlp", {"density": 0.5})]))
    text = recipe("ties", [("attn", {"density": 0.5})])
    assert composer.apply(text).rewritten == len(changed["mlp"] | changed["attn"]) == 14
    assert_holds(model, hub_merge(text, store, tmp_path))


def test_cache_serves_a_working_set(hub, tmp_path, monkeypatch):
    """Switching back to entries applied before reads nothing from the store, and does not
    even work out which store blobs a read would decode twice; with no cache budget,
    everything is read again (with that bookkeeping)."""
    store, _ = hub
    reads = []
    real = mergehub.storage.store.StoredModel.load
    monkeypatch.setattr(mergehub.storage.store.StoredModel, "load",
                        lambda self, name, device=None: reads.append(name)
                        or real(self, name, device))
    shared = mergehub.storage.store.Store.shared_blobs
    monkeypatch.setattr(mergehub.storage.store.Store, "shared_blobs",
                        lambda self, names: reads.append("shared_blobs")
                        or shared(self, names))
    a = recipe("ties", [("mlp", {"density": 0.5}), ("attn-compeft", {"density": 0.5})])
    b = recipe("ties", [("mlp-bit1", {"density": 0.5}), ("attn", {"density": 0.5})])
    for budget, rereads in ((None, False), (0, True)):
        model = mergehub.load("base", store)
        composer = Composer(model, cache_bytes=budget)
        composer.apply(a)
        composer.apply(b)
        reads.clear()
        composer.reset()
        composer.apply(a)
        assert bool(reads) == rereads
        assert_holds(model, hub_merge(a, store, tmp_path))


def test_delta_cache_is_lru_within_its_budget():
    cache = DeltaCache(budget=40)
    t = {k: torch.zeros(n, dtype=torch.float32) for k, n in (("a", 4), ("b", 4), ("c", 3),
                                                              ("big", 11))}
    for key in ("a", "b"):
        cache.put(key, t[key])
    cache.new_apply()
    assert cache.bytes == 32 and cache.get("a") is t["a"]  # a is now the most recent
    cache.put("c", t["c"])  # 32 + 12 > 40: b, the least recent, goes
    assert cache.get("b") is None and cache.get("a") is t["a"] and cache.get("c") is t["c"]
    assert cache.bytes == 28
    cache.put("big", t["big"])  # larger than the budget: not kept, nothing evicted
    assert cache.get("big") is None and cache.bytes == 28 and len(cache) == 2


def test_delta_cache_keeps_part_of_a_working_set_larger_than_its_budget():
    """Five inputs of 16 bytes through a 48-byte cache, the same apply twice: the second finds
    the three the first kept (a plain LRU evicts each before its next use and finds none); the
    current apply's tensors are never evicted for its own later ones; a new recipe's tensors
    replace the old ones, least recently used first."""
    cache = DeltaCache(budget=48)
    t = {k: torch.zeros(4, dtype=torch.float32) for k in "abcdefg"}

    def apply(keys: str) -> int:
        cache.new_apply()
        hits = 0
        for key in keys:
            if cache.get(key) is None:
                cache.put(key, t[key])
            else:
                hits += 1
        return hits

    assert apply("abcde") == 0 and cache.bytes == 48
    assert {k for k in t if k in cache} == {"a", "b", "c"}
    assert apply("abcde") == 3
    assert apply("fg") == 0 and {k for k in t if k in cache} == {"c", "f", "g"}


def test_failed_apply_leaves_the_model_as_it_was(hub, tmp_path):
    """An apply that fails after writing some tensors (weights summing to zero in the last
    layer; a damaged blob of a later tensor) puts every tensor back, from the loaded state and
    from an applied recipe."""
    store, paths = hub
    model = mergehub.load("base", store)
    composer = Composer(model)
    fails = recipe("linear", [("mlp", {"weight": "[1.0, 1.0]"}),
                              ("attn", {"weight": "[1.0, -1.0]"})])
    for applied in (None, recipe("ties", [("mlp", {"density": 0.4}), ("lora", {"density": 0.4})])):
        if applied:
            composer.apply(applied)
        before, active = snapshot(model), composer.active
        with pytest.raises(mergehub.merge.plan.MergeError, match=r"layers\.1\..*sum to 0"):
            composer.apply(fails)
        assert_same(model, before)
        assert composer.active == active
    expected = hub_merge(applied, store, tmp_path)
    assert_holds(model, expected)

    damaged_ft = make_finetune(paths["base-bf16"], tmp_path / "damaged", pattern="self_attn",
                               seed=77)
    store.add(damaged_ft, "damaged", base="base", progress=False)
    victim = store.open("damaged")
    late = [s.name for s in victim.specs() if "layers.1.self_attn" in s.name][0]
    path = store.blob_path(victim.blob(late))
    good = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    try:
        with pytest.raises(IntegrityError, match=late.replace(".", r"\.")):
            composer.apply(recipe("task_arithmetic", [("damaged", {})]))
    finally:
        path.write_bytes(good)
    assert_holds(model, expected)


def test_failure_inside_a_tensor_puts_it_back(hub, monkeypatch):
    """The CPU path writes a tensor's chunks straight into the parameter; a failure after its
    first chunk has been written puts that tensor back too (from the loaded state and from an
    applied recipe)."""
    from mergehub.merge import tensors

    store, _ = hub
    monkeypatch.setattr(compose, "TensorMerger",
                        functools.partial(tensors.TensorMerger, chunk_elements=64))
    chunked = tensors.TensorMerger._chunked

    def failing(self, spec):
        for i, part in enumerate(chunked(self, spec)):
            if i == 1 and spec.name.endswith("layers.1.mlp.up_proj.weight") \
                    and self.plan.recipe.merge_method == "task_arithmetic":
                raise ValueError("disk on fire")
            yield part

    monkeypatch.setattr(tensors.TensorMerger, "_chunked", failing)
    model = mergehub.load("base", store)
    composer = Composer(model)
    for applied in (None, recipe("ties", [("mlp", {"density": 0.4})])):
        if applied:
            composer.apply(applied)
        before = snapshot(model)
        with pytest.raises(mergehub.merge.plan.MergeError, match="disk on fire"):
            composer.apply(recipe("task_arithmetic", [("mlp", {}), ("attn", {})]))
        assert_same(model, before)


def test_applied_restores_on_exit_and_on_error(hub, tmp_path):
    store, _ = hub
    model = mergehub.load("base", store)
    composer = Composer(model)
    loaded = snapshot(model)
    outer = recipe("ties", [("mlp", {"density": 0.3})])
    inner = recipe("dare_ties", [("attn", {"density": 0.5}), ("lora", {"density": 0.5})])
    with composer.applied(inner) as active:
        assert active.merge_method == "dare_ties"
        assert_holds(model, hub_merge(inner, store, tmp_path))
    assert_same(model, loaded) and composer.active is None
    composer.apply(outer)
    after_outer, active = snapshot(model), composer.active
    with pytest.raises(RuntimeError, match="boom"):
        with composer.applied(inner):
            raise RuntimeError("boom")
    assert_same(model, after_outer)
    assert composer.active == active


def test_active_describes_the_recipe(hub):
    store, paths = hub
    composer = Composer(mergehub.load("base", store))
    active = composer.apply({"merge_method": "task_arithmetic",
                             "models": [{"model": "mlp-bit1", "parameters": {"weight": 0.5}},
                                        {"model": str(paths["ft-attn"])}]})
    assert active.base == "base" and active.merge_method == "task_arithmetic"
    assert active.inputs == [{"model": "mlp-bit1", "fingerprint": store.fingerprint("mlp-bit1")},
                             {"model": str(paths["ft-attn"]), "fingerprint": None}]
    assert "base_model: base" in active.recipe and active.tensors == 21


def test_errors_are_one_line_and_change_nothing(hub, tmp_path):
    store, paths = hub
    model = mergehub.load("base", store)
    composer = Composer(model)
    composer.apply(recipe("task_arithmetic", [("mlp", {})]))
    before = snapshot(model)
    cases = [
        (recipe("ties", [("nope", {})]), InputError, "input 'nope' is neither a local path nor a "
                                                     "model in store"),
        (recipe("ties", [("other-ft", {})]), BaseMismatchError,
         "<recipe>:4: input 'other-ft' was added to the store against base 'other-base'"),
        (recipe("ties", [(str(paths["ft-mlp"]), {})], base="other-base"), BaseMismatchError,
         "base_model 'other-base' is not this composer's base 'base'"),
        (recipe("ties", [("mlp", {})], {"densty": 0.2}), RecipeError,
         r"<recipe>:5: unknown parameter 'densty'"),
        (recipe("task_arithmetic", [("mlp", {})], extra="out_dtype: float32\n"), InputError,
         "the recipe writes torch.float32 but the model holds torch.bfloat16"),
        (recipe("rmm", [("mlp", {}), ("attn", {})]), InputError, "rmm writes a basis"),
    ]
    for text, error, message in cases:
        with pytest.raises(error, match=message) as info:
            composer.apply(text)
        assert "\n" not in str(info.value)
        assert_same(model, before)
    wide = make_tiny_llama(tmp_path / "wide", seed=1)
    cfg = mergehub.loading._config((wide / "config.json").read_bytes(), "wide")
    cfg.intermediate_size = 96
    import transformers

    other = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with pytest.raises(BaseMismatchError, match=r"mlp\.down_proj\.weight' has shape \[64, 128\] "
                                                r"but the model has \[64, 96\]"):
        Composer(other, store, base="base").apply(recipe("task_arithmetic", [("mlp", {})]))


# --- load -------------------------------------------------------------------------------------


def _from_pretrained(path: Path, cls=None):
    import transformers

    cls = cls or transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype="auto").eval()


def _assert_same_model(model, reference, inputs=IDS) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name].cpu(), t), name
    assert not model.training
    with torch.no_grad():
        out, ref = model(inputs), reference(inputs)
    key = "logits" if "logits" in ref else "last_hidden_state"
    assert torch.equal(out[key].cpu(), ref[key])


def test_load_entries_and_dirs(hub, tmp_path):
    """A base, a fine-tune and a compressed entry from the store, and a model dir, load as
    from_pretrained loads the same files (an exported compressed entry: its decoded weights);
    a LoRA entry as from_pretrained of hub merge's task arithmetic output; Store.load_model is
    the same."""
    store, paths = hub
    _assert_same_model(mergehub.load("base", store), _from_pretrained(paths["base-bf16"]))
    _assert_same_model(store.load_model("mlp"), _from_pretrained(paths["ft-mlp"]))
    _assert_same_model(mergehub.load(str(paths["ft-attn"])), _from_pretrained(paths["ft-attn"]))
    exported = store.export("attn-compeft", tmp_path / "compeft", progress=False)
    _assert_same_model(mergehub.load("attn-compeft", store), _from_pretrained(exported))
    merged = tmp_path / "lora-merged"
    mergehub.merge(recipe("task_arithmetic", [("lora", {})]), out=merged, store=store,
                   output_format="hf", progress=False, echo=lambda line: None)
    lora = mergehub.load("lora", store)
    _assert_same_model(lora, _from_pretrained(merged))
    assert lora.mergehub_source.name == "lora" and lora.mergehub_source.base == "base"
    with pytest.raises(InputError, match="a PEFT adapter dir"):
        mergehub.load(str(paths["lora"]))
    with pytest.raises(InputError, match="'nope' is neither a local path nor a model in store"):
        mergehub.load("nope", store)
    # the store as its root directory (str or Path), as the Composer takes it, for load and merge
    _assert_same_model(mergehub.load("mlp", str(store.root)), _from_pretrained(paths["ft-mlp"]))
    by_path = tmp_path / "lora-merged-by-path"
    mergehub.merge(recipe("task_arithmetic", [("lora", {})]), out=by_path, store=store.root,
                   output_format="hf", progress=False, echo=lambda line: None)
    _assert_same_model(_from_pretrained(by_path), _from_pretrained(merged))
    with pytest.raises(StoreError, match="no mergehub store at"):
        mergehub.load("mlp", tmp_path / "not-a-store")


def _perturbed(cls, config, out: Path, seed: int = 0, pattern: str | None = None) -> Path:
    """A randomly initialized model (``pattern``: then its tensors containing ``pattern``
    perturbed, as a fine-tune), saved with save_pretrained."""
    torch.manual_seed(seed)
    model = cls(config)
    if pattern:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if pattern in name:
                    p.add_(torch.randn_like(p) * 0.05 * p.std())
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2", "bert"])
def test_real_configurations(hub, tmp_path, arch):
    """Tied embeddings (Llama with tie_word_embeddings, GPT-2), biases and Conv1D (GPT-2), an
    encoder with dropout (BERT, loaded in eval mode): load equals from_pretrained, a TIES
    apply equals hub merge and equals from_pretrained of hub merge's output as a model
    (so the tied head follows the merged embedding), reset returns the loaded model."""
    import transformers

    store, _ = hub
    if arch == "llama-tied":
        cls = transformers.LlamaForCausalLM
        config = transformers.LlamaConfig(**mergehub.hub.demo.TINY_LLAMA, tie_word_embeddings=True)
    elif arch == "gpt2":
        cls = transformers.GPT2LMHeadModel
        config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                         n_head=2)
    else:
        cls = transformers.BertModel
        config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=48,
                                         max_position_embeddings=32, hidden_dropout_prob=0.3)
    ids = IDS % 64
    base = _perturbed(cls, config, tmp_path / "base")
    fts = [_perturbed(cls, config, tmp_path / f"ft{i}", seed=i + 1, pattern=p)
           for i, p in enumerate(("mlp" if arch != "bert" else "intermediate", "embed"
                                  if arch != "gpt2" else "wte"))]
    prefix = f"{arch}-"
    store.add(base, prefix + "base", progress=False)
    for i, ft in enumerate(fts):
        store.add(ft, f"{prefix}ft{i}", base=prefix + "base", progress=False)
    model = mergehub.load(prefix + "base", store)
    _assert_same_model(model, _from_pretrained(base, cls), ids)
    loaded = snapshot(model)
    text = recipe("ties", [(f"{prefix}ft0", {"density": 0.5}), (f"{prefix}ft1", {"density": 0.5})],
                  base=prefix + "base")
    composer = Composer(model)
    composer.apply(text)
    assert_holds(model, hub_merge(text, store, tmp_path))
    out = tmp_path / "merged"
    mergehub.merge(text, out=out, store=store, progress=False, echo=lambda line: None)
    _assert_same_model(model, _from_pretrained(out, cls), ids)
    composer.reset()
    assert_same(model, loaded)


def test_load_with_another_head_initializes_what_is_missing(hub, tmp_path):
    """A bare BERT checkpoint into BertForSequenceClassification (model_class): the encoder's
    tensors are matched through base_model_prefix and the classifier is initialized and
    reported, as from_pretrained does."""
    import transformers

    store, _ = hub
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=48)
    base = _perturbed(transformers.BertModel, config, tmp_path / "bert")
    store.add(base, "bert-bare", progress=False)
    with pytest.warns(UserWarning, match="classifier.weight"):
        model = mergehub.load("bert-bare", store,
                              model_class=transformers.BertForSequenceClassification)
    assert sorted(model.mergehub_source.missing) == ["classifier.bias", "classifier.weight"]
    assert float(model.classifier.weight.std()) > 0 and model.classifier.weight.isfinite().all()
    bare = _from_pretrained(base, transformers.BertModel)
    for name, t in bare.state_dict().items():
        assert torch.equal(model.state_dict()[f"bert.{name}"], t), name


# --- unmerged adapters ------------------------------------------------------------------------


def test_attach_and_merge_attached(hub, tmp_path):
    """attach goes through peft: the attached model computes what PeftModel.from_pretrained of
    the adapter dir computes, set_adapter / disable_adapter / mixed batches / delete_adapter
    work; merge_attached folds adapters with a mergehub method into exactly hub merge's
    weights and removes the LoRA layers; reset returns the base."""
    from peft import PeftModel

    store, paths = hub
    model = mergehub.load("base", store)
    loaded = snapshot(model)
    composer = Composer(model)
    peft_model = composer.attach("lora")
    composer.attach("lora-qo", adapter_name="qo")
    # the reference's adapter names hold no "lora" (PEFT warns about those)
    reference = PeftModel.from_pretrained(_from_pretrained(paths["base-bf16"]), paths["lora"],
                                          adapter_name="first")
    reference.load_adapter(paths["lora-qo"], adapter_name="second")
    with torch.no_grad():
        for name, theirs in (("lora", "first"), ("qo", "second")):
            peft_model.set_adapter(name)
            reference.set_adapter(theirs)
            assert torch.equal(peft_model(IDS).logits, reference(IDS).logits), name
        with peft_model.disable_adapter():
            plain = peft_model(IDS).logits
        assert torch.equal(plain, _from_pretrained(paths["base-bf16"])(IDS).logits)
        mixed = peft_model(IDS, adapter_names=["lora", "qo"]).logits
        reference.set_adapter("first")
        first = reference(IDS).logits
        reference.set_adapter("second")
        second = reference(IDS).logits
        # PEFT computes each adapter's rows as a sub-batch: equal up to float rounding
        torch.testing.assert_close(mixed[0], first[0], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(mixed[1], second[1], rtol=1e-2, atol=1e-2)
        assert not torch.allclose(first[1], second[1], rtol=1e-2, atol=1e-2)
    with pytest.raises(InputError, match="already attached"):
        composer.attach("lora")
    with pytest.raises(InputError, match="is a finetune \\(hf\\), not a PEFT adapter"):
        composer.attach("mlp")
    store.add(paths["lora"], "lora-other", base="other-base", progress=False)
    with pytest.raises(BaseMismatchError, match="stored against base 'other-base'"):
        composer.attach("lora-other")
    active = composer.merge_attached("ties", {"lora": {"weight": 1.0}, "qo": {"weight": 0.5}},
                                     model_parameters={"density": 0.5})
    assert active.merge_method == "ties" and composer.peft_model is None
    assert not any("lora" in n for n, _ in model.named_modules())
    text = recipe("ties", [("lora", {"density": 0.5, "weight": 1.0}),
                           ("lora-qo", {"density": 0.5, "weight": 0.5})])
    assert_holds(model, hub_merge(text, store, tmp_path))
    composer.reset()
    assert_same(model, loaded)


def test_merge_attached_some_keeps_the_others(hub, tmp_path):
    store, _ = hub
    composer = Composer(mergehub.load("base", store))
    peft_model = composer.attach("lora")
    composer.attach("lora-qo")
    composer.merge_attached("task_arithmetic", ["lora_qo"])
    assert list(composer.attached) == ["lora"] and list(peft_model.peft_config) == ["lora"]
    text = recipe("task_arithmetic", [("lora-qo", {})])
    assert_holds(composer.model, hub_merge(text, store, tmp_path))


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's "Compose in Python" example, as written."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## Compose in Python", 1)[1].split("```python\n", 1)[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, "README.md", "exec"), {})


# --- on a GPU ---------------------------------------------------------------------------------

GPU_METHODS = ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "consensus_ties",
               "linear"]


@pytest.mark.gpu
@pytest.mark.parametrize("method", GPU_METHODS)
def test_gpu_apply_equals_hub_merge(hub, tmp_path, method):
    """On CUDA (fused kernels for dense inputs, compressed entries decoded on the GPU, chunked
    torch ops with LoRAs), the composed model holds what ``hub merge --device cuda`` writes,
    cold and warm (the warm apply's merges launched together, kernels.MergeBatch)."""
    store, paths = hub
    model = mergehub.load("base", store, device="cuda")
    assert next(model.parameters()).is_cuda
    before = snapshot(model)
    composer = Composer(model)
    sets = dict(INPUT_SETS, dense=lambda p: ["mlp", "attn-compeft", "mlp-bit1"],
                dense_tall=lambda p: ["mlp-tall", "attn-tall", "mlp-lowrank"])
    for refs in sets.values():
        per_model, params = METHODS[method]
        inputs = [(ref, {**per_model, "weight": w}) for ref, w in zip(refs(paths), (1.0, 0.6, 0.3))]
        text = recipe(method, inputs, params)
        want = hub_merge(text, store, tmp_path, device="cuda", seed=5)
        composer.apply(text, seed=5)
        assert_holds(model, want)
        for _ in range(2):  # warm: the fused merges launched as one batch, then replayed
            composer.reset()
            composer.apply(text, seed=5)
            assert_holds(model, want)
    text = recipe("ties", [("mlp", {"density": 0.3}), ("attn", {"density": 0.4})],
                  {"trim_scope": "global"})
    composer.apply(text)
    assert_holds(model, hub_merge(text, store, tmp_path, device="cuda"))
    composer.reset()
    assert_same(model, before)


@pytest.mark.gpu
def test_gpu_load_attach_and_failure(hub, tmp_path):
    """Loading on CUDA gives the CPU load's weights (lowrank and a LoRA's B·A: products on the
    GPU, within one bf16 step); attach and merge_attached on CUDA; a failing apply changes
    nothing."""
    store, paths = hub
    for name in ("base", "mlp", "mlp-bit1", "attn-compeft", "mlp-tall"):
        gpu, cpu = mergehub.load(name, store, device="cuda"), mergehub.load(name, store)
        for key, t in cpu.state_dict().items():
            assert torch.equal(gpu.state_dict()[key].cpu(), t), (name, key)
    for name in ("mlp-lowrank", "lora"):  # a GPU matmul sums in another order
        gpu, cpu = mergehub.load(name, store, device="cuda"), mergehub.load(name, store)
        for key, t in cpu.state_dict().items():
            torch.testing.assert_close(gpu.state_dict()[key].cpu().float(), t.float(),
                                       rtol=2**-7, atol=1e-6)
    model = mergehub.load("base", store, device="cuda")
    composer = Composer(model)
    composer.attach("lora")
    composer.attach("lora-qo")
    composer.merge_attached("ties", model_parameters={"density": 0.5})
    text = recipe("ties", [("lora", {"density": 0.5}), ("lora-qo", {"density": 0.5})])
    assert_holds(model, hub_merge(text, store, tmp_path, device="cuda"))
    before = snapshot(model)
    with pytest.raises(mergehub.merge.plan.MergeError, match="sum to 0"):
        composer.apply(recipe("linear", [("mlp", {"weight": "[1.0, 1.0]"}),
                                         ("attn", {"weight": "[1.0, -1.0]"})]))
    assert_same(model, before)


def test_warm_apply_finds_trims_without_a_selection_pass(hub, tmp_path, monkeypatch):
    """On the fused path (the GPU's; here with the torch references), a warm apply of the same
    TIES recipe takes each input's trim from the composer's CutMemo: no magnitude_cuts call,
    and still hub merge's bits. Without a cache the inputs are new tensors: trims are found
    again."""
    from mergehub.kernels import selection
    from mergehub.merge import tensors

    store, _ = hub
    monkeypatch.setattr(compose, "TensorMerger", functools.partial(tensors.TensorMerger, fused=True))
    calls = []
    real = selection.magnitude_cuts
    monkeypatch.setattr(selection, "magnitude_cuts",
                        lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    text = recipe("ties", [("mlp", {"density": 0.3}), ("attn-compeft", {"density": 0.5})],
                  {"lambda": 0.9})
    want = hub_merge(text, store, tmp_path)
    for budget, again in ((None, False), (0, True)):
        model = mergehub.load("base", store)
        composer = Composer(model, cache_bytes=budget)
        composer.apply(text)
        assert calls
        calls.clear()
        composer.reset()
        composer.apply(text)
        assert bool(calls) == again
        assert_holds(model, want)
        calls.clear()


def test_cut_memo_never_serves_a_changed_or_new_tensor():
    """CutMemo equals magnitude_cuts; an in-place change of an input (its version counter
    moves) or another tensor object with the same values is selected again."""
    from mergehub import kernels

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 33, generator=gen).to(torch.bfloat16)
    thetas = [base + torch.randn(64, 33, generator=gen).to(torch.bfloat16) * 0.01
              for _ in range(3)]
    memo = kernels.CutMemo()
    densities = [0.2, 0.5, 1.0]
    first = memo(base, thetas, densities, ties="index", name="w")
    assert first == kernels.magnitude_cuts(base, thetas, densities, ties="index", name="w")
    assert memo(base, thetas, densities, ties="index", name="w") == first
    thetas[0].mul_(-3)  # in place: the memo must not serve the old cut
    changed = memo(base, thetas, densities, ties="index", name="w")
    assert changed == kernels.magnitude_cuts(base, thetas, densities, ties="index", name="w")
    assert changed[0] != first[0] and changed[1:] == first[1:]
    other = thetas[1].clone().mul_(2)  # a new object: selected, not taken from memory
    assert memo(base, [other], [0.5], ties="index", name="w") == kernels.magnitude_cuts(
        base, [other], [0.5], ties="index", name="w")


def test_global_trim_applied_again_after_another_recipe(hub, tmp_path):
    """A recipe whose trim is global (consensus_ties' default) applied, then another, then the
    first again (its plan remembered, its tensors merged anew): each time what ``hub merge``
    writes. The remembered method must not count the inputs' magnitudes a second time."""
    store, _ = hub
    model = mergehub.load("base", store)
    composer = Composer(model)
    first = recipe("consensus_ties", [("mlp", {}), ("attn", {"weight": 0.7})], {"k": 1})
    other = recipe("task_arithmetic", [("mlp", {}), ("attn", {})])
    want = hub_merge(first, store, tmp_path)
    composer.apply(first)
    assert_holds(model, want)
    composer.apply(other)
    composer.apply(first)
    assert_holds(model, want)
