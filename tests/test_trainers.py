"""Trainers (issue 6): every method lowers the loss and lands in the store as an entry that
merge and export consume; sparse fine-tuning, 1-bit adapters and IncreLoRA keep their
invariants; an interrupted run resumes onto the uninterrupted run's loss curve."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import pytest
import torch
from safetensors.torch import load_file

import mergehub
from mergehub.adapters.config import ConfigError, load_config
from mergehub.adapters.data import BOS, SEP, SyntheticDataset
from mergehub.adapters.methods import onebit, sparse
from mergehub.adapters.methods.incrlora import RESERVE, IncreLoRA
from mergehub.adapters.methods.lora import lora_layers
from mergehub.adapters.trainer import evaluate, train
from mergehub.hub.demo import dir_digests

#: per method: learning rate and extra config that make it learn in ~30 CPU steps
SETUPS = {
    "full": (1e-3, {}),
    "lora": (1e-2, {"peft": {"r": 4, "lora_alpha": 8}}),
    "ia3": (5e-2, {"peft": {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                            "feedforward_modules": ["down_proj"]}}),
    "dora": (1e-2, {"peft": {"r": 4, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}}),
    "incrlora": (1e-2, {"method_params": {"init_r": 1, "budget": 20, "grow_every": 4, "warmup": 4}}),
    "sparse": (1e-2, {"method_params": {"density": 0.05, "fisher_batches": 2}}),
    "onebit": (1e-2, {"peft": {"r": 4, "lora_alpha": 8}}),
    "adalora": (1e-2, {"peft": {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "tinit": 2,
                                "tfinal": 2, "deltaT": 1}}),
    "mezo": (1e-3, {}),
    "sparse_mezo": (2e-3, {"method_params": {"density": 0.5}}),
    "mezo-adapter": (2e-2, {"method_params": {"over": "adapter", "eps": 1e-2},
                            "peft": {"r": 4, "lora_alpha": 8}}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def config(base, tmp_path, setup: str, **extra):
    lr, more = SETUPS[setup]
    method = {"ia3": "lora", "dora": "lora", "adalora": "lora",
              "mezo-adapter": "mezo"}.get(setup, setup)
    cfg = {"base": str(base), "data": {"task": "copy", "eval_examples": 32}, "method": method,
           "steps": 30, "batch_size": 16, "lr": lr, "seed": 0,
           "run_dir": str(tmp_path / f"run-{setup}"), **more}
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    """Every method trained once into one store (and an output dir)."""
    root = tmp_path_factory.mktemp("trained")
    store = mergehub.Store.init(root / "store")
    store.add(models["base-bf16"], "base", progress=False)
    out = {}
    for setup in SETUPS:
        out[setup] = train(config("base", root, setup,
                                  output={"store": setup, "dir": str(root / "out" / setup)}),
                           store=store, progress=False)
    yield store, out, root
    store.close()


def results_dir(trained, setup):
    """The weights file a full-model method wrote to its output dir."""
    return trained[2] / "out" / setup / "model.safetensors"


@pytest.mark.parametrize("setup", list(SETUPS))
def test_each_method_lowers_the_loss_and_is_stored(trained, setup):
    store, results, root = trained
    r = results[setup]
    first, last = sum(r.losses[:5]) / 5, sum(r.losses[-5:]) / 5
    assert last < first - 0.02, (setup, r.losses)
    info = store.show(setup)
    assert info.base == "base"
    assert info.metrics["step"] == 30 and info.metrics["loss"] == pytest.approx(sum(r.losses[-10:]) / 10)
    assert [h["step"] for h in info.metrics["history"]] == [3 * i for i in range(1, 11)]
    assert info.provenance["trainer"]["method"] == load_config(
        config("base", root, setup, output={"store": "x"})).method
    # plain LoRA-family results are adapters; DoRA / IA3 are merged into the base (hub merge
    # cannot read them as deltas); the rest are fine-tunes (deltas of the base)
    adapter = setup in ("lora", "incrlora", "onebit", "mezo-adapter")
    assert info.kind == ("adapter" if adapter else "finetune")
    # export gives back the output dir bit for bit
    exported = store.export(setup, root / "export" / setup, progress=False)
    assert dir_digests(exported) == dir_digests(root / "out" / setup)


def test_stored_results_merge(trained, tmp_path):
    """Store entries of every method are merge inputs; metric_weighted reads their metrics."""
    store, results, _ = trained
    names = list(SETUPS)
    recipe = tmp_path / "ta.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                      + "".join(f"  - model: {n}\n    parameters: {{weight: 0.1}}\n" for n in names))
    mergehub.merge(recipe, store=store, to_store="all-methods", progress=False, echo=lambda t: None)
    assert store.show("all-methods").kind == "merged"
    recipe = tmp_path / "mwa.yaml"
    recipe.write_text("merge_method: metric_weighted\nbase_model: base\nmodels:\n"
                      "  - model: full\n  - model: sparse\nparameters: {metric: loss, penalty: 1}\n")
    mergehub.merge(recipe, tmp_path / "mwa", store=store, progress=False, echo=lambda t: None)
    from mergehub.merge.methods.metric_weighted import mwa_weights

    losses = [store.show(n).metrics["loss"] for n in ("full", "sparse")]
    w = mwa_weights(losses, "loss", 1.0)
    merged = load_file(tmp_path / "mwa" / "model.safetensors")
    full = load_file(results_dir(trained, "full"))
    sp = load_file(results_dir(trained, "sparse"))
    name = "model.layers.0.mlp.up_proj.weight"
    expect = (w[0] * full[name].float() + w[1] * sp[name].float()).to(torch.bfloat16)
    assert (merged[name].float() - expect.float()).abs().max() <= 2 ** -7 * expect.float().abs().max()


def test_sparse_changes_only_masked_entries(trained, models):
    """Outside the mask the saved weights are bit-identical to the base; inside, at most
    int(density * their total size) entries of the selected tensors changed (FISH's global
    scope: one tensor may take more than its share)."""
    base = load_file(models["base-bf16"] / "model.safetensors")
    tuned = load_file(results_dir(trained, "sparse"))
    changed_total = selected = 0
    for name, b in base.items():
        t = tuned[name]
        changed = int((b.view(torch.int16) != t.view(torch.int16)).sum())
        if b.dim() < 2:
            assert changed == 0, name  # norms are not selected by default
        else:
            selected += b.numel()
        changed_total += changed
    assert 0 < changed_total <= int(0.05 * selected)
    assert trained[1]["sparse"].facts["sparse_entries"] == int(0.05 * selected)
    assert trained[1]["sparse"].facts["sparse_entries"] >= changed_total


class _TwoLinear(torch.nn.Module):
    """loss(x) = mean((W1 x)²) + mean((W2 (10 x))²): the second map's gradients are ~100x the
    first's, so a global ranking favours it."""

    def __init__(self):
        super().__init__()
        self.one = torch.nn.Linear(6, 5, bias=False, dtype=torch.float64)
        self.two = torch.nn.Linear(6, 3, bias=False, dtype=torch.float64)

    def forward(self, x):
        loss = self.one(x).square().mean(-1) + self.two(10 * x).square().mean(-1)
        return type("Out", (), {"loss": loss.mean()})()


