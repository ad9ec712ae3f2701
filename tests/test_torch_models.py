"""fastpool.torch.convert: models with every torch.nn pooling module replaced by
fastpool's give the same outputs and gradients, eager and compiled."""

import copy

import pytest
import torch

import fastpool.torch
from fastpool.torch import nn as fnn
from tests import torch_models

POOLING = [
    torch.nn.MaxPool1d(3, 2, 1), torch.nn.MaxPool2d(2, return_indices=True),
    torch.nn.MaxPool3d((1, 2, 2), dilation=(1, 2, 1)), torch.nn.AvgPool1d(3, 2, 1),
    torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False, divisor_override=2),
    torch.nn.AvgPool3d(2, ceil_mode=True), torch.nn.LPPool1d(2, 3),
    torch.nn.LPPool2d(1.5, 2, ceil_mode=True), torch.nn.LPPool3d(3, 2),
    torch.nn.AdaptiveMaxPool1d(4), torch.nn.AdaptiveMaxPool2d((3, None), return_indices=True),
    torch.nn.AdaptiveMaxPool3d(2), torch.nn.AdaptiveAvgPool1d(5), torch.nn.AdaptiveAvgPool2d(1),
    torch.nn.AdaptiveAvgPool3d((2, 3, None)),
]


class MyPool(torch.nn.MaxPool2d):
    """A user subclass: its forward may differ, so convert leaves it alone."""


def test_convert_replaces_every_pooling_module():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), *POOLING, MyPool(2),
                                torch.nn.Sequential(torch.nn.MaxPool2d(2)))
    model.eval()
    converted = fastpool.torch.convert(model)
    assert converted is not model and not converted.training
    for before, after in zip(model.modules(), converted.modules()):
        assert repr(before) == repr(after)
        if type(before).__module__ == "torch.nn.modules.pooling":
            assert type(after) is getattr(fnn, type(before).__name__)
            assert vars(after) == vars(before) or repr(after) == repr(before)
        else:
            assert type(after) is type(before)
    assert converted.state_dict().keys() == model.state_dict().keys()
    converted.load_state_dict(model.state_dict())
    assert fastpool.torch.convert(model, inplace=True) is model
    assert type(model[1]) is fnn.MaxPool1d
    single = fastpool.torch.convert(torch.nn.AvgPool2d(2))
    assert type(single) is fnn.AvgPool2d
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastpool.torch.convert(lambda x: x)


ARCHITECTURES = {
    "resnet18": lambda: torch_models.resnet18(width=8),
    "vgg16": lambda: torch_models.vgg16(width=8),
    "densenet121": lambda: torch_models.densenet121(growth=8),
    "inception": lambda: torch_models.inception_block(width=16),
}


def _outputs_and_gradients(model, x):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = model(x)
    weights = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_converted_architecture_matches(name):
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    converted = fastpool.torch.convert(model)
    assert not any(type(m).__module__ == "torch.nn.modules.pooling"
                   for m in converted.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want = _outputs_and_gradients(model, x)
    got = _outputs_and_gradients(converted, x)
    if name == "vgg16":
        # VGG's convolutional features have only max pooling: bit-exact, forward and
        # backward.
        features = _outputs_and_gradients(converted[:-5], x)
        want_features = _outputs_and_gradients(model[:-5], x)
        for g, w in zip(features, want_features):
            assert all(torch.equal(a, b) for a, b in zip(g, w)) if isinstance(g, list) \
                else torch.equal(g, w)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)


def test_converted_resnet_compiled_matches_eager():
    torch.manual_seed(0)
    model = torch_models.resnet18(width=8)
    converted = fastpool.torch.convert(model)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    want = _outputs_and_gradients(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    got = _outputs_and_gradients(compiled, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)


def test_state_dict_round_trip():
    model = torch_models.vgg16(width=4)
    converted = fastpool.torch.convert(model)
    fresh = torch_models.vgg16(width=4)
    fresh.load_state_dict(converted.state_dict())
    fastpool.torch.convert(fresh, inplace=True).load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(fresh(x), model(x))
    assert copy.deepcopy(converted)(x).shape == (1, 10)
