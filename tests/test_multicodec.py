"""Multi-model codecs (TALL, RMM) through their shared interface: entries written in the layouts
stored before the interface existed still read and export bit for bit, and a new codec is one
module (docs/architecture.md's worked example, run as written)."""

from __future__ import annotations

import json
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
from mergehub.storage.codecs.multi import MULTI, bundle_parts, bundle_task
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
            assert torch.equal(got, torch.where(keep, mtl, torch.zeros(())) * p["alpha"])
        else:
            assert torch.allclose(got, tau, atol=1e-5)


def test_the_worked_example_of_a_new_multi_codec_compresses(models, tmp_path, monkeypatch):
    """docs/architecture.md's example multi-model codec, as written there, registers and is
    reached by ``hub compress A B --codec meanscale``; its entries export θ0 + st·τ̄."""
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