def test_sparse_fisher_is_the_mean_of_per_example_squared_gradients_and_fish_top_k():
    """The oracle follows FISH (Sung et al. 2021; their fisher.py): squared gradients of
    single examples (batch size 1), summed, and one top-k over all tensors concatenated,
    keep_num = int(size * keep_ratio). Gradients are by hand:
    d mean((W x)²)/dW = 2 (W x) xᵀ / rows."""
    torch.manual_seed(0)
    model = _TwoLinear()
    gen = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(4, 6, generator=gen, dtype=torch.float64)} for _ in range(3)]
    params = sparse.select(model, r"weight$", None)
    fisher = {"one.weight": torch.zeros(5, 6, dtype=torch.float64),
              "two.weight": torch.zeros(3, 6, dtype=torch.float64)}
    with torch.no_grad():
        for b in batches:
            for x in b["x"]:
                fisher["one.weight"] += (2 * torch.outer(model.one.weight @ x, x) / 5) ** 2
                y = 10 * x
                fisher["two.weight"] += (2 * torch.outer(model.two.weight @ y, y) / 3) ** 2
    got = sparse.fisher_information(model, params, batches)
    for name, f in fisher.items():
        torch.testing.assert_close(got[name].double(), f / 12, rtol=1e-5, atol=0)
    flat = torch.cat([f.reshape(-1) for f in fisher.values()])
    keep = int(flat.numel() * 0.25)
    top = torch.zeros(flat.numel(), dtype=torch.bool)
    top[torch.topk(flat, keep)[1]] = True
    masks = sparse.fisher_masks(model, params, batches, density=0.25)
    assert sum(m.numel() for m in masks.values()) == keep
    got_flat = torch.zeros(flat.numel(), dtype=torch.bool)
    got_flat[masks.get("one.weight", torch.tensor([], dtype=torch.long))] = True
    got_flat[30 + masks["two.weight"]] = True
    assert torch.equal(got_flat, top)
    assert masks["two.weight"].numel() > 0.25 * 18  # global: the larger gradients win entries
    per_tensor = sparse.fisher_masks(model, params, batches, density=0.25, scope="tensor")
    assert [m.numel() for m in per_tensor.values()] == [round(0.25 * 30), round(0.25 * 18)]
    for name, f in fisher.items():
        top_k = torch.topk(f.reshape(-1), per_tensor[name].numel())[1]
        assert torch.equal(per_tensor[name], top_k.sort().values)


def test_sparse_top_positions_break_ties_by_position():
    values = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    assert sparse.top_positions(values, 3).tolist() == [1, 2, 3]
    assert sparse.top_positions(values, 5).tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(mergehub.MergehubError, match="scope must be 'global' or 'tensor'"):
        sparse.top_masks({"w": values}, 0.5, "layer")


