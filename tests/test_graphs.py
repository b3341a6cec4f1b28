"""CUDA-graphed closures (mergehub.adapters.graphs): the same numbers as the function itself,
MeZO's steps bit for bit those of the eager closure, outputs that later replays do not
overwrite, and inputs that are not CUDA tensors refused by name."""

from __future__ import annotations

import pytest
import torch

from mergehub.adapters.graphs import cuda_graphed
from mergehub.adapters.mezo import MeZO
from mergehub.errors import InputError
from tests.test_mezo import TOKENS, tiny_llama


def test_inputs_must_be_cuda_tensors():
    graphed = cuda_graphed(lambda x: x * 2)
    with pytest.raises(InputError, match="input 'x' is a tensor on cpu; every input must be a "
                                         "CUDA tensor"):
        graphed(x=torch.ones(3))
    with pytest.raises(InputError, match="input 'x' is of type int"):
        graphed(x=3)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="max_graphs and warmup must be >= 1"):
        cuda_graphed(lambda x: x, max_graphs=0)


@pytest.mark.gpu
def test_replays_follow_inputs_and_weights_changed_in_place():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=gen).cuda()
    graphed = cuda_graphed(lambda x: (torch.tanh(x @ w).sum(1), x.shape[0]), max_graphs=2)
    xs = [torch.randn(n, 64, generator=gen).cuda() for n in (8, 8, 5, 3)]
    first = graphed(x=xs[0])
    second = graphed(x=xs[1])  # the same graph replayed: the first result must stay
    assert torch.equal(first[0], torch.tanh(xs[0] @ w).sum(1)) and first[1] == 8
    assert torch.equal(second[0], torch.tanh(xs[1] @ w).sum(1))
    w.mul_(0.5)  # read at its address: the next replay sees the new values
    assert torch.equal(graphed(x=xs[0])[0], torch.tanh(xs[0] @ w).sum(1))
    assert torch.equal(graphed(x=xs[2])[0], torch.tanh(xs[2] @ w).sum(1))  # a second graph
    assert torch.equal(graphed(x=xs[3])[0], torch.tanh(xs[3] @ w).sum(1))  # beyond: eager
    assert len(graphed.graphs) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("density", [None, 0.3])
def test_mezo_with_a_graphed_closure_takes_the_eager_steps_bit_for_bit(density):
    runs = []
    for graph in (False, True):
        model = tiny_llama(0, torch.bfloat16).cuda().eval()
        ids = TOKENS.cuda()

        def forward(input_ids, model=model):
            return model(input_ids=input_ids, labels=input_ids).loss

        run = cuda_graphed(forward) if graph else forward
        opt = MeZO(model.parameters(), lr=5e-3, eps=1e-3, seed=3, density=density)
        losses = [opt.step(lambda: run(input_ids=ids)) for _ in range(4)]
        # a batch of another width gets a graph of its own
        losses.append(opt.step(lambda: run(input_ids=ids[:, :12].contiguous())))
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_weights), (graph_losses, graph_weights) = runs
    assert graph_losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(eager_weights, graph_weights))
