"""Multi-model codecs (TALL, RMM) through their shared interface: entries written in the layouts
stored before the interface existed still read and export bit for bit, and a new codec is one
module (docs/architecture.md's worked example, run as written)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from click.testing import CliRunner
from safetensors.torch import save_file

from mergehub.errors import StoreError
from mergehub.hub.cli import cli
from mergehub.merge.rmm import revert
from mergehub.storage.checkpoint import open_checkpoint
from mergehub.storage.blob_format import BlobHeader, sha256
from mergehub.storage.lossy_blobs import decode_blob
from mergehub.storage.codecs import LOSSY
from mergehub.storage.codecs.multi import (MULTI, Encoded, MultiCodec, bundle_parts,
                                           bundle_task, register)
from mergehub.storage.codecs.rmm import decompose_factors
from mergehub.storage.store import Store

DENSE = "model.layers.0.self_attn.q_proj.weight"  # 64 x 64
FACTORED = "model.layers.1.mlp.down_proj.weight"  # 64 x 128
TASKS = ["math", "code", "chat"]


def _eighths(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Multiples of 1/8 in [-1/2, 1/2]: sums of a few products of these and small integers
    are exact in float32, so the oracle below is exact too."""
    return torch.randint(-4, 5, shape, generator=gen).float() / 8


@pytest.fixture
def old_rmm(models, tmp_path):
    """A reversible-merge entry in the layout ``hub merge --to-store`` wrote before the codec
    interface: written here directly (a safetensors file of ``X::basis``/``X::coef`` and
    ``X::left``/``X::left_coef``/``X::right``/``X::right_coef`` tensors, ``rmm.json`` naming
    the tasks and the base by its store name, and the base's config)."""
    gen = torch.Generator().manual_seed(0)
    parts = {f"{DENSE}::basis": _eighths(gen, 2, 64, 64),
             f"{DENSE}::coef": torch.randint(-3, 4, (3, 2), generator=gen).float(),
             f"{FACTORED}::left": _eighths(gen, 2, 64, 2),
             f"{FACTORED}::left_coef": torch.randint(-2, 3, (3, 2), generator=gen).float(),
             f"{FACTORED}::right": _eighths(gen, 2, 2, 128),
             f"{FACTORED}::right_coef": torch.randint(-2, 3, (3, 2), generator=gen).float()}
    folder = tmp_path / "old-rmm"
    folder.mkdir()
    save_file(parts, folder / "model.safetensors")
    shutil.copy(models["base-fp32"] / "config.json", folder / "config.json")
    (folder / "rmm.json").write_text(json.dumps(
        {"format": "mergehub-rmm", "version": 2, "m": 2, "basis": "factors", "tasks": TASKS,
         "base_model": "base", "tensors": 2, "factored_tensors": 1}, indent=2) + "\n")
    with Store.init(tmp_path / "store") as store:
        store.add(models["base-fp32"], "base", progress=False)
        store.add(folder, "old", kind="merged", progress=False)
        yield store, {k: v.numpy().astype(np.float64) for k, v in parts.items()}


def test_an_rmm_entry_of_the_old_layout_exports_each_task(old_rmm, models, tmp_path):
    store, parts = old_rmm
    base = open_checkpoint(models["base-fp32"])
    runner = CliRunner()
    for i, task in enumerate(TASKS):
        out = tmp_path / f"task{i}"
        res = runner.invoke(cli, ["--store", str(store.root), "export", "old", "--task",
                                  task if i else "0", "-o", str(out)])
        assert res.exit_code == 0, res.output
        want = {DENSE: np.tensordot(parts[f"{DENSE}::coef"][i], parts[f"{DENSE}::basis"], 1),
                FACTORED: np.tensordot(parts[f"{FACTORED}::left_coef"][i],
                                       parts[f"{FACTORED}::left"], 1)
                @ np.tensordot(parts[f"{FACTORED}::right_coef"][i], parts[f"{FACTORED}::right"], 1)}
        got = open_checkpoint(out)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        assert [s.name for s in got.specs()] == [s.name for s in base.specs()]
        for spec in base.specs():
            theta0 = base.load(spec.name).numpy()
            expected = (theta0.astype(np.float64) + want[spec.name]).astype(np.float32) \
                if spec.name in want else theta0
            assert got.load(spec.name).numpy().tobytes() == expected.tobytes(), (task, spec.name)
        # the Python name kept for it writes the same bytes
        again = revert(store, "old", task, tmp_path / f"again{i}", progress=False)
        assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    res = runner.invoke(cli, ["--store", str(store.root), "export", "old", "--task", "3", "-o",
                              str(tmp_path / "none")])
    assert res.exit_code == 2 and "its tasks are 0: 'math', 1: 'code', 2: 'chat'" in res.output
    res = runner.invoke(cli, ["--store", str(store.root), "export", "base", "--task", "0", "-o",
                              str(tmp_path / "none")])
    assert res.exit_code == 2 and "'base' is not a reversible merge (no rmm.json)" in res.output