def test_sparse_mask_holds_under_weight_decay():
    """Only the masked values are parameters: AdamW's weight decay cannot touch the rest."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    w0 = lin.weight.detach().clone()
    batches = [{"x": torch.randn(4, 16)} for _ in range(2)]

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return type("Out", (), {"loss": self.lin(x).pow(2).mean()})()

    model = Wrap()
    params = sparse.select(model, r"weight$", None)
    masks = sparse.fisher_masks(model, params, batches, density=0.1, scope="tensor")
    assert masks["lin.weight"].numel() == round(0.1 * 128)
    values = sparse.attach(model, masks)
    opt = torch.optim.AdamW(list(values.values()), lr=0.1, weight_decay=0.5)
    for b in batches * 3:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    sparse.detach(model)
    w = lin.weight.detach().reshape(-1)
    inside = torch.zeros(w.numel(), dtype=torch.bool)
    inside[masks["lin.weight"]] = True
    assert torch.equal(w[~inside].view(torch.int32), w0.reshape(-1)[~inside].view(torch.int32))
    assert (w[inside] != w0.reshape(-1)[inside]).all()


def test_onebit_two_values_per_group_and_packed_round_trip(trained):
    root = trained[2] / "out" / "onebit"
    tensors = load_file(root / "adapter_model.safetensors")
    assert tensors
    for name, t in tensors.items():  # default group: matrix
        assert t.unique().numel() == 2, name
    unpacked = onebit.unpack(root / onebit.PACKED_FILE)
    assert unpacked.keys() == tensors.keys()
    for name, t in tensors.items():  # the adapter is saved in the base's bf16
        assert torch.equal(unpacked[name].to(t.dtype), t), name
    n = sum(t.numel() for t in tensors.values())
    assert (root / onebit.PACKED_FILE).stat().st_size < n / 8 + 3 * 8 * len(tensors) + 4096


def test_onebit_reads_packed_files_of_the_earlier_format(tmp_path):
    """Files written before the authors' quantizer (mergehub-onebit-1: per tensor a bit1 codec
    payload, rows coded around μ with scale mean|W - μ|, and μ) still unpack."""
    from safetensors.torch import save_file

    from mergehub.storage.codecs import LOSSY

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 10, generator=gen)
    mu = w.mean(1, keepdim=True)
    _, payload = LOSSY["bit1"].encode(w, mu.expand_as(w), {"granularity": "row"})
    save_file({"x.bit1": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
               "x.mu": mu.reshape(-1).contiguous()}, str(tmp_path / "old.safetensors"),
              metadata={"format": "mergehub-onebit-1", "group": "row", "mean": "true",
                        "shapes": json.dumps({"x": [4, 10]})})
    alpha = (w - mu).abs().mean(1, keepdim=True)
    expect = torch.where(w >= mu, mu + alpha, mu - alpha)
    torch.testing.assert_close(onebit.unpack(tmp_path / "old.safetensors")["x"], expect)


def authors_qlinear_weight(w: torch.Tensor) -> torch.Tensor:
    """The weight QLinear.forward of the 1-bit adapter authors' code (PETL-ViT,
    binary_adapter/utils.py) multiplies with, for bits = 1, transcribed: the code comes from
    their Lloyd iteration on a standard normal (500 rounds from all-zero levels), the rounding
    is sign(x - boundary) * half the level gap, and the straight-through estimator acts on the
    standardised weight only."""
    normal = NormalDist()
    values, ranges = [0.0, 0.0], [0.0]
    for _ in range(500):
        ranges = [(values[1] + values[0]) / 2]
        pv = [0.0, normal.cdf(ranges[0]), 1.0]
        values = [normal.inv_cdf((pv[i] + pv[i + 1]) / 2) for i in range(2)]
    code, pos = torch.tensor(values).float(), torch.tensor(ranges).float()
    delta = (code[1:] - code[:-1]) / 2
    mean_w, std_w = w.mean(), w.std()
    x = (w - mean_w) / (std_w + 1e-5)
    q = (torch.sign(x.unsqueeze(-1) - pos) * delta).sum(-1)
    wb = q.data + x - x.data
    return wb * std_w + mean_w


def test_onebit_default_is_the_authors_quantizer_and_estimator():
    gen = torch.Generator().manual_seed(0)
    for shape in [(8, 48), (48, 8), (1, 5)]:
        w = (torch.randn(shape, generator=gen) * 0.05 + 0.01).requires_grad_(True)
        upstream = torch.randn(shape, generator=gen)
        expect = authors_qlinear_weight(w)
        (expect * upstream).sum().backward()
        expect_grad, w.grad = w.grad.clone(), None
        got = onebit.SignQuant("matrix", "normal", True)(w)
        (got * upstream).sum().backward()
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(w.grad, expect_grad, rtol=1e-5, atol=1e-6)
        # mean ± 0.6745·std, the std with n - 1 in the denominator
        levels = got.detach().unique()
        mu, std = float(w.mean()), float(w.std())
        assert levels.numel() == 2
        torch.testing.assert_close(levels.double(), torch.tensor([mu - 0.6744897 * std,
                                                                  mu + 0.6744897 * std],
                                                                 dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)
        assert not torch.equal(w.grad, upstream)  # gradient through mean and std as well
    # per row: each row standardised on its own
    w = torch.randn(4, 30, generator=gen)
    rows = onebit.quantize(w, "row", "normal")[0]
    for i in range(4):
        torch.testing.assert_close(rows[i], authors_qlinear_weight(w[i]), rtol=1e-6, atol=1e-7)


def test_onebit_starts_b_as_the_authors_up_projection(models):
    """The authors start the up-projection from N(0, 1e-3²) truncated at ±2e-3, since with
    their estimator a constant B (σ = 0) would stay constant; meanabs keeps peft's B = 0."""
    for quantizer in ("normal", "meanabs"):
        torch.manual_seed(0)
        model = _peft_lora(models["base-bf16"], r=4)
        onebit.attach(model, "matrix", quantizer, True)
        for layer in lora_layers(model).values():
            b = layer.lora_B["default"].parametrizations.weight.original
            if quantizer == "meanabs":
                assert not b.any()
            else:
                assert 0 < float(b.abs().max()) <= 2e-3 and 5e-4 < float(b.std()) < 1.5e-3


