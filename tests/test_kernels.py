"""The fused kernels against their torch references and independent oracles.

Without CUDA the Triton kernels run under Triton's interpreter on the CPU (TRITON_INTERPRET is
set by conftest.py, before any test module imports Triton); with ``-m gpu`` on a CUDA machine
the same tests run compiled on the GPU. Sizes are small and odd (the interpreter runs ~0.3M
elements/s) and never a multiple of the kernels' blocks.

Tolerance: the kernels do the reference's float32 operations in its order (no FMA contraction,
correctly rounded division, round-to-nearest-even to bf16), so outputs are compared for exact
equality in every dtype; only low-rank products (a ``tl.dot`` vs a matmul) get a tolerance.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mergehub import kernels  # noqa: E402
from mergehub.errors import InputError  # noqa: E402
from mergehub.kernels import (  # noqa: E402
    Cut, LowRankDelta, SignDelta, TernaryDelta, selection, triton_merge, triton_select)
from mergehub.ops.sparsify import cut_mask  # noqa: E402
from mergehub.storage.codecs import LOSSY  # noqa: E402

import merge_reference as ref  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DEVICE = [pytest.param("cpu", id="interp"), pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICE)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def _inputs(shape, k: int, dtype: torch.dtype, device: str, seed: int, scale: float = 0.02,
            magnitude: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * magnitude
    thetas = [base + torch.randn(shape, generator=gen) * scale * magnitude for _ in range(k)]
    return base.to(dtype).to(device), [t.to(dtype).to(device) for t in thetas]


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (SignDelta, TernaryDelta, LowRankDelta)):
        return type(x)(*(_cpu(getattr(x, f)) for f in x.__dataclass_fields__))
    return x


def _both(fn, *args, **kwargs):
    """The kernel's result and the torch reference's on the CPU (the engine's CPU path: torch
    on CUDA rounds some operations differently, e.g. it divides by a scalar through its
    reciprocal)."""
    got = fn(*args, backend="triton", **kwargs)
    want = fn(*_cpu(args), backend="torch", **_cpu(kwargs))
    return got.cpu(), want


MODES = ["plain", "trim", "trim+rescale", "tall", "masks"]
SHAPES = [(1,), (1023,), (7, 131), (3, 5, 67), (2049,)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("elect", [None, "sum", "count"])
@pytest.mark.parametrize("mode", MODES)
def test_merge_matches_reference(device, dtype, elect, mode):
    i = MODES.index(mode) + 5 * [None, "sum", "count"].index(elect)
    k, shape = 1 + i % 8, SHAPES[i % len(SHAPES)]
    base, thetas = _inputs(shape, k, dtype, device, seed=i)
    gen = torch.Generator().manual_seed(100 + i)
    kw = {"weights": (torch.rand(k, generator=gen) * 2 - 0.3).tolist(), "lam": 0.8,
          "elect": elect, "normalize": i % 2 == 0}
    if mode.startswith("trim"):  # cuts at a τ's own magnitude, so that entries tie with it
        n = base.numel()
        kw["cuts"] = [None if t == 1 else Cut(float((thetas[t].float() - base.float()).abs()
                                                     .reshape(-1)[(t * 97) % n]), (t * n) // 3)
                      for t in range(k)]
        if mode == "trim+rescale":
            kw["scales"] = (1 + torch.rand(k, generator=gen)).tolist()
    elif mode == "tall":
        kw["tall_lambdas"] = (torch.rand(k, generator=gen) * 0.8).tolist()
        kw["k"] = min(2, k)
    elif mode == "masks":
        kw["masks"] = torch.rand((k, *shape), generator=gen).to(device) < 0.6
        kw["k"] = 1 + k // 2
    got, want = _both(kernels.merge_tensor, base, thetas, **kw)
    assert got.dtype == want.dtype == dtype and got.shape == base.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("k", range(1, 9))
def test_ties_any_k_and_out_dtype(device, k):
    base, thetas = _inputs((5, 203), k, torch.bfloat16, device, seed=k)
    kw = {"weights": [1.0] * k, "lam": 1.0, "elect": "sum",
          "cuts": [Cut(0.015625, 300 * t) for t in range(k)], "out_dtype": torch.float32}
    got, want = _both(kernels.merge_tensor, base, thetas, **kw)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_ties_hand_computed(device):
    """TIES on 4 entries by hand: trim |τ| >= 0.5 (each cut's tie end past the last entry),
    elect by mass, disjoint mean, λ = 2; then a tie end that keeps only the first tied entry."""
    base = torch.tensor([1.0, 1.0, 1.0, 1.0], device=device)
    taus = [[1.0, -2.0, 0.25, 3.0], [2.0, 1.0, -0.75, -1.0], [-0.5, 1.5, 1.0, 0.0]]
    thetas = [base + torch.tensor(t, device=device) for t in taus]
    # trimmed: [1,-2,0,3], [2,1,-.75,-1], [-.5,1.5,1,0]; signs by mass: +, +, +, +
    # agreeing means: (1+2)/2, (1+1.5)/2, 1/1, 3/1
    got = kernels.merge_tensor(base, thetas, weights=[1, 1, 1], lam=2.0,
                               cuts=[Cut(0.5, 4)] * 3, elect="sum", backend="triton")
    assert got.tolist() == [1 + 2 * 1.5, 1 + 2 * 1.25, 1 + 2 * 1.0, 1 + 2 * 3.0]
    # |τ| = 1 ties at entries 1 and 3 of the second input: tie end 2 keeps entry 1 only, so
    # [2, 1, 0, 0]; the third keeps |τ| > 1 (tie end 0): [0, 1.5, 0, 0]; the first all of it.
    # Signs by mass: all +; agreeing means: (1 + 2) / 2, (1 + 1.5) / 2, .25 / 1, 3 / 1
    got = kernels.merge_tensor(base, thetas, weights=[1, 1, 1], lam=2.0,
                               cuts=[None, Cut(1.0, 2), Cut(1.0, 0)], elect="sum",
                               backend="triton")
    assert got.tolist() == [1 + 2 * 1.5, 1 + 2 * 1.25, 1 + 2 * 0.25, 1 + 2 * 3.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_merge_edge_values(device, dtype):
    """Zero deltas give the base back; all signs equal; extreme (finite) magnitudes."""
    big = {torch.float16: 2.0 ** 13, torch.bfloat16: 1e30, torch.float32: 1e30}[dtype]
    base, thetas = _inputs((3, 341), 4, dtype, device, seed=7)
    for elect in (None, "sum", "count"):
        out = kernels.merge_tensor(base, [base.clone()] * 3, weights=[1, 2, 3], lam=1.0,
                                   elect=elect, backend="triton")
        assert torch.equal(out, base)
    same = [base + (t - base).abs() for t in thetas]
    tiny = [base * 1e-30 + (t - base) * 1e-20 for t in thetas] if dtype != torch.float16 \
        else [t * 2.0 ** -14 for t in thetas]
    huge_base, huge = _inputs((3, 341), 4, dtype, device, seed=8, magnitude=big, scale=0.5)
    for xs, b in ((same, base), (tiny, tiny[0] * 0), (huge, huge_base)):
        for elect in (None, "sum", "count"):
            kw = {"weights": [0.5, 1.0, 1.5, 2.0], "lam": 0.7, "elect": elect,
                  "cuts": [Cut(0.0, 500 * t) for t in range(4)], "tall_lambdas": [0.4] * 4}
            got, want = _both(kernels.merge_tensor, b, xs, **kw)
            assert not torch.isnan(want.float()).any()
            assert torch.equal(got, want)


def _division_cases(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (a, b) pairs, b in [2^-100, 2^100]: quotients within an ulp's fraction of a
    rounding midpoint (a = b·m rounded, m halfway between two float32 values), a over the whole
    float32 range (subnormals too), special values of a, and b with every mantissa bit set."""
    gen = np.random.default_rng(seed)
    b = (gen.uniform(1, 2, n) * 2.0 ** gen.integers(-100, 100, n)).astype(np.float32)
    b[: n // 4] = ((2 - 2.0 ** -23 * gen.integers(1, 4, n // 4))
                   * 2.0 ** gen.integers(-60, 60, n // 4)).astype(np.float32)
    mid = (gen.integers(2 ** 24, 2 ** 25, n) | 1) * 2.0 ** gen.integers(-175, 104, n)
    with np.errstate(over="ignore"):
        a = (b.astype(np.float64) * mid).astype(np.float32)
    wide = gen.standard_normal(n) * 2.0 ** gen.integers(-149, 127, n)
    a[::2] = wide[::2].astype(np.float32)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -1.4e-45, 1.1754942e-38]
    a[: len(special)] = special
    return torch.from_numpy(a), torch.from_numpy(b)


@triton.jit
def _quotient_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    q = triton_merge._quotient(tl.load(a_ptr + off, mask=m, other=1.0),
                                 tl.load(b_ptr + off, mask=m, other=1.0))
    tl.store(out_ptr + off, q, mask=m)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's
def test_quotient_is_the_correctly_rounded_division(device):
    """The disjoint mean's division without ``div_rn`` (a refined float64 reciprocal, rounded
    once) gives IEEE float32 division's result bit for bit (torch on the CPU is the oracle),
    also for quotients that lie a hair from a rounding midpoint, subnormal and overflowing."""
    n = 1 << 15 if device == "cpu" else 1 << 22
    a, b = _division_cases(n, seed=11)
    out = torch.empty(n, dtype=torch.float32, device=device)
    _quotient_kernel[(triton.cdiv(n, 1024),)](a.to(device), b.to(device), out, n, BLOCK=1024,
                                              enable_fp_fusion=False)
    want = a / b
    got = out.cpu()
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all()), (a[~same][:5], b[~same][:5], got[~same][:5], want[~same][:5])


@pytest.mark.parametrize("weights", [[0.3, 1.7, 2.0 ** -90, 0.9, 5e20],
                                     [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                                     [0.0625, 3.0, 0.1],
                                     [0.5, -0.5, 1e-30, 2.0, -3.0],
                                     [0.7 + 0.1 * t for t in range(10)],
                                     [1.0, -2.0] + [1.0] * 8])
def test_ties_disjoint_mean_divisions(device, weights):
    """TIES's disjoint mean by each of the kernel's divisions equals the reference in float32
    outputs, on inputs whose deltas span many binades: the table of reciprocals (up to 8
    inputs, any weights: tiny, huge, negative, subsets that cancel to 0), the refined
    reciprocal (more inputs, positive weights) and ``div_rn`` (more inputs, a negative one)."""
    k = len(weights)
    gen = torch.Generator().manual_seed(k)
    base = torch.randn(3001, generator=gen)
    thetas = [base + torch.randn(3001, generator=gen) * 2.0 ** torch.randint(-30, 30, (3001,),
                                                                            generator=gen)
              for _ in range(k)]
    for elect in ("sum", "count"):
        got, want = _both(kernels.merge_tensor, base.to(device), [t.to(device) for t in thetas],
                          weights=weights, lam=0.9, elect=elect)
        assert torch.equal(got, want)


@pytest.mark.parametrize("weights", [[1.0, -0.5, 2.0, 0.75], [-1.0, -0.5, -2.0, -0.75]])
@pytest.mark.parametrize("elect", ["sum", "count"])
@pytest.mark.parametrize("trim", [False, True])
def test_ties_signed_zeros(device, elect, trim, weights):
    """TIES's sign election and disjoint mean on deltas that are zeros of both signs (also
    from a negative weight times 0, and sums that cancel), subnormal and ordinary values:
    every output bit, the sign of a zero included, is the reference's, with and without a
    magnitude cut. (Infinite or NaN deltas are outside the kernels' promise: where the
    reference multiplies by a 0/1 mask, they select.)"""
    special = [0.0, -0.0, 1.5, -1.5, -2.0, 3e-39, -3e-39, -0.25, 0.25]
    gen = torch.Generator().manual_seed(5)
    k, n = 4, 1031
    base = torch.randn(n, generator=gen)
    base[:9] = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.0, -0.0, 2.0, 0.0, -0.0])
    taus = torch.tensor(special)[torch.randint(0, len(special), (k, n), generator=gen)]
    thetas = [base + tau for tau in taus]
    thetas[1][:9] = base[:9]  # τ = +0 or -0 (−0 − +0) at the start
    thetas[2][:9] = -0.0
    for theta in thetas:  # every τ +0 where the base is -0 (a negative weight makes it -0)
        theta[20:30] = base[20:30] = -0.0
    cuts = [Cut(0.5, 100 * t) for t in range(k)] if trim else None
    got, want = _both(kernels.merge_tensor, base.to(device), [t.to(device) for t in thetas],
                      weights=weights, lam=1.0, cuts=cuts, elect=elect)
    same = got.view(torch.int32) == want.view(torch.int32)
    assert bool(same.all()), (got[~same][:5], want[~same][:5])