def test_a_tall_blob_of_the_old_layout_decodes():
    """A task blob written by hand as ``compress_tall`` wrote them before the interface (header
    shape, lambda, alpha, kept, needs; payload the zstd-compressed np.packbits of the mask)
    decodes to θ0 + alpha·(m ⊙ τMTL)."""
    base = np.array([0.5, -0.25, 0.125, 0.0, 1.0, -1.5, 0.75, 2.0, -0.5], np.float32)
    mtl = np.array([0.25, 0.5, -0.75, 1.0, -0.125, 0.0, 0.5, -2.0, 0.25], np.float32)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0], bool)
    expected = base + np.float32(2.0) * np.where(mask, mtl, np.float32(0))
    header = BlobHeader("tall", "F32", expected.nbytes, sha256(expected.tobytes()), "b" * 64,
                        {"shape": [9], "lambda": 0.4, "alpha": 2.0, "kept": 5,
                         "needs": {"mtl": "m" * 64}})
    payload = zstandard.ZstdCompressor(level=3).compress(np.packbits(mask).tobytes())
    got = decode_blob(header, memoryview(payload), base.tobytes(), {"mtl": mtl.tobytes()})
    assert got == expected.tobytes()


@pytest.mark.parametrize("codec", ["tall", "rmm"])
def test_every_codec_round_trips_through_the_interface(codec):
    """encode then decode per task: TALL gives alpha·(mt ⊙ Στ) with the masks of the paper's
    rule; RMM with m = T gives every τt back (to float32); the bundle layout's stacking of
    codes is undone by bundle_task."""
    gen = torch.Generator().manual_seed(3)
    taus = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    multi = MULTI[codec]
    params = [{**multi.defaults, "m": 3} if codec == "rmm" else {**multi.defaults, "lambda": lam}
              for lam in (0.2, 0.4, 0.6)]
    encoded = multi.encode(taus, params)
    for t, (tau, p) in enumerate(zip(taus, params)):
        got = multi.decode(encoded.shared, encoded.codes[t], p).reshape(tau.shape)
        if multi.layout == "bundle":
            shared, code = bundle_task(multi, bundle_parts(encoded), t)
            assert torch.equal(multi.decode(shared, code, p).reshape(tau.shape), got)
        if codec == "tall":
            mtl = taus[0] + taus[1] + taus[2]
            keep = tau.abs() > p["lambda"] * (mtl - tau).abs()
            # TALL's reconstruction is θ0 + mt ⊙ τMTL: the default alpha scales by 1
            assert torch.equal(got, torch.where(keep, mtl, torch.zeros(())))
        else:
            assert torch.allclose(got, tau, atol=1e-5)