def test_onebit_meanabs_scale_is_l2_optimal_and_gradient_passes_straight_through():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=gen) * 0.3 + 0.1
    for mean in (True, False):
        wq, alpha, mu = onebit.quantize(w, "row", "meanabs", mean)
        signs = torch.where(w - mu[:, None] >= 0, 1.0, -1.0)
        for i in range(w.shape[0]):
            grid = alpha[i] * torch.linspace(0.5, 1.5, 201)
            errors = ((w[i] - (grid[:, None] * signs[i] + mu[i])) ** 2).sum(1)
            best = ((w[i] - wq[i]) ** 2).sum()
            assert best <= errors.min() + 1e-6
            assert wq[i].unique().numel() == 2
        assert torch.allclose(alpha, (w - mu[:, None]).abs().mean(1))
    latent = w.clone().requires_grad_(True)
    c = torch.randn(6, 40, generator=gen)
    (onebit.SignQuant("row", "meanabs", True)(latent) * c).sum().backward()
    assert torch.equal(latent.grad, c)
    wq_matrix = onebit.quantize(w, "matrix", "meanabs")[0]
    assert wq_matrix.unique().numel() == 2
    with pytest.raises(mergehub.MergehubError, match="mean: false needs quantizer: meanabs"):
        onebit.quantize(w, "matrix", "normal", False)


def _peft_lora(base, r=1):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def _grower(model, **kw):
    options = dict(init_r=1, budget=None, grow_every=1, grow_modules=3, warmup=0, beta=0.5,
                   init_std=0.02, seed=0)
    return IncreLoRA(model, **{**options, **kw})


def test_incrlora_growth_keeps_the_output_and_respects_the_budget(models):
    torch.manual_seed(0)
    model = _peft_lora(models["base-bf16"])
    grower = _grower(model, budget=9, grow_modules=3)
    assert grower.grow_rank == 1  # the reference's table: average target rank 9 // 4 = 2 -> 1
    grower = _grower(_peft_lora(models["base-bf16"]))  # default budget 4 x 4 modules x init_r
    assert (grower.budget, grower.grow_rank) == (16, 2)  # average 4 -> 2 ranks per growth
    grower = _grower(model := _peft_lora(models["base-bf16"]), budget=9, grow_rank=2)
    for layer in grower.layers.values():  # non-zero B, so the adapter already acts
        torch.nn.init.normal_(layer.lora_B["default"].parametrizations.weight.original, std=0.5)
    ids = torch.tensor([[BOS, 20, 1, 2, 3, 4, 5, 6, 7, 8, SEP]])
    before = model(input_ids=ids).logits
    scaling = {n: layer.scaling["default"] for n, layer in grower.layers.items()}
    names = list(grower.layers)
    reserves = {n: (getattr(layer, RESERVE).a.detach().clone(),
                    getattr(layer, RESERVE).b.detach().clone())
                for n, layer in grower.layers.items()}
    grower.sensitivity = {n: float(i + 1) for i, n in enumerate(names)}
    grower.unsure = {n: float(4 - i) for i, n in enumerate(names)}  # products 4, 6, 6, 4
    assert grower.total_rank() == 4
    grown = grower.maybe_grow(0)
    # the top 3 by sensitivity x uncertainty (ties by name), 2 ranks each until the budget
    assert grown == sorted(names[1:3]) + [names[0]]
    assert grower.ranks() == {names[0]: 2, names[1]: 3, names[2]: 3, names[3]: 1}
    assert grower.total_rank() == 9 and grower.finished  # capped by the budget; reserves gone
    assert not any(hasattr(layer, RESERVE) for layer in grower.layers.values())
    for name in grown:  # the reserve became the new ranks, with scale E = 1e-5
        a, b, scale = grower._factors(name)
        k = grower.ranks()[name] - 1
        assert torch.equal(a.weight[1:], reserves[name][0][:k])
        assert torch.equal(b.parametrizations.weight.original[:, 1:], reserves[name][1][:, :k])
        assert scale.scales.tolist() == [pytest.approx(1e-5)] * k
    after = model(input_ids=ids).logits  # the reserves' 1e-5 share is gone: ~1e-9 here
    assert torch.allclose(after, before, atol=1e-6, rtol=0)
    assert {n: layer.scaling["default"] for n, layer in grower.layers.items()} == scaling
    assert grower.maybe_grow(1) == [] and grower.total_rank() == 9


def test_incrlora_restore_rebuilds_the_grown_structure(models):
    """A checkpoint's state rebuilds every shape (ranks grown several times, reserves, grown
    scales), so the checkpointed tensors load by name."""
    torch.manual_seed(0)
    grower = _grower(model := _peft_lora(models["base-bf16"]), budget=12, grow_rank=2)
    name = list(grower.layers)[1]
    grower.grow(name, 2, 3)
    grower.grow(name, 2, 7)
    grower.observe()
    fresh = _grower(again := _peft_lora(models["base-bf16"]), budget=12, grow_rank=2)
    fresh.restore(json.loads(json.dumps(grower.state())))
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert {n: p.shape for n, p in again.named_parameters() if p.requires_grad} == shapes
    assert fresh.ranks() == grower.ranks() and fresh.ranks()[name] == 5
    assert fresh.history == grower.history


