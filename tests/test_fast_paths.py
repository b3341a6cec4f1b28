"""The CPU fast paths (mergehub.merge.methods.fast, onepass) against the plain torch functions
of mergehub.ops.sparsify, bit for bit, on awkward inputs: many ties at the cut,
all-zero and mostly-zero task vectors, signed zeros, heavy tails, density 0 and 1, negative
weights, bf16/fp16/fp32 inputs, tensors smaller and larger than a chunk.

The plain functions are the reference (they are what the GPU's chunked path and the kernels'
reference run, and tests/test_merge_methods.py checks them against the element-by-element
oracle in merge_reference.py). Results are compared as bits; intermediate kept values are
compared after adding +0, which only turns -0 into +0: a dropped entry is -0 in the plain
``x * mask`` for a negative x and +0 here, and no later step tells them apart.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergehub.kernels import numba_merge
from mergehub.merge.methods import fast, onepass, sparsifiers
from mergehub.ops.selection import NOTHING, Appended, Cut, magnitude_cuts
from mergehub.ops.sparsify import (
    apply_mask, band_mask, bernoulli_mask, combine, cut_mask, draw_words, keep_threshold,
    outlier_bands, philox4x32)

WEIGHTS = {"mixed": [1.0, 0.5, 0.75, 1.0], "negative": [1.0, -0.5, 2.0, 1.0],
           "zero": [0.0, 1.0, 1e-30, 3.0]}


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaNs of the same payload included)."""
    return a.shape == b.shape and torch.equal(bits(a.float()), bits(b.float()))