def test_the_worked_example_of_a_new_multi_codec_compresses(models, tmp_path, monkeypatch):
    """docs/architecture.md's example multi-model codec, as written there, registers, is listed
    by ``hub compress --help`` and is reached by ``hub compress A B --codec meanscale``; its
    entries export θ0 + st·τ̄."""
    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    code = text.split("# mergehub/storage/codecs/meanscale.py\n", 1)[1].split("```", 1)[0]
    monkeypatch.setitem(MULTI, "meanscale", None)  # both registrations are undone after
    monkeypatch.setitem(LOSSY, "meanscale", None)
    exec(compile(code, "meanscale.py", "exec"), {"__name__": "meanscale"})  # noqa: S102
    with Store.init(tmp_path / "store") as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["ft-mlp"], "mlp", base="base", progress=False)
        store.add(models["ft-attn"], "attn", base="base", progress=False)
        res = CliRunner().invoke(cli, ["--store", str(store.root), "compress", "mlp", "attn",
                                       "--codec", "meanscale"])
        assert res.exit_code == 0 and "compressed 'attn-meanscale'" in res.output, res.output
        assert "meanscale" in store.show("mlp-meanscale").codecs
        # --codec's help lists the registered codecs by kind, the new one too
        shown = " ".join(CliRunner().invoke(cli, ["compress", "--help"],
                                            terminal_width=1000).output.split())
        assert ("Two or more fine-tunes of one base together (NAMES A B ...): meanscale: the "
                "tasks' mean task vector + one scale per task; tall: shared multi-task vector "
                "+ one bitmask per task (TALL masks).") in shown, shown
        assert "One fine-tune at a time: bit1: " in shown and "; lowrank: truncated" in shown
        assert "Not this command's: rmm (a reversible merge writes it: `hub merge` with " \
            "merge_method rmm)." in shown
        with pytest.raises(StoreError, match="'rmm' is not a multi-model codec that stores an "
                                             "entry per task"):
            store.compress_multi(["mlp", "attn"], "rmm")
        res = CliRunner().invoke(cli, ["--store", str(store.root), "compress", "mlp",
                                       "--codec", "meanscale"])
        assert res.exit_code == 2 and "two or more different fine-tunes" in res.output
        base = open_checkpoint(models["base-bf16"])
        fts = [open_checkpoint(models[k]) for k in ("ft-mlp", "ft-attn")]
        outs = [open_checkpoint(store.export(f"{n}-meanscale", tmp_path / n, progress=False))
                for n in ("mlp", "attn")]
    changed = 0
    for spec in base.specs():
        theta0 = base.load(spec.name).double()
        taus = [ft.load(spec.name).double() - theta0 for ft in fts]
        mean = (taus[0] + taus[1]) / 2
        for tau, out in zip(taus, outs):
            got = out.load(spec.name)
            if not mean.any():
                assert torch.equal(got, base.load(spec.name))
                continue
            want = theta0 + float((tau * mean).sum() / (mean * mean).sum()) * mean
            assert torch.allclose(got.double(), want, rtol=1 / 64, atol=1e-6), spec.name
            changed += 1
    assert changed > 0


def test_rmm_factor_form_splits_into_shared_factors_and_per_task_coefficients():
    """The factor form (LoRA inputs): in the bundle layout the left and right bases are shared
    and each task's two coefficient rows are its code; decoding is (Σj c^L_tj L^j) @
    (Σj c^R_tj R^j), checked on a hand-computed example, and with m = T every adapter's
    τt = Lt·Rt comes back (adapters of different ranks, zero-padded)."""
    rmm = MULTI["rmm"]
    # hand-computed: L^1 = [1, 0]ᵀ, L^2 = [0, 2]ᵀ, R^1 = [1, 1], R^2 = [0, 3]
    left, right = torch.tensor([[[1.0], [0.0]], [[0.0], [2.0]]]), torch.tensor([[[1.0, 1.0]],
                                                                               [[0.0, 3.0]]])
    codes = [{"left_coef": torch.tensor([1.0, 1.0]), "right_coef": torch.tensor([2.0, -1.0])},
             {"left_coef": torch.tensor([0.0, -1.0]), "right_coef": torch.tensor([0.0, 1.0])}]
    parts = bundle_parts(Encoded({"left": left, "right": right}, codes))
    assert sorted(parts) == ["left", "left_coef", "right", "right_coef"]
    assert parts["left_coef"].shape == (2, 2) and torch.equal(parts["left"], left)
    # task 0: [1, 2]ᵀ @ [2, -1]; task 1: [0, -2]ᵀ @ [0, 3]
    want = [torch.tensor([[2.0, -1.0], [4.0, -2.0]]), torch.tensor([[0.0, 0.0], [0.0, -6.0]])]
    for t in range(2):
        shared, code = bundle_task(rmm, parts, t)
        assert sorted(shared) == ["left", "right"] and sorted(code) == ["left_coef", "right_coef"]
        assert torch.equal(rmm.decode(shared, code, {}), want[t])
    # m = T rebuilds each τt = Lt·Rt (the paper's exact case)
    gen = torch.Generator().manual_seed(4)
    factors = [(torch.randn(6, r, generator=gen), torch.randn(r, 5, generator=gen))
               for r in (2, 1, 3)]
    parts = bundle_parts(decompose_factors(factors).encoded())
    assert parts["left"].shape == (3, 6, 3) and parts["right"].shape == (3, 3, 5)
    for t, (lt, rt) in enumerate(factors):
        shared, code = bundle_task(rmm, parts, t)
        assert torch.allclose(rmm.decode(shared, code, {}), lt @ rt, atol=1e-5)