def test_incrlora_scores_the_dense_increment_times_its_uncertainty(models):
    """Oracle from the reference (loralib/increlora.py): a backward hook on the dense ΔW gives
    ∂L/∂ΔW; the step's score is sum |ΔW ⊙ ∂L/∂ΔW| / sqrt(ΔW.numel()); RankAllocator keeps
    ipt = β1 ipt + (1-β1) s and unc = β2 unc + (1-β2) |s - ipt| and ranks by ipt x unc. Here
    ∂L/∂ΔW comes from a zero probe matrix P added to each layer's output as x Pᵀ."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(models["base-bf16"], dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"]))
    grower = _grower(model, init_r=2, beta=0.6, beta_unc=0.7)
    for layer in grower.layers.values():
        torch.nn.init.normal_(layer.lora_B["default"].parametrizations.weight.original, std=0.1)
    probes = {}
    for name, layer in grower.layers.items():
        probes[name] = torch.zeros(layer.out_features, layer.in_features, requires_grad=True)
        layer.register_forward_hook(lambda m, args, out, p=probes[name]: out + args[0] @ p.T)
    ipt = {n: 0.0 for n in grower.layers}
    unc = {n: 0.0 for n in grower.layers}
    data = SyntheticDataset(["copy"], 8)
    for step in range(3):
        model.zero_grad()
        for p in probes.values():
            p.grad = None
        batch = data.batch(step, 4, 0)
        model(**batch.kwargs()).loss.backward()
        expected = {}
        for name, layer in grower.layers.items():
            reserve = getattr(layer, RESERVE)
            delta = layer.get_delta_weight("default") + layer.scaling["default"] * 1e-5 * (
                reserve.b @ reserve.a)
            s = float((delta.detach() * probes[name].grad).abs().sum()) / math.sqrt(delta.numel())
            ipt[name] = 0.6 * ipt[name] + 0.4 * s
            unc[name] = 0.7 * unc[name] + 0.3 * abs(s - ipt[name])
            expected[name] = ipt[name] * unc[name]
        grower.observe()
        got = grower.importance()
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-4), (step, name)
    assert len(set(got.values())) == len(got) and min(got.values()) > 0
    # reserves learn in advance: they are parameters and receive gradients
    assert all(getattr(layer, RESERVE).a.grad is not None and getattr(layer, RESERVE).a.grad.any()
               for layer in grower.layers.values())


def test_incrlora_starts_at_zero_scores_without_reserves(models):
    """At init B = 0, so ΔW = 0 and every score is 0 (dense and factor scores alike); with
    reserves, their 1e-5 share is what the first scores see."""
    data = SyntheticDataset(["copy"], 8)
    for score, reserve in [("dense", False), ("factors", False), ("dense", True)]:
        torch.manual_seed(0)
        model = _peft_lora(models["base-bf16"])
        grower = _grower(model, score=score, reserve=reserve)
        model(**data.batch(0, 4, 0).kwargs()).loss.backward()
        grower.observe()
        positive = [v > 0 for v in grower.sensitivity.values()]
        assert all(positive) if reserve else not any(positive), (score, reserve)


def test_incrlora_adapter_reloads_with_peft(trained, models):
    """The saved adapter (rank_pattern, alpha_pattern) gives the trained model's eval loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = trained[2] / "out" / "incrlora"
    side = json.loads((root / "incrlora_config.json").read_text())
    assert side["total_rank"] <= side["budget"] == 20
    assert side["total_rank"] > 4 * 1 * 2 or side["history"]  # it grew
    steps = [h["step"] for h in side["history"]]
    assert steps == sorted(steps)
    config = json.loads((root / "adapter_config.json").read_text())
    assert sum(config["rank_pattern"].values()) == side["total_rank"]
    model = AutoModelForCausalLM.from_pretrained(models["base-bf16"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, root)
    trained_eval = trained[1]["incrlora"].metrics["eval_loss"]
    # the adapter is saved in bf16: the reloaded model differs by bf16 rounding of A and B
    assert evaluate(peft_model, SyntheticDataset(["copy"], 32))["eval_loss"] == \
        pytest.approx(trained_eval, abs=2e-3)


@pytest.mark.parametrize("setup, steps, stop", [
    ("lora", 12, 7), ("incrlora", 12, 7), ("sparse", 12, 7), ("mezo", 12, 7),
    ("adalora", 16, 9),  # resumed while it masks ranks by its smoothed scores (kept with it)
])
def test_resume_continues_the_same_loss_curve(models, tmp_path, setup, steps, stop):
    base = models["base-bf16"]
    extra = {"steps": steps, "checkpoint_every": 4}
    full = train(config(base, tmp_path / "a", setup, output={"dir": str(tmp_path / "a-out")},
                        **extra), progress=False)
    cfg = config(base, tmp_path / "b", setup, output={"dir": str(tmp_path / "b-out")}, **extra)
    stopped = train(cfg, progress=False, stop_after=stop)
    assert stopped.interrupted
    assert stopped.last_checkpoint.name == f"checkpoint-{stop // 4 * 4:07d}"
    assert stopped.losses == full.losses[:stop]
    resumed = train(cfg, progress=False)
    assert resumed.resumed_from == stop // 4 * 4
    assert resumed.losses == full.losses
    assert dir_digests(tmp_path / "a-out") == dir_digests(tmp_path / "b-out")
    assert not (tmp_path / "b" / f"run-{setup}").exists()  # checkpoints removed once done


def test_checkpoint_of_another_config_is_refused(models, tmp_path):
    cfg = config(models["base-bf16"], tmp_path, "lora", steps=8, checkpoint_every=4,
                 output={"dir": str(tmp_path / "out")})
    train(cfg, progress=False, stop_after=5)
    moved = train({**cfg, "device": "cpu"}, progress=False, stop_after=6)  # may change
    assert moved.interrupted and moved.resumed_from == 4
    with pytest.raises(ConfigError, match="another config"):
        train({**cfg, "lr": 0.5}, progress=False)
    assert train({**cfg, "lr": 0.5}, progress=False, resume=False).steps == 8


def test_config_errors_name_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    cases = [
        ("base: b\ndata: {task: copy}\nmethod: lora\nstpes: 3\noutput: {dir: o}\n", ":4: unknown key 'stpes'", "steps"),
        ("base: b\ndata: {task: copy}\nmethod: sparse\nmethod_params:\n  densty: 0.1\noutput: {dir: o}\n",
         ":5: unknown key 'densty' in method_params of sparse", "density"),
        ("base: b\ndata: {task: copy}\nmethod: lorra\noutput: {dir: o}\n", ":3: unknown method 'lorra'", "lora"),
        ("base: b\ndata: {task: copy, path: x.jsonl}\nmethod: lora\noutput: {dir: o}\n", ":2: data needs exactly one", ""),
        ("base: b\ndata: {task: copy}\nmethod: full\nsteps: 0\noutput: {dir: o}\n", ":4: steps must be an integer >= 1", ""),
        ("base: b\ndata: {task: copy}\nmethod: full\npeft: {r: 4}\noutput: {dir: o}\n", ":4: method full does not train", ""),
        ("base: b\ndata: {task: copy}\nmethod: full\n", "output needs 'store'", ""),
        ("base: b\ndata: {task: copy}\nmethod: mezo\nmethod_params:\n  objective: acc\noutput: {dir: o}\n",
         ":5: objective must be 'loss' or 'token_error'", ""),
        # checked at config time, before the base is loaded (were refused after it)
        ("base: b\ndata: {task: copy}\nmethod: sparse\nmethod_params:\n  density: 1.5\n"
         "output: {dir: o}\n", ":4: sparse: density must be in (0, 1]", ""),
        ("base: b\ndata: {task: copy}\nmethod: sparse\nmethod_params:\n  scope: layer\n"
         "output: {dir: o}\n", ":4: sparse: scope must be 'global' or 'tensor'", ""),
        ("base: b\ndata: {task: copy}\nmethod: onebit\nmethod_params:\n  group: column\n"
         "output: {dir: o}\n", ":4: onebit group must be 'matrix' or 'row'", ""),
        ("base: b\ndata: {task: copy}\nmethod: onebit\nmethod_params:\n  mean: false\n"
         "output: {dir: o}\n", ":4: onebit mean: false needs quantizer: meanabs", ""),
        ("base: b\ndata: {task: copy}\nmethod: incrlora\npeft:\n  r: 8\noutput: {dir: o}\n",
         ":5: incrlora sets the rank itself", "init_r"),
        ("base: b\ndata: {task: copy}\nmethod: incrlora\npeft:\n  peft_type: IA3\n"
         "output: {dir: o}\n", ":5: incrlora grows a LoRA", ""),
        ("base: b\ndata: {task: copy}\nmethod: incrlora\nmethod_params:\n  score: grad\n"
         "output: {dir: o}\n", ":5: incrlora score must be 'dense' or 'factors'", ""),
        ("base: b\ndata: {task: copy}\nmethod: full\ndevice: gpu\noutput: {dir: o}\n",
         ":4: device must be cpu, cuda or cuda:N, not 'gpu'", ""),
        ("base: b\ndata: {task: copy}\nmethod: mezo\ndtype: half\noutput: {dir: o}\n",
         ":4: dtype (the weights' while training) must be one of float32, bfloat16, float16, "
         "base, not 'half'", ""),
        ("base: b\ndata: {task: copy}\nmethod: sparse_mezo\nmethod_params:\n  eps: 0.01\n"
         "  sparsity: 0.25\noutput: {dir: o}\n",
         ":6: sparse_mezo parameter 'sparsity' was renamed 'density'", "fraction"),
    ]
    for text, fragment, hint in cases:
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert f"{path}" in str(e.value) and fragment in str(e.value), str(e.value)
        assert hint in str(e.value)


def test_bad_peft_option_is_a_clear_error(models, tmp_path):
    cfg = config(models["base-bf16"], tmp_path, "lora", output={"dir": str(tmp_path / "o")},
                 peft={"r": 4, "lora_alpah": 8})
    with pytest.raises(ConfigError, match="lora_alpah"):
        train(cfg, progress=False)


def test_jsonl_prompt_completion_with_token_ids(models, tmp_path):
    """JSONL rows train on the completion only; without a tokenizer, token ids are accepted."""
    rows = [{"prompt_ids": [BOS, 20, i % 16], "completion_ids": [i % 16, (i + 1) % 16]}
            for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (tmp_path / "text.jsonl").write_text('{"text": "hello"}\n')
    cfg = {"base": str(models["base-bf16"]), "data": {"path": "train.jsonl", "eval_path": "eval.jsonl"},
           "method": "lora", "peft": {"r": 4}, "steps": 20, "batch_size": 8, "lr": 2e-2,
           "output": {"dir": "out", "overwrite": True}}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    r = train(tmp_path / "c.yaml", progress=False)
    assert r.history[-1]["eval_loss"] < r.history[0]["eval_loss"]
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    cfg["data"] = {"path": "text.jsonl"}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    with pytest.raises(mergehub.MergehubError, match=r"text.jsonl:1: text needs a tokenizer"):
        train(tmp_path / "c.yaml", progress=False)


def test_hub_train_cli_store_merge_export(models, tmp_path):
    from click.testing import CliRunner

    from mergehub.hub.cli import cli

    runner = CliRunner()
    store = str(tmp_path / "store")

    def hub(*args, code=0):
        result = runner.invoke(cli, ["--store", store, *map(str, args)])
        assert result.exit_code == code, (result.output, result.exception)
        return result.output

    hub("add", models["base-bf16"], "--name", "base")
    cfg = tmp_path / "train.yaml"
    cfg.write_text("base: base\ndata: {task: add1, eval_examples: 16}\nmethod: lora\n"
                   "peft: {r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}\n"
                   "steps: 10\nbatch_size: 8\nlr: 1.0e-2\ncheckpoint_every: 4\n"
                   "output: {store: add1-lora}\n")
    out = hub("train", cfg, "--stop-after", 6)
    assert "stopped after step 6" in out and "checkpoint-0000004" in out
    out = hub("train", cfg)
    assert "trained 10 steps" in out and "'add1-lora' (adapter of 'base')" in out
    shown = json.loads(hub("show", "add1-lora", "--json"))
    assert shown["provenance"]["trainer"]["resumed_from_step"] == 4
    assert math.isfinite(shown["metrics"]["loss"])
    (tmp_path / "r.yaml").write_text("merge_method: task_arithmetic\nbase_model: base\n"
                                     "models:\n  - model: add1-lora\n")
    assert "merged" in hub("merge", tmp_path / "r.yaml", "-o", tmp_path / "merged")
    hub("export", "add1-lora", "-o", tmp_path / "exported")
    assert (tmp_path / "exported" / "adapter_model.safetensors").is_file()
    out = hub("train", cfg, code=2)
    assert out.startswith("error: ") and "already exists" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: base\ndata: {task: add1}\nmethod: lora\nbatch: 4\noutput: {store: x}\n")
    out = hub("train", bad, code=2)
    assert out.startswith(f"error: {bad}:4: unknown key 'batch'")
    assert "--stop-after" in hub("train", "--help")


@pytest.mark.parametrize("setup", ["full", "mezo"])
def test_dtype_base_trains_in_the_base_dtype(models, tmp_path, setup):
    """``dtype: base`` on a bf16 base trains the weights in bf16 (a checkpoint holds them as
    they train: bf16, float32 without the key), the loss falls, and a changed dtype does not
    resume the other's checkpoint (it is another run)."""
    from mergehub.adapters.checkpoints import TENSORS_FILE

    base = models["base-bf16"]
    for dtype, want in (("base", torch.bfloat16), (None, torch.float32)):
        extra = {"dtype": dtype} if dtype else {}
        cfg = config(base, tmp_path / str(dtype), setup, checkpoint_every=10, **extra,
                     output={"dir": str(tmp_path / f"out-{dtype}")})
        stopped = train(cfg, progress=False, stop_after=11)
        held = load_file(stopped.last_checkpoint / TENSORS_FILE)
        assert held and {t.dtype for t in held.values()} == {want}, (dtype, setup)
        if dtype:
            with pytest.raises(ConfigError, match="another config"):
                train({**cfg, "dtype": "float32"}, progress=False)
        r = train(cfg, progress=False)
        assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5 - 0.02, (dtype, r.losses)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a missing GPU")
def test_a_device_this_machine_lacks_is_refused_before_anything_loads(models, tmp_path):
    """``device: cuda`` (config, ``train(device=)``, ``hub train --device``, with ``--nproc``
    too) on a machine without CUDA: one error naming the config and the device, no run dir,
    no output."""
    from click.testing import CliRunner

    from mergehub.hub.cli import cli

    cfg = config(models["base-bf16"], tmp_path, "lora", output={"dir": str(tmp_path / "out")})
    for given, device in ((dict(cfg, device="cuda"), None), (cfg, "cuda:1")):
        with pytest.raises(mergehub.MergehubError, match=r"device cuda.*no CUDA device"):
            train(given, progress=False, device=device)
    with pytest.raises(mergehub.MergehubError, match="device must be cpu, cuda or cuda:N"):
        train(cfg, progress=False, device="gpu")
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg))
    for more in ([], ["--nproc", "2"]):  # refused before torchrun starts its processes
        result = CliRunner().invoke(cli, ["train", str(path), "--device", "cuda", *more])
        assert result.exit_code == 2 and f"error: {path}: device cuda" in result.output, \
            result.output
    assert not (tmp_path / "run-lora").exists() and not (tmp_path / "out").exists()
    assert "cuda:N" in CliRunner().invoke(cli, ["train", "--help"]).output