def test_dare_words_are_the_reference_words(device):
    """DARE's words from the Triton kernel (one Philox block per four positions, the lane
    picked per position) equal the torch reference's, for ranges starting at any lane, deep
    in a tensor and across a block of programs; on the CPU by default the compiled words."""
    from mergehub.ops.sparsify import draw_words

    for n, key, start in [(1, 7, 0), (1030, 2 ** 64 - 1, 3), (2500, 0xDEAD_BEEF, 2 ** 33 + 5),
                          (0, 5, 9)]:
        want = draw_words(n, key, start, "cpu")
        got = kernels.dare_words(n, key, start, device, backend="triton")
        assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)
        assert torch.equal(kernels.dare_words(n, key, start, device).cpu(), want)
        assert torch.equal(kernels.dare_words(n, key, start, device, backend="torch").cpu(), want)


def test_merge_refuses_more_blocks_than_floats_count(monkeypatch):
    """Block indices reach the kernel as exact float32: a tensor of more than 2^24 blocks is
    refused by name before any launch."""
    monkeypatch.setattr(triton_merge, "MERGE_BLOCK", 1)
    base = torch.zeros(2 ** 24 + 1, dtype=torch.bfloat16)
    with pytest.raises(InputError, match=r"2\^24 blocks"):
        kernels.merge_tensor(base, [base], weights=[1.0], lam=1.0, backend="triton")


