"""Each merge method against the spec's worked example and the plain reference implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import merge_reference as ref
import mergehub
from mergehub.merge.methods import METHODS, TensorContext

BASE = [0.50, -0.20, 0.10, 0.00, 0.30, -0.40]
TAUS = [[0.30, -0.10, 0.05, 0.00, 0.20, -0.60],
        [-0.40, 0.20, 0.01, 0.10, -0.05, -0.30],
        [0.10, 0.50, -0.02, -0.30, 0.15, 0.02]]


def run(method: str, params: dict, model_params: list[dict], base=BASE, taus=TAUS,
        seed: int = 0) -> list[float]:
    cls = METHODS[method]
    m = cls(params)
    full = [{**{k: v for k, v in cls.model_params.items()}, **p} for p in model_params]
    m.validate(full, [f"m{i}" for i in range(len(full))])
    b = torch.tensor(base, dtype=torch.float32)
    xs = [torch.tensor(t, dtype=torch.float32) for t in taus]
    if not cls.on_deltas:
        xs = [b + x for x in xs]
    stats = m.prepass
    while stats is not None and stats.passes < stats.rounds():
        stats.observe("t", xs)
        stats.finish()
    ctx = TensorContext("t", torch.device("cpu"), seed,
                        None if stats is None else stats.for_tensor("t", b.numel()),
                        row_size=1, numel=b.numel())

    def chunks(which=None):
        yield b, xs if which is None else [xs[i] for i in which]

    return torch.cat(list(m.merge_chunks(chunks, [(0, b.numel())], full, ctx))).tolist()


def close(a, b, tol=1e-6):
    assert len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b)), (a, b)


def test_task_arithmetic_spec_example():
    out = run("task_arithmetic", {"lambda": 0.5}, [{}, {}, {}])
    close(out, [0.50, 0.10, 0.12, -0.10, 0.45, -0.84], 1e-6)


@pytest.mark.parametrize("weights, lam", [((1, 1, 1), 1.0), ((1, 0.5, 2), 0.3), ((0, 2, -1), 1.5)])
def test_task_arithmetic_reference(weights, lam):
    out = run("task_arithmetic", {"lambda": lam}, [{"weight": w} for w in weights])
    close(out, ref.task_arithmetic(BASE, TAUS, list(weights), lam))


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_reference(normalize):
    weights = [1.0, 0.5, 2.0]
    thetas = [[b + t for b, t in zip(BASE, tau)] for tau in TAUS]
    out = run("linear", {"normalize": normalize}, [{"weight": w} for w in weights])
    close(out, ref.linear(thetas, weights, normalize))


def test_linear_equal_weights_is_soup():
    thetas = [[b + t for b, t in zip(BASE, tau)] for tau in TAUS]
    close(run("linear", {}, [{}, {}, {}]), [sum(c) / 3 for c in zip(*thetas)])


def test_consensus_task_arithmetic_spec_example():
    # spec: τMTL = Σ τt, λt = 0.4, k = 2 -> τcons = [0, 0.60, 0, 0, 0.30, -0.88]
    out = run("consensus_task_arithmetic", {"lambda": 1.0, "k": 2}, [{}, {}, {}])
    close(out, [b + c for b, c in zip(BASE, [0.0, 0.60, 0.0, 0.0, 0.30, -0.88])])
    mtl = [sum(c) for c in zip(*TAUS)]
    for k in (0, 1, 2, 3):
        for lam in (0.2, 0.6):
            out = run("consensus_task_arithmetic", {"lambda": 0.7, "k": k},
                      [{"tall_lambda": lam}] * 3)
            close(out, ref.tall_consensus(BASE, TAUS, mtl, [lam] * 3, k, 0.7))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_consensus_task_arithmetic_weighted_masks(k):
    """Weights enter both sides of the mask: with weights wt the masks are the spec's masks of
    the vectors wt·τt against Σ wt τt, and a normalized merge (÷ Σ wt) has the same masks as
    the unnormalized one, so equal weights 2 with normalize give the unit-weight masks."""
    weights = [1.0, 0.5, 2.0]
    scaled = [[w * v for v in t] for w, t in zip(weights, TAUS)]
    mtl = [sum(c) for c in zip(*scaled)]
    out = run("consensus_task_arithmetic", {"lambda": 0.7, "k": k},
              [{"weight": w, "tall_lambda": 0.4} for w in weights])
    close(out, ref.tall_consensus(BASE, scaled, mtl, [0.4] * 3, k, 0.7))
    total = [sum(c) for c in zip(*TAUS)]
    out = run("consensus_task_arithmetic", {"lambda": 0.7, "k": k, "normalize": True},
              [{"weight": 2.0, "tall_lambda": 0.4}] * 3)
    close(out, ref.tall_consensus(BASE, TAUS, total, [0.4] * 3, k, 0.7 / 3))


def test_tall_masks_spec_example():
    from mergehub.ops.consensus import tall_masks

    xs = [torch.tensor(t) for t in TAUS]
    mtl = sum(xs)
    masks = [m.int().tolist() for m in tall_masks(xs, mtl, [0.4] * 3)]
    assert masks == [[1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 0, 1], [1, 1, 0, 1, 1, 0]]


@pytest.mark.parametrize("metric, values, p, expected", [
    ("loss", [1.2, 0.9, 0.8, 0.85], 2, [0.1424, 0.2532, 0.3205, 0.2839]),
    ("step", [250, 500, 750, 1000], 2, [0.0333, 0.1333, 0.3, 0.5333]),
    ("loss", [1.2, 0.9, 0.8, 0.85], 0, [0.25] * 4),
])
def test_metric_weighted_spec_weights(metric, values, p, expected):
    from mergehub.merge.methods.metric_weighted import mwa_weights

    close(mwa_weights(values, metric, p), expected, 5e-5)
    close(mwa_weights(values, metric, p), ref.mwa_weights(values, metric, p))
    taus = TAUS + [[0.01] * 6]
    out = run("metric_weighted", {"metric": metric, "penalty": p},
              [{metric: v} for v in values], taus=taus)
    thetas = [[b + t for b, t in zip(BASE, tau)] for tau in taus]
    close(out, ref.linear(thetas, ref.mwa_weights(values, metric, p), normalize=True))


def test_metric_weighted_needs_metrics():
    with pytest.raises(ValueError, match="input 'm1' has no positive loss"):
        run("metric_weighted", {}, [{"loss": 1.0}, {}, {"loss": 2.0}])
    with pytest.raises(ValueError, match="input 'm2' has no positive loss"):  # NaN in metrics
        run("metric_weighted", {}, [{"loss": 1.0}, {"loss": 2.0}, {"loss": math.nan}])


# --- TIES and friends: the spec's example, mergekit 0.1.5's outputs, the plain reference ----

# mergekit 0.1.5 `merge_tensors` on θt = fp32(θ0 + τt) (outputs recorded by running it)
MK_TIES = [0.800000011920929, 0.23999999463558197, 0.10000000149011612, -0.30000001192092896,
           0.46666669845581055, -0.9000000953674316]
MK_TIES_NO_NORM = [0.800000011920929, 0.9000000357627869, 0.10000000149011612,
                   -0.6000000238418579, 0.800000011920929, -1.1500000953674316]
MK_TIES_RESCALE = [0.8409091234207153, 0.30605852603912354, 0.10000000149011612,
                   -0.34421053528785706, 0.49049443006515503, -0.9723232984542847]
MK_TA_W = [0.6500000357627869, 0.30000001192092896, 0.10750000178813934, -0.2750000059604645,
           0.5375000238418579, -0.7549999952316284]
MK_TA_W_NORM = [0.5428571701049805, -0.05714285373687744, 0.10214285552501678,
                -0.07857143133878708, 0.3678571581840515, -0.5014286041259766]
MK_BREADCRUMBS = [1.0, -0.20000001788139343, 0.10000000149011612, -0.550000011920929,
                  0.800000011920929, -0.550000011920929]
MK_BREADCRUMBS_TIES = [1.0, -0.30000001192092896, 0.10000000149011612, -0.6000000238418579,
                       0.800000011920929, -0.550000011920929]
MK_LINEAR = [0.5857143402099609, 0.08571428805589676, 0.10428571701049805, -0.15714286267757416,
             0.4357143044471741, -0.6028571724891663]
W = [1.0, 0.5, 2.0]


def fp32_taus():
    """The deltas mergekit sees: fp32(θ0 + τt) − θ0 in fp32."""
    b = torch.tensor(BASE)
    return [((b + torch.tensor(t)) - b).tolist() for t in TAUS]


def test_ties_spec_example_unit_weights():
    out = run("ties", {"lambda": 1.0}, [{"density": 0.5}] * 3)
    close(out, [0.10, 0.15, 0.10, -0.30, 0.475, -0.85])


@pytest.mark.parametrize("params, expected", [
    ({}, MK_TIES), ({"normalize": False}, MK_TIES_NO_NORM), ({"rescale": True}, MK_TIES_RESCALE)])
def test_ties_matches_mergekit(params, expected):
    out = run("ties", params, [{"weight": w, "density": 0.5} for w in W], taus=fp32_taus())
    close(out, expected, 1e-6)


@pytest.mark.parametrize("params, expected", [({"lambda": 0.5}, MK_TA_W),
                                              ({"lambda": 0.5, "normalize": True}, MK_TA_W_NORM)])
def test_task_arithmetic_matches_mergekit(params, expected):
    close(run("task_arithmetic", params, [{"weight": w} for w in W], taus=fp32_taus()), expected)


def test_linear_matches_mergekit():
    close(run("linear", {}, [{"weight": w} for w in W], taus=fp32_taus()), MK_LINEAR)


@pytest.mark.parametrize("method, expected", [("breadcrumbs", MK_BREADCRUMBS),
                                              ("breadcrumbs_ties", MK_BREADCRUMBS_TIES)])
def test_breadcrumbs_matches_mergekit(method, expected):
    params = [{"weight": w, "density": 0.5, "gamma": 0.2} for w in W]
    close(run(method, {}, params, taus=fp32_taus()), expected)


def test_breadcrumbs_gamma_below_one_entry_is_magnitude_trim():
    """gamma·n < 1 drops no outlier: a plain top-3 trim, no sign election (mergekit 0.1.5)."""
    params = [{"weight": w, "density": 0.5, "gamma": 0.01} for w in W]
    close(run("breadcrumbs", {}, params, taus=fp32_taus()),
          [0.6000000238418579, 0.9000000357627869, 0.10000000149011612, -0.6000000238418579,
           0.800000011920929, -1.1500000953674316])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("elect", ["sum", "count"])
def test_ties_reference_random(seed, elect):
    gen = torch.Generator().manual_seed(seed)
    n = 257
    base = torch.randn(n, generator=gen).tolist()
    taus = [(torch.randn(n, generator=gen) * 0.1).tolist() for _ in range(4)]
    weights = (torch.rand(4, generator=gen) * 2 - 0.5).tolist()
    densities = [0.1, 0.3, 0.5, 1.0]
    params = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    out = run("ties", {"lambda": 0.8, "sign_method": elect}, params, base=base, taus=taus)
    close(out, ref.ties(base, taus, weights, densities, 0.8, True, elect), 1e-5)


@pytest.mark.parametrize("ties, want", [
    ("index", [0.1, -0.1, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0]),  # k = 4: 0.2, then the first three 0.1s
    ("threshold", [0.1, -0.1, 0.1, 0.2, -0.1, 0.0, 0.1, 0.0])])  # every |τ| >= 0.1
def test_ties_trim_tie_rules(ties, want):
    """k = int(0.5·8) = 4 of five magnitudes tied at 0.1: ``index`` keeps exactly 4 (ties by
    position, lowest first), ``threshold`` all of them."""
    taus = [[0.1, -0.1, 0.1, 0.2, -0.1, 0.0, 0.1, 0.05]]
    out = run("ties", {"ties": ties}, [{"density": 0.5}], base=[0.0] * 8, taus=taus)
    close(out, want)
    close(out, ref.ties([0.0] * 8, taus, [1.0], [0.5], ties=ties))


def run_chunked(method: str, params: dict, model_params: list[dict], taus: list[torch.Tensor],
                chunk_rows: int) -> tuple[torch.Tensor, object]:
    """A merge of [rows, cols] task vectors against a zero base as the engine's chunked path
    runs it: whole-tensor statistics over a stream of ``chunk_rows``-row chunks, then the
    merge chunk by chunk. Returns the merged delta and the method."""
    cls = METHODS[method]
    m = cls(params)
    full = [{**cls.model_params, **p} for p in model_params]
    m.validate(full, [f"m{i}" for i in range(len(full))])
    rows, cols = taus[0].shape
    base = torch.zeros(rows, cols)
    ranges = [(r, min(rows, r + chunk_rows)) for r in range(0, rows, chunk_rows)]

    def chunks(which=None):
        for r0, r1 in ranges:
            yield base[r0:r1], [taus[i][r0:r1] for i in (range(len(taus)) if which is None
                                                         else which)]

    ctx = TensorContext("t", torch.device("cpu"), 0, row_size=cols, numel=rows * cols)
    return torch.cat(list(m.merge_chunks(chunks, ranges, full, ctx))), m


@pytest.mark.parametrize("shape, chunk_rows", [((64, 50), 1), ((64, 50), 7), ((64, 50), 64),
                                               ((1100, 1000), 97)])
@pytest.mark.parametrize("ties", ["index", "threshold"])
def test_trim_of_bf16_deltas_matches_oracle(shape, chunk_rows, ties):
    """One bf16 fine-tune's τ (many magnitudes tied at every cut) trimmed by TIES in chunks —
    rows of one, chunks that split runs of ties, the whole tensor; and a tensor past the
    exact-selection size, where sampled brackets and a position pass find the cut — keeps
    exactly the oracle's entries: the k = int(d·n) first of the ranking (``index``) or all
    tied with the k-th (``threshold``). A single input with unit weight merges to its trimmed
    τ exactly."""
    n = shape[0] * shape[1]
    tau = _bf16_taus(n, seed=shape[0] + chunk_rows).reshape(shape)
    split = 0
    for density in (0.2, 0.05, 0.5, 0.0, 1e-9):
        out, m = run_chunked("ties", {"ties": ties}, [{"density": density}], [tau], chunk_rows)
        k = ref.kept_count(density, n)
        want = ref.top_k_mask(tau.numpy(), k) if ties == "index" else \
            ref.threshold_mask(tau.numpy(), k)
        assert torch.equal(out.reshape(-1), tau.reshape(-1) * torch.from_numpy(want)), density
        assert m.kept_report().kept == [int(want.sum())]
        assert want.sum() == k if ties == "index" else want.sum() >= k
        split += int(ref.threshold_mask(tau.numpy(), k).sum() > k)
    assert split >= 2  # the cuts fall inside runs of ties: the rules differ there


@pytest.mark.parametrize("chunk_rows", [1, 5, 40])
@pytest.mark.parametrize("ties", ["index", "threshold"])
def test_breadcrumbs_band_of_bf16_deltas_matches_oracle(chunk_rows, ties):
    """Breadcrumbs' two-sided trim on bf16 deltas: ``index`` keeps exactly int(d·n) entries,
    ranks [top, top + keep) of the oracle's ranking (mergekit's magnitude_outliers with ties
    by position); ``threshold`` the old band lo < |τ| <= hi between the values at those
    ranks."""
    tau = _bf16_taus(40 * 37, seed=chunk_rows).reshape(40, 37)
    n = tau.numel()
    flat = tau.reshape(-1).numpy()
    for density, gamma in ((0.5, 0.1), (0.2, 0.01), (0.6, 0.45), (0.0, 0.1), (0.3, 0.0)):
        out, m = run_chunked("breadcrumbs", {"ties": ties},
                             [{"density": density, "gamma": gamma}], [tau], chunk_rows)
        if ties == "index":
            want = ref.band_mask(flat, density, gamma)
            assert want.sum() == int(density * n)
        else:
            keep = int(density * n)
            top = min(int(gamma * n), n - keep)
            desc = np.sort(np.abs(flat))[::-1]
            hi = desc[top]
            lo = desc[top + keep] if top + keep < n else -np.inf
            want = (np.abs(flat) > lo) & (np.abs(flat) <= hi) if keep else np.zeros(n, bool)
        assert torch.equal(out.reshape(-1), tau.reshape(-1) * torch.from_numpy(want)), density
        assert m.kept_report().kept == [int(want.sum())]


@pytest.mark.parametrize("ties", ["index", "threshold"])
def test_ties_merge_of_bf16_deltas_matches_reference(ties):
    """The whole TIES merge (trim, election, disjoint mean) of four bf16 fine-tunes with
    weights, in chunks, against the plain reference."""
    taus = [_bf16_taus(30 * 41, seed=s).reshape(30, 41) for s in range(4)]
    weights, densities = [1.0, 0.5, 2.0, 0.8], [0.2, 0.1, 0.3, 0.5]
    params = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    out, _ = run_chunked("ties", {"lambda": 0.8, "ties": ties}, params, taus, 7)
    want = ref.ties([0.0] * taus[0].numel(), [t.reshape(-1).tolist() for t in taus], weights,
                    densities, 0.8, True, "sum", ties)
    close(out.reshape(-1).tolist(), want, 1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_consensus_ties_reference(normalize):
    """One tensor: τMTL the disjoint sum (the default) or, with ``normalize: true``, the
    disjoint mean of the trimmed vectors (mergehub's former rule, now an option)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(300, generator=gen).tolist()
    taus = [(torch.randn(300, generator=gen) * 0.1).tolist() for _ in range(3)]
    params = [{"density": 0.4, "tall_lambda": 0.3}] * 3
    out = run("consensus_ties", {"k": 2, "lambda": 0.9, "normalize": normalize}, params,
              base=base, taus=taus)
    mtl = [m - b for m, b in zip(ref.ties(base, taus, [1.0] * 3, [0.4] * 3, 1.0, normalize), base)]
    close(out, ref.tall_consensus(base, taus, mtl, [0.3] * 3, 2, 0.9), 1e-5)


def tall_masks_code_consensus(base: dict, fts: list[dict], weights: list[float],
                              tall_lambda: float, lam: float) -> dict:
    """Consensus-TIES as the TALL-masks authors' code computes it (``aggregation.py``:
    ``ties_merging(tv, reset_thresh=20, merge_func="dis-sum")``, then ``construct_tall_mask``
    and ``construct_consensus_mask`` with k = 2), over the whole flattened task vectors, with
    per-task weights applied to each task vector wherever it enters (the authors have none).
    Two conventions are mergehub's, not theirs: the trim keeps exactly int(0.2·d) entries (their
    helper keeps one more) and masks compare deltas, not weights (the same up to rounding)."""
    names = sorted(base)
    flat0 = torch.cat([base[n].reshape(-1) for n in names]).double()
    taus = torch.stack([torch.cat([ft[n].reshape(-1) for n in names]).double() - flat0
                        for ft in fts])
    d = taus.shape[1]
    kth = taus.abs().kthvalue(d - int(d * 0.2) + 1, dim=1, keepdim=True).values
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    trimmed = taus * (taus.abs() >= kth) * w
    signs = torch.sign(trimmed.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    agree = torch.where(signs > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(dim=0)
    masks = (taus * w).abs() > tall_lambda * (merged - taus * w).abs()
    out = flat0 + lam * merged * (masks.sum(dim=0) >= 2)
    sizes = [base[n].numel() for n in names]
    return {n: part.reshape(base[n].shape) for n, part in zip(names, out.split(sizes))}


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.5, 2.0)])
def test_consensus_ties_default_is_the_tall_masks_code(models, tmp_path, weights):
    """Three fp32 fine-tunes (different tensors changed), several tensors: the default
    consensus_ties is the authors' disjoint sum of 20%-trimmed task vectors, trimmed over
    the whole flattened vector, and its masks weigh both sides alike."""
    from mergehub.hub.demo import make_finetune
    from mergehub.storage.checkpoint import open_checkpoint

    base_dir = models["base-fp32"]
    fts = [make_finetune(base_dir, tmp_path / f"ft{i}", pattern=p, seed=30 + i)
           for i, p in enumerate(["layers", "mlp", "self_attn"])]
    text = (f"merge_method: consensus_ties\nbase_model: {base_dir}\nmodels:\n"
            + "".join(f"  - model: {f}\n    parameters: {{weight: {w}}}\n"
                      for f, w in zip(fts, weights))
            + "parameters: {lambda: 0.8}\n")
    out = open_checkpoint(mergehub.merge(text, out=tmp_path / "out", progress=False).out)
    base = open_checkpoint(base_dir)
    load = lambda ckpt: {n: ckpt.load(n).float() for n in base.tensors}  # noqa: E731
    expected = tall_masks_code_consensus(load(base), [load(open_checkpoint(f)) for f in fts],
                                         list(weights), 0.4, 0.8)
    for name, want in expected.items():
        got = out.load(name).double()
        assert torch.allclose(got, want, atol=1e-6), name
    # the fused whole-tensor path (the GPU's, here its torch reference) computes the same
    from mergehub.merge.engine import execute
    from mergehub.merge.plan import plan_merge
    from mergehub.merge.recipe import parse_recipe

    fused = open_checkpoint(execute(plan_merge(parse_recipe(text)), tmp_path / "fused",
                                    fused=True, progress=False).out)
    assert all(torch.equal(fused.load(n), out.load(n)) for n in base.tensors)


