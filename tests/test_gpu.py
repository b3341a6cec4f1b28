"""The merge engine on a CUDA device matches the CPU path (run on a GPU machine: -m gpu)."""

from __future__ import annotations

import pytest
import torch

import mergehub
from mergehub.storage.checkpoint import open_checkpoint

pytestmark = pytest.mark.gpu

METHODS = {
    "task_arithmetic": "parameters: {lambda: 0.7}",
    "ties": "parameters: {lambda: 1.0}",
    "consensus_ties": "parameters: {k: 1}",
    "breadcrumbs_ties": "parameters: {lambda: 1.0}",
    "linear": "",
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_matches_cpu(models, tmp_path, method):
    density = "" if method in ("linear", "task_arithmetic") else ", density: 0.3"
    text = (f"merge_method: {method}\nbase_model: {models['base-bf16']}\nmodels:\n"
            f"  - model: {models['ft-mlp']}\n    parameters: {{weight: 1.0{density}}}\n"
            f"  - model: {models['ft-attn']}\n    parameters: {{weight: 0.5{density}}}\n"
            f"  - model: {models['lora']}\n    parameters: {{weight: 2.0{density}}}\n"
            f"{METHODS[method]}\nout_dtype: float32\n")
    cpu = mergehub.merge(text, out=tmp_path / "cpu", progress=False)
    gpu = mergehub.merge(text, out=tmp_path / "gpu", device="cuda", progress=False)
    a, b = open_checkpoint(cpu.out), open_checkpoint(gpu.out)
    for name in a.tensors:
        assert torch.allclose(a.load(name), b.load(name), atol=2e-6, rtol=1e-5), name


def test_dare_on_cuda_is_seeded(models, tmp_path):
    text = (f"merge_method: dare_ties\nbase_model: {models['base-bf16']}\nmodels:\n"
            f"  - model: {models['ft-mlp']}\n    parameters: {{density: 0.5}}\n"
            f"  - model: {models['ft-attn']}\n    parameters: {{density: 0.5}}\n")
    runs = [mergehub.merge(text, out=tmp_path / f"r{i}", device="cuda", seed=s, progress=False)
            for i, s in enumerate((1, 1, 2))]
    loaded = [open_checkpoint(r.out) for r in runs]
    names = list(loaded[0].tensors)
    assert all(torch.equal(loaded[0].load(n), loaded[1].load(n)) for n in names)
    assert not all(torch.equal(loaded[0].load(n), loaded[2].load(n)) for n in names)
    # the masks are those of the CPU (one counter-based stream, whatever the device and chunks)
    cpu = open_checkpoint(mergehub.merge(text, out=tmp_path / "cpu", seed=1, progress=False).out)
    for name in names:
        assert torch.allclose(cpu.load(name), loaded[0].load(name), atol=2e-6, rtol=1e-5), name


@pytest.mark.parametrize("method, extra", [
    ("task_arithmetic", ""), ("ties", ""), ("ties", "parameters: {density_tolerance: 0.3}\n"),
    ("consensus_task_arithmetic", "parameters: {k: 1}\n"), ("consensus_ties", "parameters: {k: 1}\n")])
def test_fused_cuda_path_matches_cpu(models, tmp_path, method, extra):
    """Dense inputs only: on CUDA the engine merges whole tensors with the Triton kernels (with
    ``density_tolerance``, thresholds from the same sample as the CPU's)."""
    density = ", density: 0.3" if "ties" in method else ""
    text = (f"merge_method: {method}\nbase_model: {models['base-bf16']}\nmodels:\n"
            f"  - model: {models['ft-mlp']}\n    parameters: {{weight: 1.0{density}}}\n"
            f"  - model: {models['ft-attn']}\n    parameters: {{weight: 0.5{density}}}\n" + extra)
    cpu = mergehub.merge(text, out=tmp_path / "cpu", progress=False)
    gpu = mergehub.merge(text, out=tmp_path / "gpu", device="cuda", progress=False)
    a, b = open_checkpoint(cpu.out), open_checkpoint(gpu.out)
    for name in a.tensors:
        assert torch.equal(a.load(name), b.load(name)), name


def test_store_decodes_lossy_entries_on_cuda(models, tmp_path):
    from mergehub.storage.store import Store

    store = Store(tmp_path / "store", create=True)
    store.add(models["base-bf16"], "base", progress=False)
    store.add(models["ft-mlp"], "ft", base="base", progress=False)
    for codec, params in (("bit1", {}), ("compeft", {"density": 0.2}), ("lowrank", {"rank": 4})):
        store.compress("ft", codec, params, progress=False)
        model = store.open(f"ft-{codec}")
        for spec in model.specs():
            cpu, gpu = model.load(spec.name), model.load(spec.name, device="cuda")
            assert gpu.is_cuda and gpu.dtype == cpu.dtype and gpu.shape == cpu.shape
            if codec == "lowrank":  # a tl.dot sums in another order: one bf16 step at most
                torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=2**-7, atol=1e-6)
            else:
                assert torch.equal(gpu.cpu(), cpu), (codec, spec.name)
    text = ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
            "  - model: ft-bit1\n  - model: ft-compeft\n    parameters: {weight: 0.5}\n")
    cpu = mergehub.merge(text, out=tmp_path / "cpu", store=store, progress=False)
    gpu = mergehub.merge(text, out=tmp_path / "gpu", store=store, device="cuda", progress=False)
    a, b = open_checkpoint(cpu.out), open_checkpoint(gpu.out)
    for name in a.tensors:
        assert torch.equal(a.load(name), b.load(name)), name
