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
