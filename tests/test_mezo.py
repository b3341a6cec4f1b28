"""MeZO / Sparse MeZO (mergehub.adapters.mezo) against independent oracles.

The perturbation direction z is never read from the optimizer's internals: closures record the
parameters they are evaluated at, and z = (theta+ - theta) / eps.
"""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergehub.adapters import mezo as mezo_mod
from mergehub.adapters.checkpoints import load_optimizer_state, save_optimizer_state
from mergehub.adapters.mezo import MeZO, MeZOError
from mergehub.hub.demo import TINY_LLAMA


pytestmark = pytest.mark.usefixtures("one_thread")


def quadratic(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.nn.Parameter]:
    """A symmetric positive definite A (float64) and a parameter theta."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = m @ m.T / n + torch.eye(n, dtype=torch.float64)
    return a, torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))


def recording(loss_fn, params):
    """A closure that returns loss_fn() and records a copy of ``params`` at every call."""
    seen: list[list[torch.Tensor]] = []

    def closure():
        seen.append([p.detach().clone() for p in params])
        return loss_fn()
    return closure, seen


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**dict(TINY_LLAMA, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, vocab_size=64))
    return LlamaForCausalLM(config).to(dtype)


# A learnable sequence task: every row counts up in steps of 3 from its own start.
TOKENS = (torch.arange(16)[None, :] * 3 + torch.arange(8)[:, None]) % 64


def lm_loss(model):
    return lambda: model(input_ids=TOKENS, labels=TOKENS).loss


def test_projected_gradient_is_the_directional_derivative_on_a_quadratic():
    # For f = 1/2 theta^T A theta the central difference is exact: g = z . grad f = z^T A theta.
    a, theta = quadratic(12)
    closure, seen = recording(lambda: 0.5 * theta @ a @ theta, [theta])
    opt = MeZO([theta], lr=0.0, eps=1e-3, seed=3)
    for _ in range(5):
        grad = a @ theta.detach()
        seen.clear()
        opt.step(closure)
        z = (seen[0][0] - theta.detach()) / 1e-3
        assert opt.last_projected_grad == pytest.approx(float(z @ grad), rel=1e-6)


def test_average_of_g_z_over_seeds_approaches_the_gradient():
    # E[g z] = E[z z^T] grad f = grad f; the estimator's relative spread with N samples in n
    # dimensions is about sqrt((n + 2) / N) = 0.07 here, so 0.2 is a 3-sigma bound.
    a, theta = quadratic(8, seed=1)
    grad = a @ theta.detach()
    closure, seen = recording(lambda: 0.5 * theta @ a @ theta, [theta])
    total = torch.zeros_like(grad)
    samples = 2000
    for seed in range(samples):
        opt = MeZO([theta], lr=0.0, eps=1e-4, seed=seed)
        seen.clear()
        opt.step(closure)
        total += opt.last_projected_grad * (seen[0][0] - theta.detach()) / 1e-4
    estimate = total / samples
    assert float((estimate - grad).norm() / grad.norm()) < 0.2
    cosine = float(estimate @ grad / (estimate.norm() * grad.norm()))
    assert cosine > 0.97


def test_evaluations_happen_at_plus_and_minus_eps_z():
    a, theta = quadratic(6)
    before = theta.detach().clone()
    closure, seen = recording(lambda: 0.5 * theta @ a @ theta, [theta])
    MeZO([theta], lr=0.0, eps=1e-2, seed=0).step(closure)
    plus, minus = seen[0][0], seen[1][0]
    torch.testing.assert_close(plus - before, before - minus, rtol=0, atol=1e-12)
    z = (plus - before) / 1e-2
    assert 0.2 < float(z.std()) < 3  # a Gaussian draw, not a constant or zeros


def test_fp32_restoring_is_exact_while_perturbed_values_stay_in_their_binade():
    # theta in [1.25, 1.75] and eps |z| < 0.25: every perturbed value stays in [1, 2), where the
    # two rounded -eps moves cancel the +eps ones bit for bit.
    gen = torch.Generator().manual_seed(0)
    theta = torch.nn.Parameter(1.25 + 0.5 * torch.rand(10_000, generator=gen))
    before = theta.detach().clone()
    opt = MeZO([theta], lr=0.0, eps=1e-3, seed=0)
    closure, seen = recording(lambda: float(theta.sum()), [theta])
    for _ in range(3):
        opt.step(closure)
        assert torch.equal(theta.detach(), before)
    # The data do exercise rounding: moving by +d, -2d, +d instead does not come back. The
    # unrounded d is read off a float64 twin (same seed and shape, so the same z).
    twin = torch.nn.Parameter(before.double())
    closure64, seen64 = recording(lambda: 0.0, [twin])
    MeZO([twin], lr=0.0, eps=1e-3, seed=0).step(closure64)
    d = (seen64[0][0] - before.double()).float()
    naive = before.clone().add_(d).sub_(2 * d).add_(d)
    assert not torch.equal(naive, before)


def test_fp32_restoring_elsewhere_is_within_one_rounding_step():
    gen = torch.Generator().manual_seed(1)
    theta = torch.nn.Parameter(0.02 * torch.randn(50_000, generator=gen))
    before = theta.detach().clone()
    closure, seen = recording(lambda: 0.0, [theta])
    MeZO([theta], lr=0.0, eps=1e-3, seed=0).step(closure)
    d = (seen[0][0] - before).abs()
    after = theta.detach()
    ulp = torch.nextafter(before.abs() + 2 * d, torch.tensor(math.inf)) - (before.abs() + 2 * d)
    assert bool(((after - before).abs() <= ulp).all())
    exact = float((after == before).float().mean())
    assert exact > 0.85  # documented: 91% of N(0, 0.02) entries come back bit-exactly at eps=1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_master_weights_restore_bit_exactly_in_any_dtype(dtype):
    gen = torch.Generator().manual_seed(2)
    theta = torch.nn.Parameter((0.02 * torch.randn(4096, generator=gen)).to(dtype))
    before = theta.detach().clone()
    closure, seen = recording(lambda: float(theta.float().square().sum()), [theta])
    opt = MeZO([theta], lr=0.0, eps=1e-3, seed=0, master_weights=True)
    for _ in range(3):
        opt.step(closure)
        assert torch.equal(theta.detach(), before)
    assert not torch.equal(seen[0][0], before) and not torch.equal(seen[1][0], before)


def test_bf16_master_weights_keep_updates_that_bf16_rounds_away():
    # Weights in [0.02, 0.021): bf16 spacing 1.2e-4 there, and eps z stays inside the binade, so
    # in place the perturbations come back exactly and lr * g * z (< 2.5e-5, under half a bf16
    # step) rounds away: nothing moves. The float32 copy takes every update (and the parameter is its rounding).
    start = (0.02 + 0.001 * torch.rand(256, generator=torch.Generator().manual_seed(3))
             ).to(torch.bfloat16)
    target = torch.full((256,), 0.5)

    def run(master: bool) -> tuple[torch.Tensor, MeZO]:
        theta = torch.nn.Parameter(start.clone())
        opt = MeZO([theta], lr=3e-7, eps=1e-3, seed=0, master_weights=master)
        for _ in range(20):
            opt.step(lambda: float((theta.float() - target).square().sum()))
        return theta, opt

    theta, _ = run(master=False)
    assert torch.equal(theta.detach(), start)
    theta, opt = run(master=True)
    master = opt.state[theta]["master"]
    assert master.dtype == torch.float32
    assert torch.equal(theta.detach(), master.to(torch.bfloat16))
    moved = (master - start.float()).abs()
    assert float((moved > 0).float().mean()) > 0.9 and float(moved.max()) > 1e-5


def test_two_runs_with_the_same_seed_are_identical_and_other_seeds_differ():
    def run(seed: int) -> tuple[list[float], list[torch.Tensor]]:
        model = tiny_llama()
        opt = MeZO(model.parameters(), lr=1e-3, eps=1e-3, seed=seed)
        losses = [opt.step(lm_loss(model)) for _ in range(4)]
        return losses, [p.detach().clone() for p in model.parameters()]

    losses1, params1 = run(7)
    losses2, params2 = run(7)
    losses3, params3 = run(8)
    assert losses1 == losses2
    assert all(torch.equal(a, b) for a, b in zip(params1, params2))
    assert not all(torch.equal(a, b) for a, b in zip(params1, params3))


def mask_of(theta: torch.Tensor, q: float) -> torch.Tensor:
    """The Sparse MeZO mask by sorting: |theta| <= its ceil(q n)-th smallest magnitude."""
    mags = theta.detach().abs().reshape(-1).float().sort().values
    return theta.detach().abs().float() <= mags[math.ceil(q * mags.numel()) - 1]


@pytest.mark.parametrize("master", [False, True])
def test_sparse_mezo_never_changes_entries_outside_the_mask(master, monkeypatch):
    monkeypatch.setattr(mezo_mod, "CHUNK", 40)  # several chunks, packed masks across them
    gen = torch.Generator().manual_seed(4)
    weight = torch.nn.Parameter(0.05 * torch.randn(30, 11, generator=gen))
    strided = torch.nn.Parameter((0.05 * torch.randn(9, 7, generator=gen)).t())  # not contiguous
    params = [weight, strided]
    target = [torch.randn(30, 11, generator=gen), torch.randn(7, 9, generator=gen)]
    loss = lambda: sum(float((p - t).square().sum()) for p, t in zip(params, target))  # noqa: E731
    closure, seen = recording(loss, params)
    opt = MeZO(params, lr=1e-3, eps=1e-3, seed=0, density=0.25, master_weights=master)
    for _ in range(3):
        masks = [mask_of(p, 0.25) for p in params]
        before = [p.detach().clone() for p in params]
        seen.clear()
        opt.step(closure)
        for i, (p, mask, old) in enumerate(zip(params, masks, before)):
            for snapshot in (seen[0][i], seen[1][i], p.detach()):
                assert torch.equal(snapshot[~mask], old[~mask])
            assert bool((p.detach()[mask] != old[mask]).all())
            assert 0.2 < float(mask.float().mean()) < 0.3


def test_sparse_mezo_quantile_from_a_sample_on_large_tensors(monkeypatch):
    monkeypatch.setattr(mezo_mod, "QUANTILE_SAMPLE", 2000)
    gen = torch.Generator().manual_seed(5)
    theta = torch.nn.Parameter(torch.randn(50_000, generator=gen))
    before = theta.detach().clone()
    MeZO([theta], lr=1e-2, eps=1e-3, seed=0, density=0.2).step(lambda: float(theta.sum()))
    changed = theta.detach() != before
    assert abs(float(changed.float().mean()) - 0.2) < 0.03
    # every changed entry is smaller in magnitude than every unchanged one
    assert float(before[changed].abs().max()) <= float(before[~changed].abs().min())


@pytest.mark.parametrize("density, lr", [(None, 5e-3), (0.3, 2e-2)])
def test_mezo_lowers_the_loss_of_a_tiny_transformer(density, lr):
    model = tiny_llama()
    closure = lm_loss(model)
    with torch.no_grad():
        start = float(closure())
    opt = MeZO(model.parameters(), lr=lr, eps=1e-3, seed=0, density=density)
    losses = [opt.step(closure) for _ in range(100)]
    with torch.no_grad():
        end = float(closure())
    assert end < 0.95 * start
    assert sum(losses[-10:]) < sum(losses[:10])


def test_mezo_optimizes_a_non_differentiable_objective():
    # 1 - accuracy of a linear classifier: piecewise constant, no gradient anywhere.
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(400, 5, generator=gen)
    truth = torch.randn(5, generator=gen)
    y = x @ truth > 0
    w = torch.nn.Parameter(-truth + 0.5 * torch.randn(5, generator=gen))

    def error_rate() -> float:
        return float(((x @ w > 0) != y).float().mean())

    start = error_rate()
    opt = MeZO([w], lr=0.5, eps=0.3, seed=0)
    for _ in range(300):
        opt.step(error_rate)
    assert start > 0.7 and error_rate() < 0.1


def test_usable_in_a_plain_training_loop_with_a_scheduler():
    gen = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(256, 4, generator=gen)
    y = (x[:, :1] - 2 * x[:, 1:2]).tanh()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    loss_fn = torch.nn.MSELoss()
    opt = MeZO(model.parameters(), lr=0.05, eps=1e-3, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=400, gamma=0.5)
    with torch.no_grad():
        start = float(loss_fn(model(x), y))
    for _ in range(100):
        for xb, yb in batches:
            opt.zero_grad()
            opt.step(lambda: loss_fn(model(xb), yb))
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 2)
    with torch.no_grad():
        assert float(loss_fn(model(x), y)) < 0.5 * start
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("master", [False, True])
def test_resume_from_state_dict_continues_bit_exactly(master, tmp_path):
    def new():
        model = tiny_llama(dtype=torch.bfloat16 if master else torch.float32)
        return model, MeZO(model.parameters(), lr=1e-3, eps=1e-3, weight_decay=0.1, seed=11,
                           density=0.5, master_weights=master)

    model, opt = new()
    straight = [opt.step(lm_loss(model)) for _ in range(6)]
    final = [p.detach().clone() for p in model.parameters()]

    model, opt = new()
    first = [opt.step(lm_loss(model)) for _ in range(3)]
    # through the files the trainer's checkpoints use (safetensors, no pickle)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    save_optimizer_state(opt.state_dict(), tmp_path / "optimizer.safetensors")
    model, opt = new()  # a fresh process would start from here
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    opt.load_state_dict(load_optimizer_state(tmp_path / "optimizer.safetensors"))
    if master:
        assert all(s["master"].dtype == torch.float32 for s in opt.state.values())
    rest = [opt.step(lm_loss(model)) for _ in range(3)]
    assert first + rest == straight
    assert all(torch.equal(a, b.detach()) for a, b in zip(final, model.parameters()))


def test_state_with_an_unknown_z_transform_is_refused():
    opt = MeZO([torch.nn.Parameter(torch.zeros(4))], lr=1.0)
    state = opt.state_dict()
    assert state["mezo"]["z_transform"] == "approximate" and not opt.accurate_z
    state["mezo"]["z_transform"] = "box-muller-v9"
    with pytest.raises(MeZOError, match="unknown z_transform 'box-muller-v9'"):
        opt.load_state_dict(state)


def test_weight_decay_only_on_matrices_and_sign_update():
    gen = torch.Generator().manual_seed(8)
    matrix = torch.nn.Parameter(torch.randn(6, 5, generator=gen, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
    m0, b0 = matrix.detach().clone(), bias.detach().clone()
    opt = MeZO([matrix, bias], lr=0.1, eps=1e-3, weight_decay=0.5, seed=0)
    opt.step(lambda: 1.0)  # constant objective: g = 0, only weight decay acts
    torch.testing.assert_close(matrix.detach(), m0 * (1 - 0.1 * 0.5), rtol=1e-12, atol=0)
    assert torch.equal(bias.detach(), b0)

    theta = torch.nn.Parameter(torch.randn(7, generator=gen, dtype=torch.float64))
    before = theta.detach().clone()
    closure, seen = recording(lambda: float(100 * theta.sum()), [theta])
    opt = MeZO([theta], lr=0.01, eps=1e-3, seed=0, sign=True)
    opt.step(closure)
    z = (seen[0][0] - before) / 1e-3
    assert abs(opt.last_projected_grad) > 1  # |g| large; the sign update ignores it
    # the step is formed in float32: equal to float32 rounding
    torch.testing.assert_close(theta.detach() - before,
                               -0.01 * math.copysign(1, opt.last_projected_grad) * z,
                               rtol=1e-6, atol=0)


def test_frozen_parameters_and_peft_base_weights_are_left_alone():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MeZO(model.parameters(), lr=1e-2, eps=1e-2, seed=0)
    for _ in range(3):
        opt.step(lm_loss(model))
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == ("lora_" in name), name


def test_errors_name_the_problem_and_leave_parameters_restored():
    a, theta = quadratic(5)
    before = theta.detach().clone()
    opt = MeZO([theta], lr=0.1, eps=1e-3, seed=0)
    with pytest.raises(MeZOError, match="closure"):
        opt.step()
    with pytest.raises(MeZOError, match="'sparsity' was renamed 'density': it is the fraction"):
        MeZO([theta], lr=0.1, sparsity=0.25)  # the old name meant the fraction trained
    with pytest.raises(MeZOError, match="'sparsity' was renamed 'density'"):
        MeZO([{"params": [theta], "sparsity": 0.25}], lr=0.1)
    with pytest.raises(MeZOError, match="backend must be None, 'triton' or 'torch', not 'cuda'"):
        MeZO([theta], lr=0.1, backend="cuda")
    calls = []

    def nan_second():
        calls.append(1)
        return float("nan") if len(calls) == 2 else 1.0
    with pytest.raises(MeZOError, match="nan at the -eps perturbation; parameters restored"):
        opt.step(nan_second)
    assert torch.equal(theta.detach(), before)

    def boom():
        raise RuntimeError("data loader died")
    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(boom)
    assert torch.equal(theta.detach(), before) and opt.steps_done == 0
    for perturbations in (1, 2):  # read after the step's forwards: restored all the same
        two = MeZO([theta], lr=0.1, eps=1e-3, seed=0, n_perturbations=perturbations)
        with pytest.raises(MeZOError, match=r"must return a scalar .* not a Tensor of shape "
                                            r"\(2,\)"):
            two.step(lambda: theta.detach()[:2].clone())
        assert torch.equal(theta.detach(), before) and two.steps_done == 0

    for kwargs, word in [({"lr": -1}, "lr"), ({"lr": 1, "eps": 0}, "eps"),
                         ({"lr": 1, "density": 1.5}, "density"),
                         ({"lr": 1, "weight_decay": -1}, "weight_decay"),
                         ({"lr": 1, "seed": -2}, "seed")]:
        with pytest.raises(MeZOError, match=word):
            MeZO([theta], **kwargs)
    groups = [{"params": [theta]}, {"params": [torch.nn.Parameter(torch.ones(2))], "eps": 0.1}]
    with pytest.raises(MeZOError, match="share one eps"):
        MeZO(groups, lr=0.1).step(lambda: 0.0)
    with pytest.raises(MeZOError, match="not a MeZO state"):
        opt.load_state_dict(torch.optim.SGD([theta], lr=0.1).state_dict())
    old = MeZO([theta], lr=0.1, density=0.5).state_dict()  # as saved before the rename
    old["param_groups"] = [{("sparsity" if k == "density" else k): v for k, v in g.items()}
                           for g in old["param_groups"]]
    resumed = MeZO([theta], lr=0.1)
    resumed.load_state_dict(old)
    assert resumed.param_groups[0]["density"] == 0.5 and "sparsity" not in resumed.param_groups[0]


@pytest.mark.parametrize("device", [pytest.param("cpu", id="interp"),
                                    pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1}, {"density": 0.5},
                                     {"master_weights": True},
                                     {"density": 0.5, "n_perturbations": 2}])
def test_triton_path_equals_its_torch_reference(monkeypatch, options, device):
    """The CUDA path (Triton's Philox draw; dense and sparse moves of many parameters in one
    launch, Sparse MeZO's thresholds by a radix select) run under Triton's interpreter: it
    gives what torch ops on zo_direction's d give, with thresholds from a sort and masks packed
    by pack_bits, step by step, for bf16, float32, float64 (no one-pass form), misaligned and
    non-contiguous parameters in two groups and every option (two perturbations too: the
    masks of the step's start kept for the second)."""
    pytest.importorskip("triton")
    from mergehub import kernels
    from mergehub.kernels.deltas import pack_bits, unpack_bits

    def reference_step(x, seed, eps, times, *, start=0, update=None, mask=None, accurate=False):
        d = kernels.zo_direction(x.numel(), seed, eps, start=start, device=x.device,
                                 accurate=accurate)
        if mask is not None:
            d = d * mask
        for _ in range(abs(times)):
            x.add_(d) if times > 0 else x.sub_(d)
        if update is not None:
            x.add_(d * update)

    def reference_steps(xs, seeds, eps, times, *, update=None, bounds=None, bits=None,
                        fresh=False, accurate=False):
        offset = 0
        for t, (x, seed) in enumerate(zip(xs, seeds.cpu().numpy().view(np.uint64))):
            x = x.view(-1)  # contiguous tensors of any shape, addressed as flat
            mask = None
            if bounds is not None:
                segment = bits[offset:offset + (x.numel() + 7) // 8]
                offset += segment.numel()
                if fresh:
                    segment.copy_(pack_bits(x.float().abs() <= bounds[t]))
                mask = unpack_bits(segment, x.numel())
            reference_step(x, int(seed), eps, times, update=update, mask=mask,
                           accurate=accurate)

    def sorted_bounds(xs, ks):
        return torch.stack([x.float().abs().view(-1).sort().values[k - 1]
                            for x, k in zip(xs, ks)])

    monkeypatch.setattr(mezo_mod, "CHUNK", 300)  # chunks start mid-stream

    def run(backend: str = "triton", old_state: bool = False):
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(t.to(device)) for t in (
            (0.02 * torch.randn(40, 23, generator=gen)).bfloat16(),
            torch.randn(700, generator=gen),
            torch.randn(5, 3, generator=gen, dtype=torch.float64),
            torch.randn(9, 7, generator=gen).t(),
            (0.02 * torch.randn(3001, generator=gen)).bfloat16())]
        params.append(torch.nn.Parameter(torch.randn(513, generator=gen).to(device)[1:]))
        loss = lambda: float(sum(p.double().sin().sum() for p in params))  # noqa: E731
        opt = MeZO([{"params": params[:4]}, {"params": params[4:], "lr": 2e-3}], lr=1e-3,
                   eps=1e-3, seed=0, backend=backend, **options)
        if old_state:  # saved before the approximate transform: continues on libdevice's
            state = opt.state_dict()
            assert state["mezo"].pop("z_transform") == "approximate"
            opt.load_state_dict(state)
            assert opt.accurate_z and opt.state_dict()["mezo"]["z_transform"] == "libdevice"
        losses = [opt.step(loss) for _ in range(3)]
        return losses, [p.detach().clone() for p in params]

    fused, fused_old = run(), run(old_state=True)
    saved = MeZO([torch.nn.Parameter(torch.zeros(4))], lr=1.0, backend="triton").state_dict()
    restored = MeZO([torch.nn.Parameter(torch.zeros(4))], lr=1.0)
    restored.load_state_dict(saved)
    assert restored.backend == "triton"  # the stream is part of the state
    monkeypatch.setattr(kernels, "zo_step", reference_step)
    monkeypatch.setattr(kernels, "zo_steps", reference_steps)
    monkeypatch.setattr(kernels, "smallest_magnitudes", sorted_bounds)
    for got, want in ((fused, run()), (fused_old, run(old_state=True))):
        assert got[0] == want[0]
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    # the two transforms' streams differ (in the low bits: float32 parameters show it)
    assert not all(torch.equal(a, b) for a, b in zip(fused_old[1], fused[1]))
    _, torch_path = run("torch")  # torch.randn: another stream
    assert not torch.equal(torch_path[0], fused[1][0])


@pytest.mark.parametrize("device", [pytest.param("cpu", id="interp"),
                                    pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("density", [None, 0.5])
def test_launches_follow_the_parameters_and_hold_nothing_between_steps(device, density):
    """Each step's launches move the parameters as they are then: a run whose parameters get
    new storage (``p.data = clone``, ``model.to``-like), change dtype, are frozen or are
    unfrozen between steps ends bit for bit where a run that starts each of those steps with
    a fresh optimizer does (the same seed and step counts give the same z); launches kept on
    the old storage would leave the new tensors unmoved. Nothing of a step outlives it: the
    old storage of a parameter given new storage is freed."""
    pytest.importorskip("triton")

    def params():
        gen = torch.Generator().manual_seed(5)
        return [torch.nn.Parameter(t.to(device)) for t in (
            (0.02 * torch.randn(31, 17, generator=gen)).bfloat16(),
            torch.randn(700, generator=gen), torch.randn(9, generator=gen))]

    def loss_of(ps):
        return lambda: float(sum(p.double().sin().sum() for p in ps if p.requires_grad))

    changes = [lambda ps: None,
               lambda ps: [setattr(p, "data", p.data.clone()) for p in ps],
               lambda ps: setattr(ps[1], "data", ps[1].data.bfloat16()),
               lambda ps: ps[0].requires_grad_(False),
               lambda ps: ps[0].requires_grad_(True)]
    kept, fresh = params(), params()
    opt = MeZO(kept, lr=1e-3, eps=1e-3, density=density, backend="triton")
    for step, change in enumerate(changes):
        change(kept)
        change(fresh)
        before = [p.detach().clone() for p in kept]
        opt.step(loss_of(kept))
        other = MeZO(fresh, lr=1e-3, eps=1e-3, density=density, backend="triton")
        other.steps_done = step
        other.step(loss_of(fresh))
        for a, b in zip(kept, fresh):
            assert a.dtype == b.dtype and torch.equal(a, b), step
        assert any(not torch.equal(a, b) for a, b in zip(before, kept)), step
    # between steps the optimizer holds no parameter's storage (the old one of a parameter
    # given new storage is freed: the memory MeZO is for)
    olds = [weakref.ref(p.untyped_storage()) for p in kept]
    for p in kept:
        p.data = p.data.clone()
    gc.collect()
    assert all(old() is None for old in olds)


def test_seeds_of_a_step_are_seed_sequences():
    """The vectorized seeds of a step (one per parameter) equal numpy's SeedSequence words of
    each parameter's key, for seeds and steps of one and two 32-bit words (and a 64-bit seed
    near its top), parameter indices from 0 to 2^32 - 1, the first perturbation and later ones
    (whose keys are longer)."""
    gen = np.random.default_rng(0)
    indices = [0, 1, 2, 300, 2 ** 31, 2 ** 32 - 1] + [int(i) for i in gen.integers(2 ** 32, size=60)]
    for seed, step, j in [(0, 0, 0), (0, 0, 1), (7, 12, 0), (2 ** 40 + 3, 5, 0),
                          (2 ** 64 - 1, 2 ** 33 + 1, 0), (123, 2 ** 40, 3), (2 ** 32, 0, 2)]:
        want = [np.random.SeedSequence(list(mezo_mod._stream(seed, step, index, j)))
                .generate_state(2, dtype=np.uint32) for index in indices]
        got = mezo_mod._stream_seeds(seed, step, indices, j)
        assert got.dtype == np.uint64
        assert [int(s) for s in got] == [int(w[0]) | int(w[1]) << 32 for w in want], (seed, step, j)
        assert [int(s) for s in got] == [mezo_mod._seed(*mezo_mod._stream(seed, step, index, j))
                                         for index in indices]


@pytest.mark.gpu
def test_on_cuda_masks_restoring_and_reproducibility_hold():
    def run() -> tuple[list[torch.Tensor], list[list[torch.Tensor]], list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(9)
        params = [torch.nn.Parameter((0.02 * torch.randn(300, 70, generator=gen))
                                     .to("cuda", torch.bfloat16)),
                  torch.nn.Parameter(torch.randn(1000, generator=gen).cuda())]
        masks = [mask_of(p, 0.25) for p in params]
        loss = lambda: float(sum(p.float().square().sum() for p in params))  # noqa: E731
        closure, seen = recording(loss, params)
        MeZO(params, lr=1e-3, eps=1e-3, seed=0, density=0.25, master_weights=True).step(closure)
        return params, seen, masks

    params, seen, masks = run()
    again, _, _ = run()
    gen = torch.Generator().manual_seed(9)
    start = [(0.02 * torch.randn(300, 70, generator=gen)).to("cuda", torch.bfloat16),
             torch.randn(1000, generator=gen).cuda()]
    for p, q, mask, old, plus, minus in zip(params, again, masks, start, *seen):
        assert torch.equal(p, q)
        for snapshot in (plus, minus, p.detach()):
            assert torch.equal(snapshot[~mask], old[~mask])
        assert not torch.equal(plus[mask], old[mask])