def test_merge_blocks_with_and_without_tie_ends(device, monkeypatch):
    """Blocks that hold no tie end take the kernel's plain path, the others (and the partial
    last block) the general one: tie ends at 0, on block boundaries, inside blocks and at n
    keep exactly the reference's entries."""
    monkeypatch.setattr(triton_merge, "MERGE_BLOCK", 32)
    n = 32 * 12 + 5
    base, thetas = _inputs((n,), 5, torch.bfloat16, device, seed=21)
    taus = [(t.float() - base.float()).abs().cpu() for t in thetas]
    ends = [0, 64, 77, 32 * 11, n]
    cuts = [Cut(float(tau.median()), end) for tau, end in zip(taus, ends)]
    for elect in (None, "sum"):
        got, want = _both(kernels.merge_tensor, base, thetas, weights=[1.0, 0.5, 2.0, 1.0, 0.3],
                          lam=1.0, cuts=cuts, elect=elect)
        assert torch.equal(got, want)


def test_merge_batch_equals_one_launch_per_tensor(device, monkeypatch):
    """A MergeBatch launches each group of merges once over all its tensors: every output is
    the torch reference's, bit for bit, for tensors of one entry, of a partial block and of
    many blocks with tie ends inside and on block boundaries, in two groups (other weights,
    other dtypes) and with merges that cannot join (given masks, a view off 16 bytes), which
    run at once."""
    monkeypatch.setattr(triton_merge, "MERGE_BLOCK", 32)
    k = 3
    tensors = []
    for i, (shape, dtype) in enumerate([((1,), torch.bfloat16), ((45,), torch.bfloat16),
                                        ((7, 61), torch.bfloat16), ((32 * 9,), torch.bfloat16),
                                        ((3, 50), torch.float32), ((200,), torch.float16)]):
        base, thetas = _inputs(shape, k, dtype, device, seed=40 + i)
        n = base.numel()
        taus = [(t.float() - base.float()).abs().cpu().reshape(-1) for t in thetas]
        cuts = [None, Cut(float(taus[1].median()), min(n, 32 * (i + 1))),
                Cut(float(taus[2].median()), n // 2 + 1)]
        tensors.append((base, thetas, cuts))
    plans = [  # (weights, elect, extra): the first two share a group
        ([1.0, 0.5, 2.0], "sum", {}), ([1.0, 0.5, 2.0], "sum", {}),
        ([0.7, 0.7, 0.2], None, {"tall_lambdas": [0.4, 0.6, 0.5]}),
        ([1.0, 1.0, 1.0], "count", {}), ([1.0, 0.5, 2.0], "sum", {}),
        ([0.3, 1.0, 1.0], None, {}),
    ]
    batch = kernels.MergeBatch()
    outs, wants = [], []
    for (base, thetas, cuts), (weights, elect, extra) in zip(tensors, plans):
        kw = {"weights": weights, "lam": 0.9, "elect": elect, **extra}
        if not extra:
            kw["cuts"] = cuts
        out = torch.full_like(base, 7.0)
        assert kernels.merge_tensor(base, thetas, **kw, out=out, batch=batch,
                                    backend="triton") is out
        outs.append(out)
        wants.append(kernels.merge_tensor(*_cpu((base, thetas)), **_cpu(kw), backend="torch"))
    # given masks, and an output that is a view starting off 16 bytes, are merged at once
    base, thetas, _ = tensors[1]
    masks = (torch.rand((k, 45), generator=torch.Generator().manual_seed(5)) < 0.5).to(device)
    out = torch.zeros_like(base)
    kernels.merge_tensor(base, thetas, weights=[1.0] * k, lam=1.0, masks=masks, out=out,
                         batch=batch, backend="triton")
    holder = torch.zeros(46, dtype=base.dtype, device=device)
    kernels.merge_tensor(base, thetas, weights=[1.0] * k, lam=1.0, out=holder[1:], batch=batch,
                         backend="triton")
    assert len(batch) == 6
    want_masks = kernels.merge_tensor(*_cpu((base, thetas)), weights=[1.0] * k, lam=1.0,
                                      masks=masks.cpu(), backend="torch")
    assert torch.equal(out.cpu(), want_masks)  # already there
    assert torch.equal(holder[1:].cpu(), kernels.merge_tensor(
        *_cpu((base, thetas)), weights=[1.0] * k, lam=1.0, backend="torch"))
    assert all(torch.equal(o.cpu(), torch.full_like(o.cpu(), 7.0)) for o in outs)  # queued
    batch.run()
    assert len(batch) == 0
    for got, want in zip(outs, wants):
        assert got.dtype == want.dtype and torch.equal(got.cpu(), want)
    # the replay launches the same merges again; not once an input was written in place
    for out in outs:
        out.fill_(7.0)
    assert batch.replay()
    for got, want in zip(outs, wants):
        assert torch.equal(got.cpu(), want)
    for out in outs:
        out.fill_(7.0)
    tensors[3][1][2].add_(0)  # same values, but a write: its version moves
    assert not batch.replay()
    assert all(torch.equal(o.cpu(), torch.full_like(o.cpu(), 7.0)) for o in outs)
    # flush_bytes: what is queued is launched as soon as it holds that many bytes
    base, thetas, cuts = tensors[2]
    batch = kernels.MergeBatch(flush_bytes=2 * base.numel() * 2 * (k + 2))  # two merges' bytes
    kw = {"weights": [1.0, 0.5, 2.0], "lam": 0.9, "elect": "sum", "cuts": cuts}
    want = kernels.merge_tensor(*_cpu((base, thetas)), **_cpu(kw), backend="torch")
    outs = [torch.zeros_like(base) for _ in range(3)]
    for out, queued in zip(outs, (1, 0, 1)):
        kernels.merge_tensor(base, thetas, **kw, out=out, batch=batch, backend="triton")
        assert len(batch) == queued
    assert [torch.equal(o.cpu(), want) for o in outs] == [True, True, False]
    batch.run()
    assert torch.equal(outs[2].cpu(), want)


def test_packed_masks_equal_boolean_masks(device):
    base, thetas = _inputs((1001,), 3, torch.float32, device, seed=3)
    masks = torch.rand(3, 1001) < 0.5
    packed = torch.from_numpy(np.packbits(masks.numpy(), axis=1))  # the tall codec's layout
    kw = {"weights": [1, 1, 1], "lam": 1.0, "k": 2, "backend": "triton"}
    a = kernels.merge_tensor(base, thetas, masks=masks.to(device), **kw)
    b = kernels.merge_tensor(base, thetas, masks=packed.to(device), **kw)
    assert torch.equal(a, b)


def _kth_oracle(base, theta, density):
    mag = np.sort(np.abs(theta.float().cpu().numpy() - base.float().cpu().numpy()).ravel())[::-1]
    return float(mag[max(1, int(density * mag.size)) - 1])


def _assert_oracle_cuts(base, thetas, densities, cuts, ties="index"):
    """Each cut keeps exactly the oracle's entries (the top k of the stable ranking, or all
    tied with the k-th) and sits at the oracle's k-th largest value."""
    for theta, d, cut in zip(thetas, densities, cuts):
        tau = (theta.float().cpu() - base.float().cpu()).reshape(-1)
        k = ref.kept_count(d, tau.numel())
        want = ref.top_k_mask(tau.numpy(), k) if ties == "index" else \
            ref.threshold_mask(tau.numpy(), k)
        mask = cut_mask(tau, cut)
        got = np.ones(tau.numel(), bool) if mask is None else mask.numpy()
        assert (got == want).all(), (d, cut)
        assert cut is None or cut.kept == want.sum()
        if 0 < d < 1:
            assert cut.threshold == _kth_oracle(base, theta, d)


@pytest.mark.parametrize("ties", ["index", "threshold"])
@pytest.mark.parametrize("shape", [(5,), (1000,), (3, 1025), (64, 128)])
def test_cuts_exact(device, shape, ties):
    """bf16 inputs (τ takes few values: the cut splits a run of ties): the kernels' cuts equal
    the torch reference's and keep exactly the oracle's entries."""
    base, thetas = _inputs(shape, 3, torch.bfloat16, device, seed=shape[0])
    dens = [0.1, 0.5, 1e-9]
    got = kernels.magnitude_cuts(base, thetas, dens, ties=ties, backend="triton")
    assert got == kernels.magnitude_cuts(base, thetas, dens, ties=ties, backend="torch")
    _assert_oracle_cuts(base, thetas, dens, got, ties)
    assert kernels.magnitude_cuts(base, thetas[:2], [1.0, 0.0], backend="triton") \
        == [None, Cut(math.inf, 0, 0)]


def test_cuts_of_inputs_of_mixed_dtypes(device):
    """Fine-tunes stored in different dtypes (a bf16 one and a float32 one) get each one's own
    exact trim (the selection kernels take one dtype for all inputs: such inputs are selected
    in float32, which holds every bf16 value exactly), exact or sampled."""
    base, (a, b) = _inputs((3, 1001), 2, torch.bfloat16, device, seed=9)
    b32 = b.float() + 1e-4 * torch.randn(b.shape, generator=torch.Generator().manual_seed(1)).to(
        device)
    thetas, dens = [a, b32], [0.3, 0.2]
    _assert_oracle_cuts(base, thetas, dens, kernels.magnitude_cuts(base, thetas, dens,
                                                                   backend="triton"))
    got = kernels.magnitude_cuts(base, thetas, dens, tolerance=0.2, backend="triton")
    assert got == kernels.magnitude_cuts(*_cpu((base, thetas)), dens, tolerance=0.2,
                                         backend="torch")


def test_cuts_tie_ends_over_many_blocks(device, monkeypatch):
    """A run of ties spread over many counting blocks (small ones here): the block holding the
    k-th is found from the running counts, for several inputs at once, whatever their k."""
    monkeypatch.setattr(triton_select, "COUNT_BLOCK", 64)
    gen = torch.Generator().manual_seed(4)
    n = 64 * 50 + 13
    base = torch.zeros(n)
    thetas = [(torch.randint(0, 3, (n,), generator=gen).float() * 0.5
               * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)).to(device)
              for _ in range(4)]
    dens = [0.05, 0.3, 0.6, 0.95]
    got = kernels.magnitude_cuts(base.to(device), thetas, dens, backend="triton")
    _assert_oracle_cuts(base, thetas, dens, got)
    assert all(0 < c.tie_end < n for c in got)  # each splits its run


@pytest.mark.parametrize("radix_bits", [8, 5])
def test_cuts_sampled_ties_and_missed_bracket(device, monkeypatch, radix_bits):
    """Strided sampling (a small SAMPLE_SIZE), many tied values (the k-th at a bracket's end),
    and a sample that lies about the data (the bracket misses: the whole-input selection gives
    the exact cut); 5-bit digits make the radix select run 7 rounds."""
    monkeypatch.setattr(selection, "SAMPLE_SIZE", 512)
    monkeypatch.setattr(triton_select, "RADIX_BITS", radix_bits)
    monkeypatch.setattr(triton_select, "SELECT_SLOTS", 2)  # several blocks append to a list
    whole = []
    monkeypatch.setattr(selection, "_select_whole",
                        lambda *a: whole.append(a) or Cut(math.nan, 0))
    n = 64 * 128 + 77
    base = torch.zeros(n, device=device)
    tied = (torch.randint(0, 5, (n,)).float() * 0.25).to(device)
    liar = torch.full((n,), 3.0)
    liar.view(-1)[: 64 * 128].view(64, 128)[::16] = 0.001  # exactly the sampled blocks
    liar = liar.to(device)
    smooth = torch.randn(n).to(device)
    for theta in (tied, smooth):
        for d in (0.01, 0.3, 0.9):
            for ties in ("index", "threshold") if theta is tied else ("index",):
                got = kernels.magnitude_cuts(base, [theta, -theta], [d, d / 2], ties=ties,
                                             backend="triton")
                _assert_oracle_cuts(base, [theta, -theta], [d, d / 2], got, ties)
    assert not whole
    assert math.isnan(kernels.magnitude_cut(base, liar, 0.3, backend="triton").threshold)
    assert len(whole) == 1
    monkeypatch.undo()
    cut = kernels.magnitude_cut(base, liar, 0.3, backend="triton")
    _assert_oracle_cuts(base, [liar], [0.3], [cut])
    assert cut.threshold == 3.0


def test_cuts_tie_at_top_prefix(device, monkeypatch):
    """The k-th largest is a value tied 700 times at the bottom of the bracket's top 16-bit
    prefix (lo lies further down): counted there, not gathered, and still exact without the
    whole-input fallback, its ties split by position; a k among distinct values below it too."""
    gen = torch.Generator().manual_seed(0)
    n = 5000
    values = torch.cat([torch.full((400,), 2.0), torch.full((700,), 1.0),
                        torch.rand(n - 1100, generator=gen) * 0.5])
    theta = values[torch.randperm(n, generator=gen)].to(device)
    base = torch.zeros(n, device=device)
    whole = []
    monkeypatch.setattr(selection, "_select_whole",
                        lambda *a: whole.append(a) or Cut(math.nan, 0))
    dens = [0.2, 0.3]  # ranks 1000 (in the run of 1.0s) and 1500 (below it)
    got = kernels.magnitude_cuts(base, [theta, theta], dens, backend="triton")
    assert got[0].threshold == 1.0 and got[1].threshold < 0.5 and not whole
    _assert_oracle_cuts(base, [theta, theta], dens, got)


def test_cuts_candidate_overflow(device, monkeypatch):
    """Candidates beyond their room make that input fall back to the whole-input selection;
    the others keep the fast path's (exact) cut."""
    base, thetas = _inputs((4, 1500), 3, torch.bfloat16, device, seed=5)
    monkeypatch.setattr(selection, "SAMPLE_SIZE", 1024)
    monkeypatch.setattr(selection, "CAP_SLACK", 0)
    monkeypatch.setattr(triton_select, "LIST_SLACK", 0)
    monkeypatch.setattr(selection, "CAP_FACTOR", 0.5)  # half the expected candidates: overflow
    dens = [0.2, 0.3, 1e-9]  # the last finds few candidates (its bracket has no upper end)
    want = kernels.magnitude_cuts(base, thetas, dens, backend="triton")
    _assert_oracle_cuts(base, thetas, dens, want)
    whole = []
    monkeypatch.setattr(selection, "_select_whole",
                        lambda *a: whole.append(a) or Cut(math.nan, 0))
    got = kernels.magnitude_cuts(base, thetas, dens, backend="triton")
    assert len(whole) == 2 and math.isnan(got[0].threshold) and math.isnan(got[1].threshold)
    assert got[2] == want[2]


@pytest.mark.parametrize("k, dtype, shape", [(1, torch.bfloat16, (96, 160)),
                                             (3, torch.float16, (20000,)),
                                             (8, torch.float32, (7, 4099))])
def test_cuts_approximate_equal_reference(device, k, dtype, shape):
    """With a tolerance both backends cut at the same entry of the same random sample (odd
    sizes, K up to 8), so they agree: its k_s-th largest value, its ties ending after the last
    kept sampled one; a tolerance too fine for the tensor gives the exact cuts."""
    from mergehub.ops.selection import sample_positions

    base, thetas = _inputs(shape, k, dtype, device, seed=k)
    n = base.numel()
    dens = [0.2, 0.9, 0.01, 1e-9, 0.5, 1.0, 0.0, 0.33][:k]
    assert sample_positions(n, 0.1) is not None
    for ties in ("index", "threshold"):
        got = kernels.magnitude_cuts(base, thetas, dens, tolerance=0.1, ties=ties,
                                     backend="triton")
        assert got == kernels.magnitude_cuts(base, thetas, dens, tolerance=0.1, ties=ties,
                                             backend="torch")
        pick = sample_positions(n, 0.1)
        for theta, d, cut in zip(thetas, dens, got):
            if not 0 < d < 1:
                assert cut == (None if d >= 1 else Cut(math.inf, 0, 0))
                continue
            tau = (theta.float().cpu() - base.float().cpu()).reshape(-1)[pick].numpy()
            ks = ref.kept_count(d, tau.size)
            last = ref.ranked(tau)[ks - 1]  # the sample's k_s-th entry in the oracle's order
            assert cut.threshold == abs(tau[last])
            assert cut.tie_end == (n if ties == "threshold" else int(pick[last]) + 1)
    exact = kernels.magnitude_cuts(base, thetas, dens, backend="torch")
    assert sample_positions(n, 0.01) is None
    backend = "triton" if k == 1 else "torch"  # the exact kernel is slow in the interpreter
    assert kernels.magnitude_cuts(base, thetas, dens, tolerance=0.01, backend=backend) == exact


def test_cuts_approximate_ties_and_extremes(device):
    """A sample of few distinct values (zero, subnormal, 0.5, near the float32 maximum): the
    k_s-th sampled value sits in a long run of ties, found exactly at every density."""
    from mergehub.ops.selection import sample_positions

    gen = torch.Generator().manual_seed(3)
    n = 9001
    values = torch.tensor([0.0, 1e-40, 0.5, 3e38])
    theta = values[torch.randint(0, 4, (n,), generator=gen)].to(device)
    base = torch.zeros(n, device=device)
    pick = sample_positions(n, 0.2)
    for d in (0.05, 0.3, 0.6, 0.9):
        got = kernels.magnitude_cuts(base, [theta, -theta], [d, d], tolerance=0.2,
                                     backend="triton")
        sample = theta.cpu()[pick].numpy()
        last = ref.ranked(sample)[ref.kept_count(d, sample.size) - 1]
        want = Cut(float(abs(sample[last])), int(pick[last]) + 1)
        assert got == [want, want] == kernels.magnitude_cuts(
            base, [theta, -theta], [d, d], tolerance=0.2, backend="torch")


def test_zo_direction_is_a_seeded_gaussian_stream(device):
    """MeZO's d: eps·N(0, 1), lowest mantissa bit set, the same for a chunk drawn alone as for
    those entries of one long draw, different for another seed."""
    d = kernels.zo_direction(20_000, 2 ** 40 + 3, 1e-3, device=device).cpu()
    assert abs(float(d.mean())) < 3e-5 and abs(float(d.std()) - 1e-3) < 3e-5
    assert bool((d.view(torch.int32) & 1).all())
    tail = kernels.zo_direction(5_001, 2 ** 40 + 3, 1e-3, start=12_344, device=device).cpu()
    assert torch.equal(tail, d[12_344:17_345])
    assert not torch.equal(kernels.zo_direction(100, 5, 1e-3, device=device).cpu(),
                           kernels.zo_direction(100, 6, 1e-3, device=device).cpu())


def _philox4x32_10(counters: np.ndarray, seed: int) -> list[np.ndarray]:
    """Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
    of the counters (c0, 0, 0, 0) under the key (seed's low, high 32 bits), in numpy."""
    c = [counters.astype(np.uint64), *(np.zeros_like(counters, dtype=np.uint64),) * 3]
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0)), p1 & np.uint64(0xFFFFFFFF),
             ((p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1)), p0 & np.uint64(0xFFFFFFFF)]
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c


