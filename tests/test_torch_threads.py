"""fastpool.torch under torch's determinism switch, and its thread-count rule."""

import pytest
import torch

import fastpool
from fastpool import _threads
from fastpool.torch import functional as FF
from fastpool.torch import nn as fnn

CALLS = [
    lambda t, nd: getattr(FF, f"max_pool{nd}d")(t, 3, 2, 1),
    lambda t, nd: getattr(FF, f"avg_pool{nd}d")(t, 3, 2, 1),
    lambda t, nd: getattr(FF, f"lp_pool{nd}d")(t, 2, 2),
    lambda t, nd: getattr(FF, f"adaptive_max_pool{nd}d")(t, 3),
    lambda t, nd: getattr(FF, f"adaptive_avg_pool{nd}d")(t, 3),
    lambda t, nd: getattr(FF, f"global_max_pool{nd}d")(t),
    lambda t, nd: getattr(FF, f"global_avg_pool{nd}d")(t),
]


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_algorithms_never_raise(deterministic):
    for nd in (1, 2, 3):
        x = torch.rand((2, 3) + (7,) * nd, dtype=torch.float64, requires_grad=True)
        for call in CALLS:
            out = call(x, nd)
            (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
            first = grad.detach().clone()
            if call is not CALLS[2]:  # Lp has no double backward
                grad.sum().backward()
            assert torch.equal(torch.autograd.grad(call(x, nd).sum(), x)[0], first)
    model = torch.nn.Sequential(fnn.MaxPool2d(2), fnn.AdaptiveAvgPool2d(2))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    compiled(x).sum().backward()


@pytest.fixture
def launches(monkeypatch):
    """The thread counts fastpool's kernel launches asked for."""
    seen = []
    original = _threads.get_num_threads

    def recording():
        seen.append(original())
        return seen[-1]

    monkeypatch.setattr(_threads, "get_num_threads", recording)
    torch_threads = torch.get_num_threads()
    # Tests that restore a thread count with set_num_threads(n) leave it explicit;
    # this one starts from the default, following torch.
    fastpool.set_num_threads(None)
    yield seen
    torch.set_num_threads(torch_threads)
    fastpool.set_num_threads(None)


def test_threads_follow_torch_unless_set(launches):
    x = torch.rand(4, 8, 64, 64)  # large enough for parallel launches (small ones are serial)
    torch.set_num_threads(1)
    FF.max_pool2d(x, 2)
    assert launches and set(launches) == {1}
    assert fastpool.get_num_threads() == _threads._available_threads()  # outside the call
    launches.clear()
    fastpool.set_num_threads(_threads._available_threads())  # explicit: fastpool's wins
    FF.max_pool2d(x, 2)
    assert set(launches) == {_threads._available_threads()}
