"""Reversible merging: the closed form's identities and reverting a stored basis to each task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mergehub
from mergehub.hub.cli import cli
from mergehub.hub.demo import make_lora
from mergehub.storage.codecs.rmm import decompose
from mergehub.merge.rmm import revert
from mergehub.storage.checkpoint import open_checkpoint
from mergehub.storage.store import Store


def _recon(basis, coef):
    return [torch.tensordot(c, basis, dims=1) for c in coef]


def test_m_equals_t_is_exact_and_error_decreases():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 12, generator=gen) for _ in range(4)]
    prev = None
    for m in range(1, 5):
        basis, coef, residuals, norms = decompose(xs, m)
        errs = torch.stack([((x - r) ** 2).sum() for x, r in zip(xs, _recon(basis, coef))])
        assert torch.allclose(errs, residuals[:, m - 1], rtol=1e-4, atol=1e-4)
        assert torch.allclose(norms, torch.stack([(x.double() ** 2).sum() for x in xs]))
        total = errs.sum()
        if prev is not None:
            assert total <= prev + 1e-5
        prev = total
    assert prev < 1e-8 * sum((x ** 2).sum() for x in xs)
    # the basis is orthonormal
    flat = basis.reshape(4, -1)
    assert torch.allclose(flat @ flat.T, torch.eye(4), atol=1e-5)


def test_deltas_in_an_m_dimensional_span_have_zero_error():
    gen = torch.Generator().manual_seed(1)
    d1, d2 = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    xs = [2 * d1, d1 - d2, 0.5 * d2, 3 * d1 + d2]
    basis, coef, residuals, _ = decompose(xs, 2)
    for x, r in zip(xs, _recon(basis, coef)):
        assert torch.allclose(x, r, atol=1e-5)
    assert residuals[:, 1].max() < 1e-6


def test_optimality_against_random_bases():
    """No other m-dimensional basis does better (Eckart–Young)."""
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(30, generator=gen) for _ in range(5)]
    x = torch.stack(xs)
    best = decompose(xs, 2)[2][:, 1].sum()
    for _ in range(20):
        q, _ = torch.linalg.qr(torch.randn(30, 2, generator=gen))
        proj = x @ q @ q.T
        assert ((x - proj) ** 2).sum() >= best - 1e-4


def test_rmm_store_revert_each_task(models, tmp_path):
    base = models["base-fp32"]
    loras = [make_lora(base, tmp_path / f"lora{i}", seed=10 + i, rank=2) for i in range(3)]
    text = "merge_method: rmm\nbase_model: base\nmodels:\n" + "".join(
        f"  - model: {p}\n" for p in loras) + "parameters: {{m: {m}}}\n"
    with Store.init(tmp_path / "store") as store:
        store.add(base, "base", progress=False)
        exact = mergehub.merge(text.format(m=3), store=store, to_store="rmm3", progress=False)
        one = mergehub.merge(text.format(m=1), store=store, to_store="rmm1", progress=False)
        errors3 = exact.report["relative_error_by_m"]
        assert all(e[2] < 1e-5 for e in errors3.values())
        assert all(e[0] > 0.05 for e in one.report["relative_error_by_m"].values())
        assert errors3 == one.report["relative_error_by_m"]  # every m reported either way
        for i, lora in enumerate(loras):
            single = mergehub.merge(f"merge_method: task_arithmetic\nbase_model: base\n"
                                    f"models: [{{model: {lora}}}]\n", out=tmp_path / f"single{i}",
                                    store=store, output_format="hf", progress=False)
            runner = CliRunner()
            res = runner.invoke(cli, ["--store", str(store.root), "export", "rmm3", "-o",
                                      str(tmp_path / f"rev{i}"), "--task", str(lora)])
            assert res.exit_code == 0, res.output
            rev, ref = open_checkpoint(tmp_path / f"rev{i}"), open_checkpoint(single.out)
            for name in ref.tensors:
                assert torch.allclose(rev.load(name), ref.load(name), atol=1e-5), name
        res = CliRunner().invoke(cli, ["--store", str(store.root), "export", "rmm3", "-o",
                                       str(tmp_path / "x"), "--task", "7"])
        assert res.exit_code == 2 and "has no task 7" in res.output
        res = CliRunner().invoke(cli, ["--store", str(store.root), "export", "base", "-o",
                                       str(tmp_path / "y"), "--task", "0"])
        assert res.exit_code == 2 and "not a reversible merge" in res.output


def test_rmm_m_out_of_range(models, tmp_path):
    from mergehub.merge.recipe import RecipeError

    text = (f"merge_method: rmm\nbase_model: {models['base-bf16']}\n"
            f"models: [{{model: {models['lora']}}}]\nparameters: {{m: 2}}\n")
    with pytest.raises(RecipeError, match=r"m must be an integer from 1 to the number of inputs \(1\)"):
        mergehub.merge(text, out=tmp_path / "o", progress=False)
    with pytest.raises(RecipeError, match="basis must be one of 'factors', 'dense', not 'lowrank'"):
        mergehub.merge(text.replace("m: 2", "m: 1, basis: lowrank"), out=tmp_path / "o",
                       progress=False)


def lora_deltas(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT adapter's (scaling·B, A) per target weight, read from its files directly."""
    from safetensors.numpy import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(path / "adapter_model.safetensors")
    out = {}
    for name, a in tensors.items():
        if ".lora_A." in name:
            target = name.replace("base_model.model.", "", 1).replace(".lora_A", "")
            b = tensors[name.replace("lora_A", "lora_B")]
            out[target] = (b.astype(np.float64) * config["lora_alpha"] / config["r"],
                           a.astype(np.float64))
    return out


