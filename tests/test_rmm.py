"""Reversible merging: the closed form's identities and reverting a stored basis to each task."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import mergehub
from mergehub.hub.cli import cli
from mergehub.hub.demo import make_lora
from mergehub.merge.methods.rmm import decompose
from mergehub.storage.checkpoint import open_checkpoint
from mergehub.storage.store import Store


def _recon(basis, coef):
    return [torch.tensordot(c, basis, dims=1) for c in coef]


def test_m_equals_t_is_exact_and_error_decreases():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 12, generator=gen) for _ in range(4)]
    prev = None
    for m in range(1, 5):
        basis, coef, residuals = decompose(xs, m)
        errs = torch.stack([((x - r) ** 2).sum() for x, r in zip(xs, _recon(basis, coef))])
        assert torch.allclose(errs, residuals[:, m - 1], rtol=1e-4, atol=1e-4)
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
    basis, coef, residuals = decompose(xs, 2)
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
    text = f"merge_method: rmm\nbase_model: base\nmodels:\n" + "".join(
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