def same_value(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit once -0 is +0."""
    return same(a + 0.0, b + 0.0)


def deltas(kind: str, shape: tuple[int, ...], dtype: torch.dtype, count: int = 4,
           seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(base, task vectors) as a merge sees them: fp32(θt) − fp32(θ0) of weights stored in
    ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    base.view(-1)[::7] = -0.0  # signed zeros in the base: base + (-0) differs from base + 0
    taus = []
    for t in range(count):
        if kind == "random":
            d = torch.randn(shape, generator=g) * 0.002
        elif kind == "ties":  # a few distinct magnitudes: long runs of ties at every cut
            d = torch.randint(-3, 4, shape, generator=g).float() * 0.004
        elif kind == "heavy":  # Cauchy-like tails, finite
            d = torch.randn(shape, generator=g) / torch.randn(shape, generator=g).abs().clamp_min(
                1e-3) * 1e-3
        elif kind == "sparse":  # mostly exact zeros
            d = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.1) * 0.01
        elif kind == "zeros":
            d = torch.zeros(shape)
        else:
            raise ValueError(kind)
        theta = (base.float() + d).to(dtype)
        if kind == "zeros" and t == 0:  # task vector entries -0 where the base is +0
            theta[base == 0] = -0.0
        taus.append(theta.float() - base.float())
    return base.float(), taus


# --- the election ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "ties", "heavy", "sparse", "zeros"])
@pytest.mark.parametrize("elect", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_elect_combine_is_plain_combine(kind, elect, normalize, weights):
    base, taus = deltas(kind, (3000,), torch.bfloat16)
    w = WEIGHTS[weights]
    params = [{"weight": x} for x in w]
    kept = [apply_mask(x, x.abs() >= x.abs().median()) for x in taus]  # ±0 where dropped
    for lam in (1.0, 0.7):
        want = base + lam * combine(kept, params, elect, normalize)
        before = [k.clone() for k in kept]
        mixed = fast.elect_combine(kept, w, elect, normalize)
        assert mixed is not None
        assert same(fast.finish(base, mixed, lam), want)
        assert all(same(k, b) for k, b in zip(kept, before))  # left as they were
        # temporaries marked spare may be overwritten: the same bits, the others untouched
        spare = [t % 2 == 0 for t in range(len(kept))]
        mixed = fast.elect_combine([k.clone() if s else k for k, s in zip(kept, spare)], w,
                                   elect, normalize, spare)
        assert same(fast.finish(base, mixed, lam), want)
        assert all(same(k, b) for k, b in zip(kept, before))
    assert fast.elect_combine(kept[:1], w[:1], elect, normalize) is not None  # one input


def test_elect_combine_declines_what_is_not_finite():
    base, taus = deltas("random", (100,), torch.float32)
    for bad in (math.inf, -math.inf, math.nan):
        xs = [t.clone() for t in taus]
        xs[2][5] = bad
        assert fast.elect_combine(xs, WEIGHTS["mixed"], "sum", True) is None
        assert fast.elect_combine(xs, WEIGHTS["mixed"], "count", True) is None
    huge = [torch.full((4,), 3e38), torch.full((4,), 3e38)]  # finite, but the sum overflows
    assert fast.elect_combine(huge, [1.0, 1.0], "sum", True) is None


# --- the trim --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "ties", "sparse", "zeros"])
def test_shrink_is_the_plain_mask(kind):
    _, taus = deltas(kind, (4096,), torch.bfloat16)
    x = taus[0]
    values = x.abs().unique()
    cuts = [None, NOTHING] + [Cut(float(v), end) for v in (values[0], values[len(values) // 2],
                                                           values[-1])
                              for end in (0, 1, 1000, 2048, 3000, 4096, 10 ** 9)]
    for cut in cuts:
        for offset in (0, 1000, 2048):
            chunk = x[offset:offset + 2048]
            want = apply_mask(chunk, cut_mask(chunk, cut, offset))
            assert same_value(fast.shrink(chunk, cut, offset), want), (cut, offset)
    inf = torch.tensor([1.0, math.inf, -math.inf, math.nan, 0.0])
    assert same(fast.shrink(inf, NOTHING, 0), apply_mask(inf, cut_mask(inf, NOTHING)))
    assert fast.shrink(inf, Cut(math.inf, 5), 0) is None


@pytest.mark.parametrize("kind", ["random", "ties", "sparse", "zeros"])
@pytest.mark.parametrize("ties", ["index", "threshold"])
def test_band_shrink_is_the_plain_band_mask(kind, ties):
    """Breadcrumbs' band as two shrinks and a subtraction gives the plain mask's values
    (signed zeros aside) for the bands that outlier_bands selects: every density and gamma
    shape (no keep cut, no outlier cut, nothing kept, cuts inside runs of ties), at chunk
    offsets that split the runs; a chunk that is not finite is left to the plain mask."""
    _, taus = deltas(kind, (4096,), torch.bfloat16)
    x = taus[0]
    stream = lambda which=None: iter([(None, [x])])  # noqa: E731
    for density, gamma in ((0.2, 0.01), (0.5, 0.1), (0.6, 0.45), (0.0, 0.1), (0.3, 0.0),
                           (1.0, 0.1), (0.999, 0.0)):
        (band,) = outlier_bands(stream, x.numel(), [density], [gamma], ties)
        for offset in (0, 1000, 2048):
            chunk = x[offset:offset + 2048]
            want = apply_mask(chunk, band_mask(chunk, band, offset))
            assert same_value(fast.band_shrink(chunk, band, offset), want), (band, offset)
    for bad in (math.inf, -math.inf, math.nan):  # declined: the plain mask runs
        odd = torch.tensor([1.0, bad, 0.0, -2.0, 0.5, -0.0, 3.0])
        (band,) = outlier_bands(lambda which=None: iter([(None, [odd])]), 7, [0.5], [0.2], ties)
        assert band is not None and fast.band_shrink(odd, band, 0) is None


# --- DARE's draws ----------------------------------------------------------------------------

def test_keep_threshold_is_u_below_density():
    """An entry is kept iff its 31-bit uniform u = ⌊r/2⌋ + 2^30 satisfies u·2^-31 < d, d
    rounded to float32 (checked in exact rationals at the two words around the threshold), for
    densities whose float32 rounding moves d·2^31 across an integer, and one that rounds to 1
    (everything kept: no word reaches the threshold)."""
    from fractions import Fraction

    for d in [0.1, 0.2, 1 / 3, 0.5, 0.9, 1e-7, (12345678 + 0.3) / 2 ** 24,
              (12345678 + 0.7) / 2 ** 24, (3_000_000 + 0.4) / 2 ** 24, 1 - 2 ** -30]:
        f = Fraction(float(torch.tensor(d, dtype=torch.float32)))
        k = keep_threshold(d)
        words = torch.tensor([2 * (k - 1 - 2 ** 30), 2 * (k - 1 - 2 ** 30) + 1,
                              2 * (k - 2 ** 30), 2 * (k - 2 ** 30) + 1], dtype=torch.int64)
        words = words[(words >= -2 ** 31) & (words < 2 ** 31)]
        want = [Fraction(int(w) // 2 + 2 ** 30, 2 ** 31) < f for w in words]
        got = ((words >> 1) + 2 ** 30 < k).tolist()
        assert got == want and want[:2] == [True, True], d
    assert keep_threshold(1 - 2 ** -30) == 2 ** 31  # float32(d) = 1: all 2^31 values below


#: Random123's known answers for Philox4x32-10 (counter, key with its low word first, output)
PHILOX_KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
              ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2,
               (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
              ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
               (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


def test_dare_words_are_philox_and_keep_the_density():
    """DARE's words are Philox4x32-10's (Random123's known answers), word p of a stream that
    of block p // 4 (any range drawn alone gives the same words, so chunking changes
    nothing), and over 2^20 entries the kept share is within 5 standard deviations of the
    density; two inputs' streams are not correlated."""
    for counter, (k0, k1), want in PHILOX_KAT:
        got = philox4x32(torch.tensor([counter]), k0 | k1 << 32)[0].tolist()
        assert got == list(want)
    key = 0xFEDC_BA98_7654_3210
    blocks = philox4x32(torch.stack([torch.arange(5), torch.zeros(5, dtype=torch.int64),
                                     torch.zeros(5, dtype=torch.int64),
                                     torch.zeros(5, dtype=torch.int64)], dim=-1), key)
    whole = [w - (1 << 32) if w >= 1 << 31 else w for w in blocks.reshape(-1).tolist()]
    assert draw_words(20, key, 0, "cpu").tolist() == whole
    for start, n in [(0, 7), (3, 9), (5, 1), (13, 7)]:
        assert draw_words(n, key, start, "cpu").tolist() == whole[start:start + n]
    high = draw_words(3, key, (1 << 34) + 1, "cpu")  # a block past 2^32: its high word counts
    assert high.tolist() != draw_words(3, key, 1, "cpu").tolist()
    if numba_merge.available():  # the CPU's compiled words are the same
        for start, n in [(0, 20), (3, 9), (5, 1), (13, 7), ((1 << 34) + 1, 3), (0, 0)]:
            assert torch.equal(numba_merge.draw_words(n, key, start),
                               draw_words(n, key, start, "cpu"))
        assert torch.equal(numba_merge.draw_words(4099, 2 ** 64 - 1, 77),
                           draw_words(4099, 2 ** 64 - 1, 77, "cpu"))
    x = torch.ones(1 << 20)
    for d in (0.05, 0.3, 0.9):
        share = float(bernoulli_mask(x, d, 11).float().mean())
        assert abs(share - d) < 5 * math.sqrt(d * (1 - d) / x.numel()), (d, share)
    a, b = bernoulli_mask(x, 0.5, 11).float(), bernoulli_mask(x, 0.5, 12).float()
    assert abs(float(((a - 0.5) * (b - 0.5)).mean()) * 4) < 5 / math.sqrt(x.numel())


@pytest.mark.parametrize("density", [0.1, 0.3, 0.9, (9_000_000 + 0.3) / 2 ** 24])
@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("key, start", [(7, 0), (0xDEAD_BEEF_CAFE, 13), (2 ** 64 - 1, 2 ** 33)])
def test_dare_keep_is_bernoulli_mask(density, scale, key, start):
    _, taus = deltas("random", (300, 70), torch.bfloat16)
    x = taus[1]
    mask = bernoulli_mask(x, density, key, start)
    got = fast.dare_keep(x, density, key, start, scale)
    kept, count = got
    assert same_value(kept, apply_mask(x, mask, scale))
    assert count == int(mask.sum())


@pytest.mark.parametrize("elect, normalize, weights, lam", [
    ("sum", True, "mixed", 1.0), ("count", True, "negative", 0.7), ("sum", False, "zero", 1.3),
    ("count", False, "mixed", 1.0)])
def test_compiled_dare_chunk_is_plain_dare_ties(elect, normalize, weights, lam):
    """DARE-TIES's chunk in Numba's loop gives the plain reference's bits (bernoulli_mask,
    apply_mask, combine, base + lam * mixed), kept counts included; an infinite input
    declines (None) instead of merging it."""
    if not numba_merge.available():
        pytest.skip("numba is not installed")
    base, taus = deltas("random", (300, 70), torch.bfloat16)  # not a multiple of BLOCK
    densities, scales = [0.1, 0.3, 0.9, 0.5], [10.0, 1.0, 1 / 0.9, 2.0]
    w = WEIGHTS[weights]
    keys, start = [7 + t for t in range(4)], 5 * 2 ** 32 + 3  # a chunk deep in a tensor
    masks = [bernoulli_mask(x, d, key, start) for x, d, key in zip(taus, densities, keys)]
    kept = [apply_mask(x, m, s) for x, m, s in zip(taus, masks, scales)]
    mixed = combine([k.reshape(-1) for k in kept], [{"weight": v} for v in w], elect, normalize)
    want = base.reshape(-1) + lam * mixed
    thresholds = [keep_threshold(d) for d in densities]
    out = torch.empty(base.numel())
    counts = numba_merge.dare_chunk(base, taus, keys, start, thresholds, scales, w, elect,
                                    normalize, lam, out)
    assert same(out, want)
    assert counts == [int(m.sum()) for m in masks]
    taus[2].view(-1)[4444] = math.inf
    assert numba_merge.dare_chunk(base, taus, keys, start, thresholds, scales, w, elect,
                                  normalize, lam, out) is None


# --- TIES in one read --------------------------------------------------------------------------

def plain_ties(base, taus, densities, weights, lam, elect, normalize, ties):
    """The reference: selection.magnitude_cuts over the whole tensor, then cut_mask,
    apply_mask and combine (chunking does not change them)."""
    flat = [t.reshape(-1) for t in taus]
    stream = lambda which=None: iter([(base.reshape(-1),  # noqa: E731
                                       flat if which is None else [flat[i] for i in which])])
    cuts = magnitude_cuts(stream, base.numel(), densities, ties=ties)
    kept = [apply_mask(x, cut_mask(x, c)) for x, c in zip(flat, cuts)]
    mixed = combine(kept, [{"weight": w} for w in weights], elect, normalize)
    return base.reshape(-1) + lam * mixed, cuts


@pytest.fixture(params=["compiled", "torch"])
def chunk_loop(request, monkeypatch):
    """Each one-pass test twice: its chunks merged in Numba's compiled loop, then in torch
    operations (the path where Numba is not installed). Yields the compiled loop's calls
    (a list that grows by one per chunk), or None for torch."""
    if request.param == "compiled":
        if not numba_merge.available():
            pytest.skip("numba is not installed")
        calls = []
        real = numba_merge.ties_chunk
        monkeypatch.setattr(numba_merge, "ties_chunk", lambda *a: calls.append(1) or real(*a))
        yield calls
        return
    monkeypatch.setattr(numba_merge, "available", lambda: False)
    yield None


def run_one_pass(base, taus, densities, weights, lam, elect, normalize, ties, chunk_rows,
                 out_dtype=torch.float32):
    rows, cols = base.shape
    ranges = [(r, min(rows, r + chunk_rows)) for r in range(0, rows, chunk_rows)]
    reads = []

    def chunks(which=None, rows=None):
        for r0, r1 in ranges if rows is None else rows:
            reads.append(r1 - r0)
            yield base[r0:r1].clone(), [taus[i][r0:r1].clone()
                                        for i in (range(len(taus)) if which is None else which)]

    n = base.numel()
    ks = [None if d >= 1 else 0 if d <= 0 else max(1, int(d * n)) for d in densities]
    done = onepass.one_pass_ties(chunks, ranges, cols, ks, ties, weights, elect, normalize, lam,
                                 out_dtype)
    return done, sum(reads)


CASES = [  # (shape, chunk rows): whole (<= WHOLE entries), held (rows too few to sample),
    ((64, 48), 5),  # and streamed after a sample of rows, in chunks of any size
    ((6, 50_000), 2),
    ((700, 400), 64),
    ((700, 400), 700),
    ((5000, 60), 333),
]


@pytest.mark.parametrize("shape, chunk_rows", CASES)
@pytest.mark.parametrize("kind, dtype", [("random", torch.bfloat16), ("ties", torch.float16),
                                         ("heavy", torch.float32)])
@pytest.mark.parametrize("ties", ["index", "threshold"])
def test_one_pass_ties_is_plain_ties(shape, chunk_rows, kind, dtype, ties, chunk_loop):
    base, taus = deltas(kind, shape, dtype)
    densities, weights = [0.2, 0.05, 0.0, 1.0], WEIGHTS["mixed"]
    want, want_cuts = plain_ties(base, taus, densities, weights, 0.9, "sum", True, ties)
    done, read = run_one_pass(base, taus, densities, weights, 0.9, "sum", True, ties, chunk_rows)
    assert done is not None  # the path applies (no bracket missed)
    got, cuts = done
    assert same(got, want)
    assert [c if c is None else (c.threshold, c.tie_end, c.kept) for c in cuts] == \
        [c if c is None else (c.threshold, c.tie_end, c.kept) for c in want_cuts]
    rows, n = shape[0], math.prod(shape)
    if n <= onepass.WHOLE or onepass.sample_rows(*shape, onepass.sample_size(n)) is None:
        assert read == rows  # one read of the rows, held
    else:
        assert rows < read < 1.25 * rows  # a few sampled rows, then one read
    if chunk_loop is not None:  # each chunk of a tensor past WHOLE in the compiled loop
        assert len(chunk_loop) == (0 if n <= onepass.WHOLE else -(-rows // chunk_rows))


@pytest.mark.parametrize("elect, normalize, weights", [("count", True, "negative"),
                                                       ("sum", False, "zero"),
                                                       ("count", False, "mixed")])
def test_one_pass_ties_elections_and_weights(elect, normalize, weights, chunk_loop):
    base, taus = deltas("ties", (700, 400), torch.bfloat16, seed=3)
    densities = [0.3, 0.1, 0.5, 1e-6]  # the last keeps k = 1
    w = WEIGHTS[weights]
    want, _ = plain_ties(base, taus, densities, w, 1.0, elect, normalize, "index")
    done, _ = run_one_pass(base, taus, densities, w, 1.0, elect, normalize, "index", 50)
    assert done is not None and same(done[0], want)


def test_one_pass_ties_in_the_output_dtype(chunk_loop):
    base, taus = deltas("random", (700, 400), torch.bfloat16)
    want, _ = plain_ties(base, taus, [0.2] * 4, WEIGHTS["mixed"], 1.0, "sum", True, "index")
    done, _ = run_one_pass(base, taus, [0.2] * 4, WEIGHTS["mixed"], 1.0, "sum", True, "index",
                           100, out_dtype=torch.bfloat16)
    assert done[0].dtype == torch.bfloat16 and torch.equal(done[0], want.to(torch.bfloat16))


def test_one_pass_ties_streamed_sample(monkeypatch, chunk_loop):
    """The sample is read as rows, the tensor once more (whatever could be held)."""
    monkeypatch.setattr(onepass, "HOLD_BYTES", 1 << 40)
    base, taus = deltas("ties", (5000, 60), torch.bfloat16)
    want, _ = plain_ties(base, taus, [0.2, 0.4, 0.0, 1.0], WEIGHTS["mixed"], 1.0, "sum", True,
                         "index")
    done, read = run_one_pass(base, taus, [0.2, 0.4, 0.0, 1.0], WEIGHTS["mixed"], 1.0, "sum",
                              True, "index", 300)
    assert done is not None and same(done[0], want)
    assert 5000 < read < 1.25 * 5000


def test_one_pass_ties_holds_only_what_fits(monkeypatch):
    """A few long rows cannot be sampled as rows: held and sampled in memory up to
    HOLD_BYTES, beyond it the plain path (``None``)."""
    base, taus = deltas("random", (6, 50_000), torch.bfloat16)
    args = (base, taus, [0.2] * 4, WEIGHTS["mixed"], 1.0, "sum", True, "index", 2)
    assert run_one_pass(*args)[0] is not None
    monkeypatch.setattr(onepass, "HOLD_BYTES", 5 * 300_000 * 4 - 1)
    assert run_one_pass(*args)[0] is None


@pytest.mark.parametrize("kind", ["zeros", "sparse"])
def test_one_pass_ties_declines_cuts_among_zeros(kind):
    """Where the k-th largest may be 0 the pass declines; the plain path merges those."""
    base, taus = deltas(kind, (700, 400), torch.bfloat16)
    done, _ = run_one_pass(base, taus, [0.2, 0.5, 0.9, 1.0], WEIGHTS["mixed"], 1.0, "sum", True,
                           "index", 100)
    assert done is None


def test_one_pass_ties_declines_what_is_not_finite(chunk_loop):
    base, taus = deltas("random", (700, 400), torch.float32)
    for bad in (math.inf, math.nan):
        xs = [t.clone() for t in taus]
        xs[1][300, 7] = bad
        done, _ = run_one_pass(base, xs, [0.2] * 4, WEIGHTS["mixed"], 1.0, "sum", True, "index",
                               100)
        assert done is None


# --- through the engine ------------------------------------------------------------------------

def _write_models(root, dtype):
    """A base and three fine-tunes: a tensor past WHOLE entries (rows sampled, then one read),
    a small one, a vector and an all-zero task vector."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    shapes = {"big.weight": (640, 512), "small.weight": (48, 40), "norm.weight": (512,),
              "frozen.weight": (300, 1000)}
    base = {n: (torch.randn(s, generator=g) * 0.02).to(dtype) for n, s in shapes.items()}
    paths = {"base": root / "base"}
    for i in range(3):
        ft = {n: (b.float() + torch.randn(b.shape, generator=g) * 0.003).to(dtype)
              for n, b in base.items()}
        ft["frozen.weight"] = base["frozen.weight"].clone()
        paths[f"ft{i}"] = root / f"ft{i}"
        paths[f"ft{i}"].mkdir()
        save_file(ft, str(paths[f"ft{i}"] / "model.safetensors"))
    paths["base"].mkdir()
    save_file(base, str(paths["base"] / "model.safetensors"))
    return paths


def _plain_only(monkeypatch):
    """Every fast path off: the engine merges with sparsify's plain functions."""
    monkeypatch.setattr(onepass, "one_pass_ties", lambda *a, **k: None)
    monkeypatch.setattr(fast, "shrink", lambda *a, **k: None)
    monkeypatch.setattr(fast, "elect_combine", lambda *a, **k: None)
    monkeypatch.setattr(sparsifiers.RandomDrop, "_fast_drop", lambda *a, **k: None)
    monkeypatch.setattr(numba_merge, "available", lambda: False)


@pytest.mark.parametrize("method, params, dtype", [
    ("ties", "{lambda: 0.9}", torch.bfloat16),
    ("ties", "{lambda: 0.9}", torch.float32),
    ("ties", "{ties: threshold, sign_method: count}", torch.bfloat16),
    ("dare_ties", "{lambda: 1.1}", torch.bfloat16),
    ("dare_ties", "{normalize: true, rescale: false}", torch.float32),
    ("breadcrumbs_ties", "{}", torch.float32),
])
def test_engine_fast_paths_give_the_plain_bits(tmp_path, monkeypatch, method, params, dtype):
    import mergehub
    from mergehub.storage.checkpoint import open_checkpoint

    paths = _write_models(tmp_path, dtype)
    densities = [0.2, 0.0, 1.0] if method == "ties" else [0.3, 0.6, 0.9]
    models = "".join(f"  - model: {paths[f'ft{i}']}\n    parameters: {{weight: {w}, density: {d}}}\n"
                     for i, (w, d) in enumerate(zip([1.0, 0.5, 0.75], densities)))
    text = (f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n{models}"
            f"parameters: {params}\nout_dtype: bfloat16\n")
    taken = []
    real = onepass.one_pass_ties
    monkeypatch.setattr(onepass, "one_pass_ties",
                        lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])
    outs, kept = [], []
    for plain in (False, True):
        if plain:
            _plain_only(monkeypatch)
        result = mergehub.merge(text, out=tmp_path / f"out-{plain}", progress=False, seed=5)
        ckpt = open_checkpoint(tmp_path / f"out-{plain}")
        outs.append({n: ckpt.load(n) for n in ckpt.tensors})
        tally = result.report["kept"]
        kept.append((tally.kept, tally.seen))
    for name, want in outs[1].items():
        assert torch.equal(outs[0][name].view(torch.int16), want.view(torch.int16)), name
    assert kept[0] == kept[1]
    if method == "ties":  # big, small and norm in one read; frozen (cut among zeros) declined
        assert sorted(t is not None for t in taken) == [False, True, True, True]


def test_appended_holds_the_pieces_in_order_in_few_buffers():
    """Appended (the candidates a streamed selection notes) gives back exactly what was
    appended or written into what it reserved, in order, and regrows its buffer only
    O(log n) times (one buffer instead of a tensor per chunk)."""
    gen = torch.Generator().manual_seed(0)
    pieces = [torch.randn(int(m), generator=gen) for m in
              torch.randint(0, 3000, (200,), generator=gen)] + [torch.randn(20_000, generator=gen)]
    held, buffers = Appended(torch.float32), set()
    for i, piece in enumerate(pieces):
        if i % 2:
            held.append(piece)
        else:  # written in place, as index_select(out=...) does
            torch.neg(piece, out=held.reserve(piece.numel())).neg_()
        buffers.add(held.buffer.data_ptr())
    assert torch.equal(held.values(), torch.cat(pieces)) and held.size == held.values().numel()
    assert len(buffers) <= 10
    assert Appended(torch.int64).values().numel() == 0