class _Stub(MultiCodec):
    """An ``entries`` codec for the store's side of the interface: shared ``mean`` (the mean
    task vector, or a broken form of it), no per-task code; it records how many task vectors
    each ``encode`` got."""

    name = "stub"
    summary = "test stub"
    layout = "entries"

    def __init__(self, broken: str = "") -> None:
        self.broken, self.calls = broken, []

    def encode(self, taus, params):
        self.calls.append(len(taus))
        mean = sum(taus) / len(taus)
        shared = {"": mean, "float64": mean.double(),
                  "longer": torch.cat([mean.reshape(-1), torch.zeros(1)])}[self.broken]
        return Encoded({"mean": shared}, [{} for _ in taus])

    def decode(self, shared, code, params):
        return shared["mean"].reshape(-1)[:math.prod(params["shape"])].float()

    def pack(self, code, params, shape):
        return {"shape": list(shape)}, b""

    def unpack(self, payload, params):
        return {}


@pytest.fixture
def two_finetunes(models, tmp_path, monkeypatch):
    """A store with a base and two fine-tunes that change different tensors (mlp, attn); the
    stub codec's registrations are undone after the test."""
    monkeypatch.setitem(MULTI, "stub", None)
    monkeypatch.setitem(LOSSY, "stub", None)
    with Store.init(tmp_path / "store") as store:
        store.add(models["base-bf16"], "base", progress=False)
        store.add(models["ft-mlp"], "mlp", base="base", progress=False)
        store.add(models["ft-attn"], "attn", base="base", progress=False)
        yield store


@pytest.mark.parametrize("broken", ["float64", "longer"])
def test_compress_multi_refuses_a_shared_tensor_readers_cannot_read(two_finetunes, models,
                                                                    broken):
    """A shared tensor is stored as the tensor's float32 numbers (what reads expect): another
    dtype or size is refused when written, naming the codec, the tensor and the problem, and
    nothing is added."""
    register(_Stub(broken))
    with pytest.raises(StoreError) as caught:
        two_finetunes.compress_multi(["mlp", "attn"], "stub", progress=False)
    found = re.fullmatch(r"codec 'stub', tensor '([^']+)': shared tensor 'mean' is (\w+) of "
                         r"(\d+) numbers; a multi-model codec's must be float32 of the "
                         r"tensor's (\d+)", str(caught.value))
    assert found, caught.value
    numel = open_checkpoint(models["base-bf16"]).load(found[1]).numel()
    assert found.groups()[1:] == (("float64", str(numel), str(numel)) if broken == "float64"
                         else ("float32", str(numel + 1), str(numel)))
    assert sorted(i.name for i in two_finetunes.ls()) == ["attn", "base", "mlp"]