def test_zo_direction_is_box_muller_of_philox(device):
    """z = d / eps: positions 4c .. 4c + 3 hold n0, n2, n1, n3 of the Box-Muller pairs
    n0 + i n1 = r1 e^(2πi u2), n2 + i n3 = r3 e^(2πi u4), r = sqrt(-2 ln u) (u >= 1e-7), of the
    four 32-bit words of Philox-4x32-10 at counter c as uniforms in [0, 1): with the
    full-precision transform (``accurate``) and the approximate one (the GPU's approximate
    log2/sin/cos), each within 2e-5 of the float64 values, the two not bit-identical."""
    n, start, seed, eps = 4096, 8, 2 ** 40 + 3, 1e-3
    words = _philox4x32_10(np.arange(start // 4, (start + n) // 4), seed)
    u = [np.where(w >= 2 ** 31, 2 ** 32 - 1 - w, w).astype(np.float64) * 4.6566127342e-10
         for w in words]
    want = np.empty(n)
    for pair in (0, 1):
        r = np.sqrt(-2 * np.log(np.maximum(1e-7, u[2 * pair])))
        th = 2 * np.pi * u[2 * pair + 1]
        want[pair::4], want[pair + 2::4] = r * np.cos(th), r * np.sin(th)
    got = [kernels.zo_direction(n, seed, eps, start=start, device=device,
                                accurate=accurate).cpu().double().numpy() / eps
           for accurate in (False, True)]
    for z in got:
        assert np.abs(z - want).max() < 2e-5 * (1 + np.abs(want)).max()
    assert not np.array_equal(*got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("times, update", [(1, None), (-2, None), (1, -0.37), (0, 2.5)])
def test_zo_step_equals_torch_ops_on_the_drawn_direction(device, dtype, times, update):
    """One pass with d in registers = the in-place torch adds MeZO makes with d materialized
    (each add rounded to the parameter's dtype, then the update d·scale)."""
    gen = torch.Generator().manual_seed(abs(times))
    x = (torch.randn(4099, generator=gen) * 0.02).to(dtype).to(device)
    want = x.clone()
    d = kernels.zo_direction(4099, 77, 1e-3, start=12, device=device)
    for _ in range(abs(times)):
        want.add_(d) if times > 0 else want.sub_(d)
    if update is not None:
        want.add_(d * update)
    kernels.zo_step(x, 77, 1e-3, times, start=12, update=update)
    assert torch.equal(x, want)
    with pytest.raises(InputError, match="flat contiguous float"):
        kernels.zo_step(x.view(-1, 1), 77, 1e-3, 1)
    with pytest.raises(InputError, match="multiple of 4"):
        kernels.zo_step(x, 77, 1e-3, 1, start=6)


def _many(dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    """Flat tensors of odd sizes (an empty one, one of a single entry, one misaligned: a view
    one entry into a buffer), more than two so that the launch's search takes several steps."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [4099, 1, 0, 2048, 2500, 37]
    xs = [(torch.randn(n, generator=gen) * 0.02).to(dtype).to(device) for n in sizes]
    xs.append((torch.randn(1001, generator=gen) * 0.02).to(dtype).to(device)[1:])
    return xs


@pytest.mark.parametrize("dtype", DTYPES)
def test_zo_steps_equal_zo_step_on_each_tensor(device, dtype):
    """One launch over many tensors = zo_step on each (its own seed, stream from 0), dense;
    sparse: the masks |x| <= bound it packs equal pack_bits of that comparison, computed at the
    first move and kept, and each move equals torch ops on d * mask."""
    from mergehub.kernels.deltas import pack_bits

    xs = _many(dtype, device, seed=1)
    seeds = [2 ** 64 - 1 - t if t % 2 else t * 7919 for t in range(len(xs))]
    got = [x.clone() for x in xs]
    for times, update in ((1, None), (-2, None), (1, 0.37)):
        kernels.zo_steps(got, seeds, 1e-3, times, update=update)
    for x, seed, y in zip(xs, seeds, got):
        want = x.clone()
        if want.numel():
            for times, update in ((1, None), (-2, None), (1, 0.37)):
                kernels.zo_step(want, seed, 1e-3, times, update=update)
        assert torch.equal(y, want)
    bounds = torch.tensor([float(x.float().abs().median()) if x.numel() else 0.0 for x in xs],
                          device=device)
    bits = torch.empty(kernels.zo_mask_bytes(xs), dtype=torch.uint8, device=device)
    got = [x.clone() for x in xs]
    for times, update in ((1, None), (-2, None), (1, -2.5)):
        kernels.zo_steps(got, seeds, 1e-3, times, update=update, bounds=bounds, bits=bits,
                         fresh=times == 1 and update is None)
    offset = 0
    for t, (x, seed, y) in enumerate(zip(xs, seeds, got)):
        mask = x.float().abs() <= bounds[t]
        nbytes = (x.numel() + 7) // 8
        assert torch.equal(bits[offset:offset + nbytes], pack_bits(mask))
        offset += nbytes
        d = kernels.zo_direction(x.numel(), seed, 1e-3, device=device) * mask
        want = x.clone()
        want.add_(d), want.sub_(d), want.sub_(d), want.add_(d), want.add_(d * -2.5)
        assert torch.equal(y, want)
    with pytest.raises(InputError, match="one dtype"):
        kernels.zo_steps([xs[0], xs[1].half() if dtype != torch.float16 else xs[1].float()],
                         [1, 2], 1e-3, 1)
    with pytest.raises(InputError, match="bits buffer"):
        kernels.zo_steps(xs, seeds, 1e-3, 1, bounds=bounds, bits=bits[:5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_smallest_magnitudes_equal_a_sort(device, dtype):
    """The k-th smallest |x| of each tensor, exactly as sorting finds it: k = 1 and k = n, runs
    of ties (few distinct values), zeros of both signs, infinities and NaN (sorted last)."""
    xs = [x for x in _many(dtype, device, seed=2) if x.numel()]
    gen = torch.Generator().manual_seed(5)
    xs.append((torch.randint(-3, 4, (3000,), generator=gen) * 0.25).to(dtype).to(device))
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -1.5, 2.0,
                            -0.0, float("nan")]).to(dtype).to(device)
    xs.append(special)
    ks = [1, 1, 2048, 1250, 37, 1000, 1700, 9]
    ks += [t + 1 for t in range(9)]
    xs += [special] * 9
    got = kernels.smallest_magnitudes(xs, ks).cpu()
    want = torch.stack([x.float().abs().sort().values[k - 1] for x, k in zip(xs, ks)]).cpu()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])
    with pytest.raises(InputError, match="one k in"):
        kernels.smallest_magnitudes(xs[:2], [1, 2])


def test_pack_bits_is_numpys_packbits_and_unpack_bits_inverts_it():
    from mergehub.kernels.deltas import pack_bits, unpack_bits

    bits = torch.rand(3, 1001, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack_bits(bits)
    assert torch.equal(packed, torch.from_numpy(np.packbits(bits.numpy(), axis=-1)))
    assert torch.equal(unpack_bits(packed[1], 1001), bits[1])


def _random_deltas(shape, device, gen):
    rows, cols = kernels.deltas.matrix_shape(shape)
    nb = (rows * cols + 7) // 8

    def bits():
        return torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=gen).to(device)

    out = [SignDelta(bits(), torch.rand(rows, generator=gen).to(device)),
           TernaryDelta(bits(), bits(), 0.0123),
           SignDelta(bits(), torch.rand(1, generator=gen).to(device))]
    if len(shape) == 2:
        out.append(LowRankDelta(torch.randn(rows, 5, generator=gen).to(device) * 0.1,
                                torch.randn(5, cols, generator=gen).to(device)))
    return out


def _numpy_dense(d, shape):
    """Independent decode with numpy's unpackbits."""
    rows, cols = kernels.deltas.matrix_shape(shape)
    n = rows * cols
    if isinstance(d, SignDelta):
        up = np.unpackbits(d.bits.cpu().numpy(), count=n).reshape(rows, cols)
        s = np.broadcast_to(d.scales.cpu().numpy().reshape(-1, 1), (rows, 1))
        return np.where(up == 1, s, -s).astype(np.float32)
    if isinstance(d, TernaryDelta):
        m = np.unpackbits(d.mask.cpu().numpy(), count=n)
        sg = np.unpackbits(d.signs.cpu().numpy(), count=n)
        v = np.where(m == 1, np.where(sg == 1, 1, -1) * np.float32(d.value), 0)
        return v.astype(np.float32).reshape(rows, cols)
    return d.left.cpu().double().numpy() @ d.right.cpu().double().numpy()


@pytest.mark.parametrize("shape", [(37, 53), (101,), (5, 3, 7), ()])
def test_dense_is_numpy_unpackbits_decode(shape):
    """The reference decode of 1-bit and ternary deltas equals numpy's, bit for bit (signed
    zeros too), also for awkward values: a zero or negative scale, a ternary value of ±0."""
    gen = torch.Generator().manual_seed(3)
    rows, cols = kernels.deltas.matrix_shape(shape)
    nb = -(-rows * cols // 8)

    def bits():
        return torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=gen)

    scales = torch.rand(rows, generator=gen)
    scales[::3] = 0.0
    scales[1::3] *= -1
    deltas = [SignDelta(bits(), scales), SignDelta(bits(), torch.tensor([0.25]).half())]
    deltas += [TernaryDelta(bits(), bits(), v) for v in (0.0123, -0.5, 0.0, -0.0)]
    for d in deltas:
        got = kernels.deltas.dense(d, shape)
        want = torch.from_numpy(_numpy_dense(d, shape)).reshape(shape)
        assert got.dtype == torch.float32
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), d


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(37, 53), (101,), (5, 3, 7), (1, 129), (33, 136), (3, 5, 8)])
def test_apply_deltas(device, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=gen).to(dtype).to(device)
    deltas = _random_deltas(shape, device, gen)
    scales = [0.5, -1.0, 2.0, 0.3][:len(deltas)]
    got, want = _both(kernels.apply_deltas, base, deltas, scales)
    assert got.dtype == dtype
    oracle = base.float().cpu().numpy().reshape(kernels.deltas.matrix_shape(shape))
    for d, s in zip(deltas, scales):
        oracle = oracle + s * _numpy_dense(d, shape)
    assert np.allclose(want.float().cpu().numpy().reshape(oracle.shape), oracle,
                       rtol=1e-2, atol=1e-2)
    if len(shape) == 2:  # a low-rank delta: tl.dot sums in another order than matmul
        f32 = _both(kernels.apply_deltas, base, deltas, scales, out_dtype=torch.float32)
        assert torch.allclose(*f32, rtol=1e-5, atol=1e-5)
        got, want = _both(kernels.apply_deltas, base, deltas[:3], scales[:3])
    assert torch.equal(got, want)


@pytest.mark.parametrize("codec,params", [("bit1", {"granularity": "row"}),
                                          ("bit1", {"granularity": "matrix"}),
                                          ("compeft", {"density": 0.1, "alpha": 1.0}),
                                          ("lowrank", {"rank": 3, "energy": 1.0})])
def test_codec_decode_on_device(device, codec, params):
    """A codec's decode with the base on ``device`` gives the CPU decode's bytes (lowrank on
    CUDA: within float32 rounding, as ``exact_on_cuda`` declares)."""
    base, (theta,) = _inputs((67, 45), 1, torch.bfloat16, "cpu", seed=11)
    lossy = LOSSY[codec]
    header, payload = lossy.encode(theta, base, params)
    cpu = lossy.decode(memoryview(payload), header, base)
    got = lossy.decode(memoryview(payload), header, base.to(device))
    assert got.device.type == device and got.dtype == torch.float32
    if lossy.exact_on_cuda or device == "cpu":
        assert torch.equal(got.cpu(), cpu)
    else:
        assert torch.allclose(got.cpu(), cpu, rtol=1e-6, atol=1e-6)


def test_bad_input_is_named():
    base = torch.zeros(3, 4)
    with pytest.raises(InputError, match="q_proj: input 1 has shape"):
        kernels.merge_tensor(base, [base, torch.zeros(4, 3)], weights=[1, 1], lam=1,
                             name="q_proj")
    with pytest.raises(InputError, match="2 TALL masks for 1 inputs"):
        kernels.merge_tensor(base, [base], weights=[1], lam=1, masks=torch.ones(2, 3, 4))
    with pytest.raises(InputError, match="elect must be"):
        kernels.merge_tensor(base, [base], weights=[1], lam=1, elect="max")
    with pytest.raises(InputError, match="low-rank factors"):
        kernels.apply_deltas(base, [LowRankDelta(torch.zeros(3, 2), torch.zeros(2, 5))])
    with pytest.raises(InputError, match="sign bits must be uint8"):
        kernels.apply_deltas(base, [SignDelta(torch.zeros(3, dtype=torch.uint8),
                                              torch.ones(3))])


def test_imports_and_falls_back_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch; from mergehub import kernels\n"
            "assert not kernels.triton_available()\n"
            "b = torch.zeros(5); t = torch.ones(5)\n"
            "out = kernels.merge_tensor(b, [t, t], weights=[1, 1], lam=0.5, elect='sum')\n"
            "assert out.tolist() == [0.5] * 5, out\n"
            "assert kernels.magnitude_cut(b, t, 0.5).threshold == 1.0\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