def top_m(x: np.ndarray, m: int) -> np.ndarray:
    """The rows of x projected on its top-m right singular vectors (Eckart–Young)."""
    _, _, vh = np.linalg.svd(x, full_matrices=False)
    return x @ vh[:m].T @ vh[:m]


def rmm_reference(loras: list[dict], m: int, basis: str) -> list[dict[str, np.ndarray]]:
    """Each task's rebuilt delta per module. ``factors`` (the RMM paper's factor-space basis):
    the stacked left factors (zero-padded to the largest rank) and the stacked right factors
    each keep their top-m directions; ``dense``: the stacked dense deltas do."""
    out: list[dict[str, np.ndarray]] = [{} for _ in loras]
    for module in loras[0]:
        pairs = [lora[module] for lora in loras]
        if basis == "dense":
            x = np.stack([(b @ a).reshape(-1) for b, a in pairs])
            for t, row in enumerate(top_m(x, m)):
                out[t][module] = row.reshape(pairs[0][0].shape[0], -1)
            continue
        r = max(b.shape[1] for b, _ in pairs)
        lefts = np.stack([np.pad(b, ((0, 0), (0, r - b.shape[1]))).reshape(-1) for b, _ in pairs])
        rights = np.stack([np.pad(a, ((0, r - a.shape[0]), (0, 0))).reshape(-1) for _, a in pairs])
        for t, (lh, rh) in enumerate(zip(top_m(lefts, m), top_m(rights, m))):
            out[t][module] = lh.reshape(-1, r) @ rh.reshape(r, -1)
    return out


@pytest.mark.parametrize("basis", ["factors", "dense", None])
def test_rmm_of_loras_keeps_the_basis_as_factors(models, tmp_path, basis):
    """LoRA inputs (ranks 2, 3, 2): the basis is stored as factors, m adapter-sized factor pairs
    (``factors``, the paper's, and the default: ``None`` leaves ``basis`` out of the recipe) or
    the dense optimum's basis matrices at rank Σ rt (``dense``); the reverted tasks, the
    reported errors and the stored bytes per m match a numpy reference."""
    base = models["base-fp32"]
    ranks = [2, 3, 2]
    loras = [make_lora(base, tmp_path / f"lora{i}", seed=20 + i, rank=r) for i, r in enumerate(ranks)]
    refs = [lora_deltas(p) for p in loras]
    text = ("merge_method: rmm\nbase_model: base\nmodels:\n"
            + "".join(f"  - model: {p}\n" for p in loras)
            + "parameters: {m: %d" + (f", basis: {basis}" if basis else "") + "}\n")
    basis = basis or "factors"
    shapes = {k: (b.shape[0], a.shape[1]) for k, (b, a) in refs[0].items()}
    t = len(loras)
    with Store.init(tmp_path / "store") as store:
        store.add(base, "base", progress=False)
        for m in (1, 2):
            result = mergehub.merge(text % m, store=store, to_store=f"rmm{m}", progress=False)
            report = result.report
            expected = rmm_reference(refs, m, basis)
            base_ckpt = open_checkpoint(base)
            for i in range(t):
                out = open_checkpoint(revert(store, f"rmm{m}", i, tmp_path / f"rev{m}{i}",
                                             progress=False))
                sq_err = sq_norm = 0.0
                for name in base_ckpt.tensors:
                    b = base_ckpt.load(name).double().numpy()
                    got = out.load(name).double().numpy() - b
                    if name not in expected[i]:
                        assert not got.any(), name
                        continue
                    assert np.allclose(got, expected[i][name], atol=1e-5), (m, i, name)
                    delta = refs[i][name][0] @ refs[i][name][1]
                    sq_err += ((delta - expected[i][name]) ** 2).sum()
                    sq_norm += (delta ** 2).sum()
                error = report["relative_error_by_m"][str(loras[i])][m - 1]
                assert error == pytest.approx(np.sqrt(sq_err / sq_norm), rel=1e-3, abs=1e-5)
            r, total = max(ranks), sum(ranks)
            per_m = [sum(4 * k * (rows * r + r * cols + 2 * t) if basis == "factors"  # 2 sides
                         else 4 * (k * (rows * total + t) + total * cols + t)  # 1 shared right
                         for rows, cols in shapes.values()) for k in range(1, t + 1)]
            assert report["basis"] == basis and report["stored_bytes_by_m"] == per_m
            assert result.bytes == per_m[m - 1]  # what was written is what is reported
            dense = sum(4 * m * rows * cols for rows, cols in shapes.values())
            assert result.bytes < dense / 2
        assert max(report["relative_error_by_m"][str(p)][t - 1] for p in loras) < 1e-5