def test_compress_multi_encodes_only_the_tasks_that_change_a_tensor(two_finetunes, models):
    """A task whose tensor is the base's keeps the base's blob and is not given to the codec:
    the mlp and attn fine-tunes change different tensors, so every encode gets one task
    vector, and the mean it stores is that task's own: export gives each fine-tune back."""
    stub = register(_Stub())
    two_finetunes.compress_multi(["mlp", "attn"], "stub", progress=False)
    assert stub.calls and set(stub.calls) == {1}
    for name, key in (("mlp", "ft-mlp"), ("attn", "ft-attn")):
        assert two_finetunes.show(f"{name}-stub").codecs.get("stub")
        out = open_checkpoint(two_finetunes.export(f"{name}-stub", Path(two_finetunes.root).parent
                                                   / name, progress=False))
        ft = open_checkpoint(models[key])
        for spec in ft.specs():
            assert torch.equal(out.load(spec.name), ft.load(spec.name)), spec.name


def test_tall_store_entries_are_the_papers_reconstruction(models, tmp_path):
    """``compress_tall`` with the default parameters (λ 0.4, alpha 1) where some tasks do not
    change a tensor: each task's export is, exactly, θ0 + mt ⊙ τMTL with τMTL = Σt τt over all
    tasks and mt = |τt| > λ·|τMTL − τt| (TALL, Wang et al. 2024), in float32 then the
    tensor's dtype; a task that leaves a tensor alone has the base's."""
    keys = ["ft-mlp", "ft-attn", "ft-sharded"]
    with Store.init(tmp_path / "store") as store:
        store.add(models["base-bf16"], "base", progress=False)
        for key in keys:
            store.add(models[key], key, base="base", progress=False)
        store.compress_tall(keys, progress=False)
        outs = [open_checkpoint(store.export(f"{k}-tall", tmp_path / k, progress=False))
                for k in keys]
    base = open_checkpoint(models["base-bf16"])
    fts = [open_checkpoint(models[k]) for k in keys]
    partial = 0
    for spec in base.specs():
        theta0 = base.load(spec.name).float().numpy()
        taus = [ft.load(spec.name).float().numpy() - theta0 for ft in fts]
        mtl = taus[0] + taus[1] + taus[2]
        partial += any(not tau.any() for tau in taus) and any(tau.any() for tau in taus)
        for tau, out, ft in zip(taus, outs, fts):
            got = out.load(spec.name)
            if not tau.any():
                assert torch.equal(got, ft.load(spec.name)), spec.name
                continue
            keep = np.abs(tau) > np.float32(0.4) * np.abs(mtl - tau)
            want = torch.from_numpy(theta0 + np.where(keep, mtl, np.float32(0)))
            assert torch.equal(got, want.to(got.dtype)), spec.name
    assert partial > 0  # the case the store skips: some tasks change the tensor, some do not


def test_a_single_entry_compress_with_a_multi_model_codec_says_what_stores_with_it(
        two_finetunes):
    """``Store.compress`` with ``rmm`` or ``tall``, ``hub compress NAME --codec rmm``: one line
    saying it is a multi-model codec and what writes it, as the caller spells it (exit 2 on the
    CLI)."""
    store = two_finetunes
    rmm_python = ("rmm is a multi-model codec whose entries only a reversible merge writes: a "
                  "recipe with merge_method rmm, stored with mergehub.merge(RECIPE, "
                  "store=store, to_store=NAME)")
    tall_python = ("tall is a multi-model codec: it compresses two or more fine-tunes of one "
                   "base together; use Store.compress_tall([A, B, ...])")
    for codec, message in (("rmm", rmm_python), ("tall", tall_python)):
        with pytest.raises(StoreError) as caught:
            store.compress("mlp", codec, progress=False)
        assert str(caught.value) == message
    with pytest.raises(ValueError) as caught:  # the tall blob's encoder alone says the same
        LOSSY["tall"].encode(torch.zeros(2), torch.zeros(2), dict(LOSSY["tall"].defaults))
    assert str(caught.value) == tall_python
    for names in (["mlp"], ["mlp", "attn"]):  # (tall with one NAME: "two or more", above)
        res = CliRunner().invoke(cli, ["--store", str(store.root), "compress", *names,
                                       "--codec", "rmm"])
        assert res.exit_code == 2 and res.output == (
            "error: rmm is a multi-model codec whose entries only a reversible merge writes: a "
            "recipe with merge_method rmm, stored with hub merge RECIPE --name NAME\n")
    assert sorted(i.name for i in store.ls()) == ["attn", "base", "mlp"]