def test_dare_statistics_and_reproducibility():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    tau = (torch.randn(n, generator=gen) * 0.1).tolist()
    base = [0.0] * n
    for density in (0.1, 0.5, 0.9):
        out = torch.tensor(run("dare_linear", {}, [{"density": density}], base=base, taus=[tau]))
        kept = (out != 0).float().mean().item()
        assert abs(kept - density) < 4 * (density * (1 - density) / n) ** 0.5 + 1e-4
        t = torch.tensor(tau)
        survivors = out != 0
        assert torch.allclose(out[survivors], t[survivors] / density, rtol=1e-5)
        # E[output] = τ: the mean of output/τ is 1 (within sampling error)
        ratio = (out * t).sum() / (t * t).sum()
        assert abs(ratio.item() - 1) < 6 * ((1 - density) / density / n) ** 0.5
    a = run("dare_ties", {}, [{"density": 0.3}] * 3, seed=7)
    b = run("dare_ties", {}, [{"density": 0.3}] * 3, seed=7)
    c = run("dare_ties", {}, [{"density": 0.3}] * 3, seed=8)
    assert a == b and a != c


def test_dare_l1_rescale_matches_mergekit_with_its_masks():
    """mergekit 0.1.5 drew these masks (torch.manual_seed(0)); rescale l1 then gives its output."""
    from mergehub.ops.sparsify import apply_mask, combine, l1_scales

    masks = [torch.tensor(m, dtype=torch.bool)
             for m in ([1, 0, 1, 1, 1, 0], [1, 0, 1, 0, 1, 1], [1, 1, 1, 0, 0, 0])]
    taus = [torch.tensor(t) for t in fp32_taus()]
    scales = l1_scales(lambda: iter([(None, taus)]), lambda t, c, offset, x: masks[t], 3)
    deltas = [apply_mask(t, m, s) for t, m, s in zip(taus, masks, scales)]
    mixed = combine(deltas, [{"weight": w} for w in W], None, False)
    close((torch.tensor(BASE) + mixed).tolist(),
          [1.2544838190078735, 1.5580644607543945, 0.150287464261055, 0.0, 0.7196769714355469,
           -0.6092105507850647], 1e-6)