@pytest.mark.gpu
@pytest.mark.parametrize("setup", list(SETUPS))
def test_each_method_trains_on_cuda(models, tmp_path, setup):
    """Every method on the GPU (``device: cuda``): its first loss is the CPU run's (the same
    base and batch, float32: within 1e-4; MeZO's is the mean of two perturbed losses, whose z
    the GPU draws from another stream: within 1e-3), the loss falls as on the CPU, and the
    result lands in the store and exports as written."""
    store = mergehub.Store.init(tmp_path / "store")
    store.add(models["base-bf16"], "base", progress=False)
    on_cpu = train(config("base", tmp_path / "cpu", setup, steps=5,  # AdaLoRA's schedule: >= 5
                          output={"dir": str(tmp_path / "cpu-out")}), store=store,
                   progress=False)
    r = train(config("base", tmp_path, setup, device="cuda",
                     output={"store": setup, "dir": str(tmp_path / "out")}), store=store,
              progress=False)
    assert r.losses[0] == pytest.approx(on_cpu.losses[0], rel=1e-3 if "mezo" in setup else 1e-4)
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5 - 0.02, r.losses
    exported = store.export(setup, tmp_path / "export", progress=False)
    assert dir_digests(exported) == dir_digests(tmp_path / "out")
    store.close()


@pytest.mark.gpu
@pytest.mark.parametrize("setup", ["mezo", "sparse_mezo"])
def test_mezo_trains_in_the_base_dtype_on_cuda(models, tmp_path, setup):
    """``device: cuda`` with ``dtype: base``: MeZO moves bf16 weights (the Triton kernels'
    path), its checkpoint holds them in bf16, and the loss falls."""
    from mergehub.adapters.checkpoints import TENSORS_FILE

    cfg = config(models["base-bf16"], tmp_path, setup, device="cuda", dtype="base",
                 checkpoint_every=10, output={"dir": str(tmp_path / "out")})
    stopped = train(cfg, progress=False, stop_after=11)
    held = load_file(stopped.last_checkpoint / TENSORS_FILE)
    assert {t.dtype for t in held.values()} == {torch.bfloat16}
    r = train(cfg, progress=False)
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5 - 0.02, r.losses


@pytest.mark.gpu
def test_hub_train_device_cuda_resumes(models, tmp_path):
    """``hub train --device cuda``: stopped and resumed on the GPU, the same losses and weights
    as one uninterrupted GPU run (within float tolerance)."""
    from click.testing import CliRunner

    from mergehub.hub.cli import cli

    base = models["base-bf16"]
    extra = {"steps": 12, "checkpoint_every": 4}
    full = train(config(base, tmp_path / "a", "lora", output={"dir": str(tmp_path / "a-out")},
                        device="cuda", **extra), progress=False)
    path = tmp_path / "b.yaml"
    path.write_text(json.dumps(config(base, tmp_path / "b", "lora",
                                      output={"dir": str(tmp_path / "b-out")}, **extra)))
    runner = CliRunner()
    out = runner.invoke(cli, ["train", str(path), "--device", "cuda", "--stop-after", "7"])
    assert out.exit_code == 0 and "stopped after step 7" in out.output, out.output
    out = runner.invoke(cli, ["train", str(path), "--device", "cuda"])
    assert out.exit_code == 0 and "trained 12 steps" in out.output, out.output
    a = load_file(tmp_path / "a-out" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b-out" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "b-out" / "metrics.json").read_text())["loss"] == \
        pytest.approx(full.metrics["loss"], rel=1e-4)


def test_evaluate_matches_the_model_loss_and_accuracy(models):
    """evaluate()'s one-forward loss and scores equal transformers' loss and accuracy()."""
    from transformers import AutoModelForCausalLM

    from mergehub.adapters.data import accuracy

    model = AutoModelForCausalLM.from_pretrained(models["base-bf16"], dtype=torch.float32)
    data = SyntheticDataset(["reverse"], 40)
    (batch,) = data.eval_batches()
    got = evaluate(model, data)
    assert got["eval_loss"] == pytest.approx(float(model(**batch.kwargs()).loss), rel=1e-5)
    assert (got["eval_exact_match"], got["eval_token_accuracy"]) == accuracy(
        model, batch.input_ids, batch.labels)


def _tiny_opt(out, dropout: float):
    """A tiny OPT (seed 0, so the same weights for every ``dropout``) whose config sets dropout,
    attention dropout and layer drop to ``dropout``."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=64, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                       dropout=dropout, attention_dropout=dropout, layerdrop=dropout)
    OPTForCausalLM(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("method", ["mezo", "sparse_mezo"])
def test_mezo_evaluates_in_eval_mode(tmp_path, method):
    """MeZO's reference (large_models/trainer.py, zo_forward) evaluates L(θ±εz) in eval mode,
    "Dropout is turned off too": the same weights with dropout 0.0 and 0.5 in an OPT config
    train bit-identically (in train mode the two passes would see different masks)."""
    runs = []
    for p in (0.0, 0.5):
        out = tmp_path / f"out-{p}"
        r = train({"base": str(_tiny_opt(tmp_path / f"opt-{p}", p)), "data": {"task": "copy"},
                   "method": method, "steps": 3, "batch_size": 8, "lr": 1e-3, "seed": 0,
                   "run_dir": str(tmp_path / f"run-{p}"), "output": {"dir": str(out)}},
                  progress=False)
        runs.append((r.losses, load_file(out / "model.safetensors")))
    (losses0, w0), (losses5, w5) = runs
    assert losses0 == losses5
    assert w0.keys() == w5.keys() and all(torch.equal(w0[k], w5[k]) for k in w0)


def test_mezo_over_an_adapter_evaluates_without_lora_dropout(models, tmp_path):
    """The same holds for peft's lora_dropout with ``over: adapter``."""
    runs = []
    for p in (0.0, 0.5):
        out = tmp_path / f"out-{p}"
        cfg = config(models["base-bf16"], tmp_path / str(p), "mezo-adapter", steps=3,
                     output={"dir": str(out)})
        cfg["peft"] = {**cfg["peft"], "lora_dropout": p}
        r = train(cfg, progress=False)
        runs.append((r.losses, load_file(out / "adapter_model.safetensors")))
    (losses0, w0), (losses5, w5) = runs
    assert losses0 == losses5
    assert all(torch.equal(w0[k], w5[k]) for k in w0)


def test_adapter_config_does_not_depend_on_the_hash_seed(trained):
    """peft saves target_modules in a set's order; the written file lists them sorted."""
    from mergehub.adapters.trainer import stable_adapter_config

    assert stable_adapter_config({"target_modules": ["v_proj", "q_proj"], "r": 4}) == \
        {"target_modules": ["q_proj", "v_proj"], "r": 4}
    assert stable_adapter_config({"target_modules": "all-linear"}) == \
        {"target_modules": "all-linear"}  # a pattern string stays as it is
    written = list((trained[2] / "out").glob("*/adapter_config.json"))
    assert written
    for path in written:
        modules = json.loads(path.read_text())["target_modules"]
        assert not isinstance(modules, list) or modules == sorted(modules), path