def _bf16_taus(n: int, seed: int, scale: float = 0.01) -> torch.Tensor:
    """τ of a bf16 fine-tune against its bf16 base, in float32: few distinct magnitudes, so a
    trim's k-th largest sits inside a long run of ties."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    base = (sign * (0.25 + 1.75 * torch.rand(n, generator=gen))).bfloat16()  # 3 binades
    theta = (base.float() + torch.randn(n, generator=gen) * scale).bfloat16()
    return theta.float() - base.float()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_breadcrumbs_band_of_a_large_bf16_delta_matches_oracle(compiled, monkeypatch):
    """Above the size that is selected in one exact pass, the band's two cuts come from the
    sampled brackets; on bf16 deltas both fall inside runs of tied magnitudes, and the entries
    kept are still exactly ranks [top, top + keep) of the oracle's ranking (ties by position),
    streamed in chunks of 97 rows: with the compiled bracket pass (which notes where the runs
    are cut) and in torch operations (a pass more finds it)."""
    from mergehub.kernels import numba_merge
    from mergehub.ops.selection import _EXACT

    rows, cols = 1100, 1000
    assert rows * cols > _EXACT
    tau = _bf16_taus(rows * cols, seed=9).reshape(rows, cols)
    flat = tau.reshape(-1).numpy()
    calls = []
    if compiled:
        if not numba_merge.available():
            pytest.skip("no Numba")
        real = numba_merge.bracket_pass
        monkeypatch.setattr(numba_merge, "bracket_pass", lambda *a: calls.append(1) or real(*a))
    else:
        monkeypatch.setattr(numba_merge, "available", lambda: False)
    out, m = run_chunked("breadcrumbs", {"ties": "index"}, [{"density": 0.2, "gamma": 0.01}],
                         [tau], 97)
    assert len(calls) == (-(-rows // 97) if compiled else 0)  # every chunk compiled, or none
    want = ref.band_mask(flat, 0.2, 0.01)
    mags = np.abs(flat)
    for rank in (int(0.01 * flat.size), int(0.21 * flat.size)):  # the test means something:
        at = mags == np.sort(mags)[::-1][rank - 1]  # each cut splits a run of ties
        assert 0 < (at & want).sum() < at.sum()
    assert torch.equal(out.reshape(-1), tau.reshape(-1) * torch.from_numpy(want))
    assert m.kept_report().kept == [int(0.2 * flat.size)]


@pytest.mark.parametrize("ties", ["index", "threshold"])
def test_global_trim_matches_oracle(ties):
    """trim_scope: global keeps, per task, what the oracle's trim of the whole flattened task
    vector (tensors in merge order) keeps: exactly k = int(d·N) with ``index`` although many
    magnitudes tie at the cut; streamed in small chunks, so runs of ties straddle chunks and
    tensors. Density <= 0 keeps nothing there, as in the per-tensor scope."""
    from mergehub.ops.selection import magnitude_cuts
    from mergehub.ops.sparsify import cut_mask
    from mergehub.merge.methods.global_cuts import GlobalCuts

    tensors = [[_bf16_taus(1000, 1 + t), _bf16_taus(37 * 11, 3 + t, 0.02).reshape(37, 11),
                _bf16_taus(5000, 5 + t, 0.003)] for t in range(4)]
    densities = [0.2, 0.05, 0.0, 1.0]
    g = GlobalCuts(densities, ties)
    while g.passes < g.rounds():
        for i, name in enumerate(("a", "b", "c")):
            flat = [tensors[t][i].reshape(-1) for t in range(4)]
            for c in range(0, flat[0].numel(), 300):
                g.observe(name, [f[c:c + 300] for f in flat])
        g.finish()
    assert g.passes == (3 if ties == "index" else 2)  # the third pass only finds where ties end
    total = sum(x.numel() for x in tensors[0])
    for t, density in enumerate(densities):
        flat = torch.cat([x.reshape(-1) for x in tensors[t]]).numpy()
        k = ref.kept_count(density, total)
        want = ref.top_k_mask(flat, k) if ties == "index" else ref.threshold_mask(flat, k)
        got = []
        for i, name in enumerate(("a", "b", "c")):
            x = tensors[t][i]
            cut = g.for_tensor(name, x.numel())[t]
            for c in range(0, x.numel(), 300):
                part = x.reshape(-1)[c:c + 300]
                mask = cut_mask(part, cut, c)
                got.append(torch.ones_like(part, dtype=torch.bool) if mask is None else mask)
        got = torch.cat(got).numpy()
        assert (got == want).all(), (t, density)
        assert g.kept()[t] == want.sum()
        if ties == "index":
            assert want.sum() == k
            if 0 < density < 1:  # the test means something: the cut splits a run of ties
                at = np.abs(flat) == np.abs(flat[want]).min()
                assert at.sum() > (at & want).sum() > 0
    # density 0 keeps nothing in either scope (it kept one entry per task in the global one)
    x = tensors[2][0]
    assert magnitude_cuts(lambda which=None: iter([(None, [x])]), x.numel(), [0.0])[0].kept == 0
    assert g.kept()[2] == 0


@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "compiled"])
@pytest.mark.parametrize("pattern", ["random", "ties", "adversarial", "ternary", "signs"])
def test_streamed_kth_largest_is_exact(pattern, compiled):
    """The sampled bracket + count selection equals a full sort (the k-th value and the counts
    above and at it), including when the strided sample misrepresents the tensor (then it
    falls back to gathering), and on the long runs of one magnitude that compressed deltas
    have (ComPEFT's zeros and one ±value, a 1-bit delta's one scale per row), whose brackets
    hold a single value. In torch operations or the compiled bracket pass, which also notes
    the k-th entry's position in the ranking (ties by position: a stable sort's)."""
    from mergehub.kernels import numba_merge
    from mergehub.ops.selection import kth_largest_abs

    if compiled and not numba_merge.available():
        pytest.skip("no Numba")

    n = 3_000_017
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=gen)
    if pattern == "ties":
        x = torch.round(x * 8) / 8  # few distinct values
    elif pattern == "ternary":  # 10% nonzero, all of one magnitude
        x = torch.where(torch.rand(n, generator=gen) < 0.1, 0.03, 0.0) * x.sign()
    elif pattern == "signs":  # one scale per row of 1000
        x = x.sign() * torch.rand(n // 1000 + 1, generator=gen).repeat_interleave(1000)[:n]
    elif pattern == "adversarial":
        stride = max(1, n // (1 << 17))
        x = torch.full((n,), 0.01)
        x[::stride] = 5.0  # every sampled value is large, almost no other is
    step = 100_003
    chunk_list = [x[i:i + step].reshape(-1, 1) for i in range(0, n, step)]

    def chunks(which=None):
        for c in chunk_list:
            yield None, [c, -c] if which is None else [[c, -c][i] for i in which]

    ks = [[1, 17, n // 5, n - 1, n], [n // 2]]
    got, whole, kth_at = kth_largest_abs(chunks, n, ks,
                                         numba_merge.bracket_pass if compiled else None)
    mag = x.abs()
    ordered = mag.sort(descending=True, stable=True)
    for t, (row, kk) in enumerate(zip(got, ks)):
        v = [ordered.values[k - 1].item() for k in kk]
        assert row == [(u, int((mag > u).sum()), int((mag == u).sum())) for u in v]
        for j, k in enumerate(kk):
            if (t, j) in kth_at:
                assert kth_at[(t, j)] == int(ordered.indices[k - 1]), (t, k)
    if not compiled:
        assert not kth_at
    elif pattern == "random":  # brackets of several values, none missed: every position
        assert not whole and len(kth_at) == sum(map(len, ks))
    elif pattern == "ties":  # some brackets hold one value (counted only), others several
        assert 0 < len(kth_at) < sum(map(len, ks))


def _arranged(pattern: str, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, generator=gen)
    if pattern == "sorted":
        return x.abs().sort().values
    if pattern == "runs":  # runs of 16 equal values
        return torch.randn(n // 16, generator=gen).repeat_interleave(16)
    if pattern == "periodic":
        return (torch.arange(n) % 16).float() * 0.1
    if pattern == "heavy":  # Cauchy
        return torch.tan(math.pi * (torch.rand(n, generator=gen) - 0.5))
    if pattern == "ties":
        return torch.round(x * 4) / 4
    if pattern == "spike":  # 0.5% non-zero
        return x * (torch.rand(n, generator=gen) < 0.005)
    return x


@pytest.mark.parametrize("ties", ["index", "threshold"])
@pytest.mark.parametrize("pattern", ["random", "sorted", "runs", "periodic", "heavy",
                                     "ties", "spike"])
def test_sampled_cuts_within_tolerance(pattern, ties):
    """The approximate cut keeps a share of the tensor within ε of d however the values are
    arranged: with ``ties: index`` every kept entry counts, ties included, and the kept set is
    a prefix of the oracle's ranking; with ``threshold`` the entries above the threshold are at
    most d + ε and those at or above it at least d − ε. Streamed in chunks it equals one
    chunk."""
    from mergehub.ops.selection import magnitude_cuts, sample_positions
    from mergehub.ops.sparsify import cut_mask

    n = 1 << 21
    x = _arranged(pattern, n)
    mag = x.abs()
    order = torch.from_numpy(ref.ranked(x.numpy()))
    step = 100_003
    pieces = [x[i:i + step] for i in range(0, n, step)]

    def chunks(which=None):
        for c in pieces:
            yield None, [c, -c] if which is None else [[c, -c][i] for i in which]

    for tol in (0.02, 0.05):
        assert sample_positions(n, tol) is not None
        for d in (0.005, 0.1, 0.2, 0.5, 0.9, 0.995):
            got = magnitude_cuts(chunks, n, [d, d], tol, ties)
            assert got == magnitude_cuts(lambda which=None: iter([(None, [x, -x])]), n, [d, d],
                                         tol, ties)
            cut, other = got
            assert cut == other
            mask = cut_mask(x, cut)
            if ties == "index":
                kept = int(mask.sum())
                assert abs(kept / n - d) <= tol, (tol, d)
                assert bool(mask[order[:kept]].all())
            else:
                assert float((mag > cut.threshold).float().mean()) <= d + tol, (tol, d)
                assert float(mask.float().mean()) >= d - tol, (tol, d)


def test_sample_positions_plan():
    """The sample: the least count Hoeffding's bound allows, drawn uniformly, reproducibly,
    sorted, and none for small tensors."""
    from mergehub.ops.selection import SAMPLE_FAILURE, sample_positions

    def meets(c: int, tol: float) -> bool:
        return 2 * math.exp(-2 * c * (tol - 1 / c) ** 2) <= SAMPLE_FAILURE

    for n, tol in [(1 << 24, 0.01), (4096 * 13, 0.1), (999_999, 0.05)]:
        positions = sample_positions(n, tol)
        c = positions.numel()
        assert meets(c, tol) and not meets(c - 1, tol)
        assert torch.equal(positions, positions.sort().values)
        assert 0 <= int(positions[0]) and int(positions[-1]) < n
        sample_positions.cache_clear()
        assert torch.equal(sample_positions(n, tol), positions)  # the same draw every time
    # 72,744 draws over 2^24 positions, by residue mod 10: each within 5% of a tenth
    hits = torch.bincount(sample_positions(1 << 24, 0.01) % 10, minlength=10).float()
    assert sample_positions(1 << 24, 0.01).numel() == 72_744
    assert (hits / hits.mean() - 1).abs().max() < 0.05
    assert sample_positions(10_000, 0.05) is None  # would hold more than a quarter
    with pytest.raises(ValueError, match="tolerance"):
        sample_positions(1 << 20, 0.5)


@pytest.mark.parametrize("method, params", [
    ("ties", {"density": 0.2}), ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}),
    ("consensus_ties", {"density": 0.3}), ("task_arithmetic", {})])
def test_chunked_merge_equals_whole_tensor_merge(models, tmp_path, method, params):
    from mergehub.merge.engine import execute
    from mergehub.merge.plan import plan_merge
    from mergehub.merge.recipe import parse_recipe
    from mergehub.storage.checkpoint import open_checkpoint

    p = "{" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}"
    text = (f"merge_method: {method}\nbase_model: {models['base-bf16']}\nmodels:\n"
            f"  - model: {models['ft-mlp']}\n    parameters: {p}\n"
            f"  - model: {models['ft-attn']}\n    parameters: {p}\n"
            f"  - model: {models['lora']}\n    parameters: {p}\nout_dtype: float32\n")
    outs = []
    for chunk in (37, 1 << 30):
        plan = plan_merge(parse_recipe(text))
        outs.append(open_checkpoint(execute(plan, tmp_path / f"c{chunk}", chunk_elements=chunk,
                                            progress=False).out))
    for name in outs[0].tensors:
        assert torch.equal(outs[0].load(name), outs[1].load(name)), name


def test_l1_rescale_does_not_change_with_torch_threads():
    """DARE's and TIES' ``rescale: l1`` sums |τ| and |kept τ| per tensor; torch's float32 sum on
    the CPU splits the work by thread and comes out differently with 1, 2 or 3 threads (as a
    merge chooses them by the machine's load), which changed merged bytes from run to run. The
    scales are the same whatever the threads, and equal Σ|τ| / Σ|kept τ| summed exactly."""
    from mergehub.ops.sparsify import l1_scales

    gen = torch.Generator().manual_seed(0)
    n = (1 << 18) + 12345
    xs = [torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4 for _ in range(2)]
    keep = [torch.rand(n, generator=gen) < 0.5 for _ in range(2)]

    def chunks(which=None):
        for start in range(0, n, 100_000):
            yield None, [x[start:start + 100_000] for x in xs]

    def masks(t, c, offset, x):
        return keep[t][offset:offset + x.numel()]

    before = torch.get_num_threads()
    got, torch_sums = [], set()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append(l1_scales(chunks, masks, 2))
            torch_sums.add(float((xs[0].abs() * keep[0]).sum()))
    finally:
        torch.set_num_threads(before)
    assert len(torch_sums) > 1  # the input shows the problem
    assert got[0] == got[1] == got[2]
    exact = [math.fsum(x.abs().double().tolist()) / math.fsum((x.abs() * k).double().tolist())
             for x, k in zip(xs, keep)]
    assert got[0] == pytest.approx(exact, rel=1e-12)
