"""Strided convolution against torch.nn.functional.conv{1,2,3}d and the NumPy reference."""

import importlib
import itertools
import os
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.testing import assert_allclose, assert_array_equal

import fastpool
from fastpool.torch import functional as FF
from fastpool.torch import nn as fnn

SIZES = {1: (11,), 2: (9, 10), 3: (5, 6, 7)}
CASES = [(2, 0, 3), (2, 1, 3), (1, 1, 3), (3, 2, 4), (2, 0, 1)]  # stride, padding, kernel


def _torch(nd, x, w, b, stride, padding, grad):
    tx, tw = (torch.from_numpy(a).requires_grad_() for a in (x, w))
    tb = torch.from_numpy(b).requires_grad_()
    out = getattr(F, f"conv{nd}d")(tx, tw, tb, stride, padding)
    out.backward(torch.from_numpy(grad))
    return out.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stride, padding, kernel", CASES)
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_forward_and_backward_match_torch(nd, stride, padding, kernel, dtype, backend):
    rng = np.random.default_rng(nd * 10 + kernel)
    x = rng.standard_normal((2, 3) + SIZES[nd]).astype(dtype)
    w = rng.standard_normal((4, 3) + (kernel,) * nd).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    out = getattr(fastpool, f"strided_conv{nd}d")(x, w, stride, padding, b, backend=backend)
    grad = rng.standard_normal(out.shape).astype(dtype)
    want = _torch(nd, x, w, b, stride, padding, grad)
    got = (out, *getattr(fastpool, f"strided_conv{nd}d_backward")(grad, x, w, stride, padding,
                                                                   backend=backend))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    for g, t in zip(got, want):
        assert g.dtype == dtype and g.shape == t.shape
        assert_allclose(g, t, **tol)


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("c_in, c_out, kernel, stride, padding", [
    (3, 16, 3, 2, 1),  # window rows (few input channels): a first layer
    (3, 16, 4, 4, 0),  # window rows read in place channels-last (patches)
    (32, 16, 3, 2, 1),  # pixel columns, the gradient's rows copied
    (32, 32, 2, 2, 0),  # read in place channels-last
])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_output_mask_computes_what_it_names(nd, c_in, c_out, kernel, stride, padding,
                                            channels_last, backend):
    """Each gradient output_mask asks for is the one a full call computes, bit for bit
    (which full call matches torch: the tests above), and the others are None."""
    rng = np.random.default_rng(nd + c_in)
    shape = (2, c_in) + SIZES[nd]
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((c_out, c_in) + (kernel,) * nd).astype(np.float32)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    conv = getattr(fastpool, f"strided_conv{nd}d")
    backward = getattr(fastpool, f"strided_conv{nd}d_backward")
    grad = rng.standard_normal(conv(x, w, stride, padding, channels_last=channels_last).shape
                               ).astype(np.float32)
    call = dict(channels_last=channels_last, backend=backend)
    full = backward(grad, x, w, stride, padding, **call)
    for mask in itertools.product((False, True), repeat=3):
        got = backward(grad, x, w, stride, padding, output_mask=mask, **call)
        for wanted, part, whole in zip(mask, got, full):
            if wanted:
                assert_array_equal(part, whole)
            else:
                assert part is None


def test_unbatched_plain_and_channels_last():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 9, 10))
    w = rng.standard_normal((4, 3, 3, 3))
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), None, 2, 1).numpy()
    assert_allclose(fastpool.strided_conv2d(x, w, 2, 1), want, rtol=1e-12)
    image, kernel = rng.standard_normal((9, 10)), rng.standard_normal((3, 3))
    plain = fastpool.strided_conv2d(image, kernel, padding=1)
    assert_allclose(plain, F.conv2d(torch.from_numpy(image)[None, None],
                                    torch.from_numpy(kernel)[None, None], None, 2, 1)[0, 0],
                    rtol=1e-12)
    batch = rng.standard_normal((2, 3, 9, 10))
    nhwc = np.ascontiguousarray(np.moveaxis(batch, 1, -1))
    got = fastpool.strided_conv2d(nhwc, w, 2, 1, channels_last=True)
    assert_allclose(np.moveaxis(got, -1, 1), fastpool.strided_conv2d(batch, w, 2, 1),
                    rtol=1e-12)
    grad = rng.standard_normal(got.shape)
    gx, gw, gb = fastpool.strided_conv2d_backward(grad, nhwc, w, 2, 1, channels_last=True)
    rx, rw, rb = fastpool.strided_conv2d_backward(np.moveaxis(grad, -1, 1), batch, w, 2, 1)
    assert_allclose(np.moveaxis(gx, -1, 1), rx, rtol=1e-12)
    assert_allclose(gw, rw, rtol=1e-12)
    assert_allclose(gb, rb, rtol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_backward_is_deterministic(channels_last):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 8, 17, 19)).astype(np.float32)
    w = rng.standard_normal((6, 8, 5, 5)).astype(np.float32)
    grad = rng.standard_normal(fastpool.strided_conv2d(x, w, 1, 2).shape).astype(np.float32)
    if channels_last:
        x, grad = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, grad))

    def run():
        return fastpool.strided_conv2d_backward(grad, x, w, 1, 2, channels_last=channels_last)

    first = run()
    try:
        fastpool.set_num_threads(1)  # every sum runs in a fixed order: the same bits
        single = run()
        for a, b in zip(single, run()):
            assert_array_equal(a, b)
    finally:
        fastpool.set_num_threads(None)
    for a, b, c in zip(first, run(), single):
        assert_array_equal(a, b)
        assert_allclose(a, c, rtol=1e-5, atol=1e-4)
        assert_array_equal(a, c)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda x, w: fastpool.strided_conv2d(x, w[:, :2]), ValueError, "input channels"),
    (lambda x, w: fastpool.strided_conv2d(x, w, stride=0), ValueError, r"stride.*\(0, 0\)"),
    (lambda x, w: fastpool.strided_conv2d(x, w, padding=-1), ValueError, "padding"),
    (lambda x, w: fastpool.strided_conv2d(x[..., :2, :2], w), ValueError, "smaller than"),
    (lambda x, w: fastpool.strided_conv2d(x, w, bias=np.zeros(3)), ValueError, "bias"),
    (lambda x, w: fastpool.strided_conv2d(x, w.astype(np.float32)), TypeError, "weight dtype"),
    (lambda x, w: fastpool.strided_conv2d(x.astype(np.int32), w), TypeError, "input dtype int32"),
    (lambda x, w: fastpool.strided_conv2d(x[0, 0, 0], w), ValueError, "weight shape"),
    (lambda x, w: fastpool.strided_conv2d_backward(np.zeros((2, 4, 3, 3)), x, w), ValueError,
     "grad_output has shape"),
    (lambda x, w: fastpool.strided_conv2d_backward(np.zeros((2, 4, 5, 5)), x, w,
                                                   output_mask=(True, False)), ValueError,
     r"strided_conv2d_backward: output_mask must have three bools.*\(True, False\)"),
    (lambda x, w: fastpool.strided_conv2d_backward(np.zeros((2, 4, 5, 5)), x, w,
                                                   output_mask=(1, 1, 0)), TypeError,
     r"strided_conv2d_backward: output_mask must hold bools, got \(1, 1, 0\)"),
    (lambda x, w: fastpool.strided_conv2d_backward(np.zeros((2, 4, 5, 5)), x, w,
                                                   output_mask=True), TypeError,
     "output_mask must be a tuple of three bools"),
])
def test_bad_calls(call, error, pattern):
    x = np.zeros((2, 3, 9, 10))
    w = np.zeros((4, 3, 3, 3))
    with pytest.raises(error, match=pattern):
        call(x, w)


def test_torch_module_and_gradcheck():
    torch.manual_seed(0)
    ours = fnn.StridedConv2d(3, 8, 3, padding=1).double()
    theirs = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1).double()
    theirs.load_state_dict(ours.state_dict())
    assert repr(ours) == repr(theirs).replace("Conv2d", "StridedConv2d")
    x = torch.rand(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(ours(x), theirs(x))
    for nd in (1, 2, 3):
        xs = torch.rand((2, 3) + SIZES[nd], dtype=torch.float64, requires_grad=True)
        w = torch.rand((4, 3) + (3,) * nd, dtype=torch.float64, requires_grad=True)
        b = torch.rand(4, dtype=torch.float64, requires_grad=True)
        conv = getattr(FF, f"strided_conv{nd}d")
        assert torch.autograd.gradcheck(lambda a, c, d: conv(a, c, 2, 1, d), (xs, w, b))
    channels_last = x.detach().contiguous(memory_format=torch.channels_last)
    assert torch.allclose(ours(channels_last), theirs(x))


@pytest.mark.parametrize("call", ["functional", "op"])
def test_a_second_derivative_raises(call):
    """The convolution has first derivatives only: a second raises (it does not give
    zeros, as torch's fallback for an op without a formula would)."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    out = (FF.strided_conv2d(x, w, 2, 0) if call == "functional" else
           torch.ops.fastpool.strided_conv2d(x, w, None, [2, 2], [0, 0]))
    grad_x, = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="strided_conv2d_backward has no derivative"):
        torch.autograd.grad(grad_x.sum(), w)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["cf", "cl"])
@pytest.mark.parametrize("needs_input, needs_weight, bias", [
    (False, True, True),  # a first layer: its input is the data
    (True, False, False),  # a frozen layer
    (True, False, True),  # a frozen layer with a trained bias
    (False, True, False),
    (True, True, True),
])
def test_torch_asks_only_for_the_gradients_autograd_wants(monkeypatch, needs_input,
                                                          needs_weight, bias, layout):
    """As torch's convolution backward, fastpool.torch's asks for the gradients of the
    inputs that require them (its output_mask), and they match torch's."""
    torch.manual_seed(0)
    ours = fnn.StridedConv2d(3, 8, 3, padding=1, bias=bias).double()
    theirs = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=bias).double()
    theirs.load_state_dict(ours.state_dict())
    masks = []
    backward = fastpool._dispatch.conv_backward
    monkeypatch.setattr(fastpool._dispatch, "conv_backward",
                        lambda *args, output_mask, **kwargs: masks.append(output_mask) or
                        backward(*args, output_mask=output_mask, **kwargs))
    x = torch.rand(2, 3, 9, 10, dtype=torch.float64).contiguous(memory_format=layout)
    grads = []
    for module in (ours, theirs):
        module.weight.requires_grad_(needs_weight)
        inputs = x.clone().requires_grad_(needs_input)
        module(inputs).square().sum().backward()
        grads.append([inputs.grad, module.weight.grad, module.bias.grad if bias else None])
    assert masks == [(needs_input, needs_weight, bias)]
    for got, want in zip(*grads):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------
# The CPU back end's direct convolution: the padded copies (or none), chunks of
# images, tiles' tails, thread counts, the micro-kernel's register shapes.
# --------------------------------------------------------------------------

CPU_CONV = importlib.import_module("fastpool.cpu.conv")  # fastpool.cpu.conv is the function


def _check_against_torch(nd, shape, c_out, kernel, stride, padding, channels_last,
                         dtype=np.float64, seed=0):
    """fastpool's CPU forward and backward against torch's, in either layout."""
    rng = np.random.default_rng(seed)
    kernel = (kernel,) * nd if np.isscalar(kernel) else tuple(kernel)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((c_out, shape[1], *kernel)).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype)
    out = getattr(F, f"conv{nd}d")(torch.from_numpy(x), torch.from_numpy(w), None,
                                   stride, padding).numpy()
    grad = rng.standard_normal(out.shape).astype(dtype)
    want = _torch(nd, x, w, b, stride, padding, grad)
    if channels_last:  # the same data, channels moved last: fastpool's NHWC arrays
        x, grad = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, grad))
    got_out = getattr(fastpool, f"strided_conv{nd}d")(x, w, stride, padding, b,
                                                      channels_last=channels_last)
    got = getattr(fastpool, f"strided_conv{nd}d_backward")(grad, x, w, stride, padding,
                                                           channels_last=channels_last)
    got = [got_out, *got]
    if channels_last:
        got[0], got[1] = (np.moveaxis(a, -1, 1) for a in got[:2])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    for g, t in zip(got, want):
        assert g.dtype == dtype and g.shape == t.shape
        assert_allclose(g, t, **tol)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("nd, shape, kernel", [
    (1, (2, 3, 12), 4),            # windows tile the input
    (1, (2, 3, 14), 4),            # two columns no window covers (gradient 0)
    (1, (1, 3, 14), 4),            # ... a single image
    (2, (2, 3, 8, 9), (2, 3)),
    (3, (2, 2, 4, 6, 5), 2),
])
def test_non_overlapping_windows(nd, shape, kernel, channels_last):
    stride = kernel
    _check_against_torch(nd, shape, 5, kernel, stride, 0, channels_last)


def test_arrays_are_read_in_place(monkeypatch):
    """The kernels read arrays where they lie, but for the forward's channels-first
    input: copied channels-last first where windows overlap along D or H, else by
    each task, its own window rows.  The backward copies no array in a launch of
    its own: the weight gradient's gradient rows, where they are not channels-last
    with whole tiles of channels, are copied by the input gradient's tasks."""
    from fastpool.cpu.microkernel import tile_columns

    launched = []
    launch = CPU_CONV.launch

    def recording(kernel, *args, **options):
        launched.append(kernel)
        return launch(kernel, *args, **options)

    def names(kernels):
        return [kernel.__name__ for kernel in kernels]

    monkeypatch.setattr(CPU_CONV, "launch", recording)
    c_out = tile_columns(8)  # whole tiles of float64
    x, w = np.ones((2, 24, 3)), np.ones((c_out, 3, 4))
    fastpool.strided_conv1d(x, w, 2, padding=1, channels_last=True)
    assert names(launched) == ["direct_conv"]
    fastpool.strided_conv1d_backward(np.ones((2, 12, c_out)), x, w, 2, padding=1,
                                     channels_last=True)
    assert names(launched[1:]) == ["input_gradient", "weight_gradient"]
    del launched[:]
    fastpool.strided_conv1d(np.ones((2, 3, 24)), w, 2, padding=1)  # tasks copy rows
    assert names(launched) == ["direct_conv"]
    del launched[:]
    # Windows that overlap along H: the input is copied channels-last first.
    fastpool.strided_conv2d(np.ones((2, 3, 9, 9)), np.ones((4, 3, 3, 3)), 2, padding=1)
    assert names(launched) == ["channels_last_copy", "direct_conv"]
    del launched[:]
    fastpool.strided_conv2d(np.ones((2, 3, 9, 9)), np.ones((4, 3, 2, 3)), 2, padding=1)
    assert names(launched) == ["direct_conv"]
    del launched[:]
    fastpool.strided_conv1d_backward(np.ones((2, 5, 12)), np.ones((2, 3, 24)), w[:5], 2,
                                     padding=1)
    fastpool.strided_conv1d_backward(np.ones((2, 12, 5)), x, w[:5], 2, padding=1,
                                     channels_last=True)
    assert names(launched) == ["input_gradient", "weight_gradient"] * 2


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("vectors", [1, 2, 3, 4], ids=lambda v: f"{v}-vectors")
def test_each_tile_width_matches_torch(vectors, dtype, channels_last):
    """Channel counts that fill tiles of each width (and one short of it), as input
    channels (the input gradient's columns) and as filters (the output's and the
    weight gradient's); a channels-last gradient of whole tiles is read in place."""
    from fastpool.cpu.microkernel import TILE_VECTORS, tile_columns, tile_vectors

    if vectors > TILE_VECTORS:
        pytest.skip(f"this machine's tiles are at most {TILE_VECTORS} vectors wide")
    itemsize = np.dtype(dtype).itemsize
    channels = tile_columns(itemsize, vectors)
    for c in (channels, channels - 1):
        if c and tile_vectors(c, itemsize) == vectors:
            _check_against_torch(2, (2, c, 9, 10), 3, 3, 2, 1, channels_last, dtype)
            _check_against_torch(2, (2, 3, 9, 10), c, 3, 2, 1, channels_last, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("shape, c_out, kernel, stride, padding", [
    ((2, 3, 32, 32), 8, 16, 16, 0),       # ViT's patches: 48 columns, a 3-vector tile
    ((2, 3, 17, 18), 5, 4, 4, 0),         # ConvNeXt's stem, a ragged end
    ((2, 5, 11, 12), 7, 2, 2, 1),         # padding: the first window half outside
    ((2, 4, 9, 13), 3, (3, 2), (2, 3), 1),  # gaps along W, overlap along H
    ((1, 6, 7, 9), 4, 1, 2, 0),           # one-pixel windows
    ((2, 3, 30, 29), 8, 7, 2, 3),         # ResNet's stem: windows overlap, padding
    ((2, 2, 9, 11), 3, (2, 5), (3, 1), 2),  # stride 1 along W, windows wider than the pad
])
def test_window_row_columns_match_torch(shape, c_out, kernel, stride, padding, channels_last):
    """Pixels of fewer channels than a vector's lanes: the input gradient's columns
    are each output's whole window row, KW*C_in values, added up into the input row
    where windows overlap (and the pixels between windows 0)."""
    _check_against_torch(2, shape, c_out, kernel, stride, padding, channels_last, np.float32)
    _check_against_torch(2, shape, c_out, kernel, stride, padding, channels_last)


def test_the_gradient_rows_are_copied_unless_channels_last_whole_tiles(monkeypatch):
    """The weight gradient reads a channels-last gradient of whole tiles of channels
    in place; any other gets a padded channels-last copy from the input gradient's
    launch."""
    from fastpool.cpu.microkernel import tile_columns

    copies = []
    launch = CPU_CONV.launch

    def recording(kernel, *args, **options):
        if kernel.__name__ == "input_gradient":  # (grad, packed, grad_in, windows,
            copies.append(args[5].size)         # layout, grad_rows, x, x_rows)
        return launch(kernel, *args, **options)

    monkeypatch.setattr(CPU_CONV, "launch", recording)
    c_out = tile_columns(8)
    x, w = np.ones((2, 24, 3)), np.ones((c_out, 3, 4))
    fastpool.strided_conv1d_backward(np.ones((2, 12, c_out)), x, w, 2, padding=1,
                                     channels_last=True)
    fastpool.strided_conv1d_backward(np.ones((2, 12, 5)), x, w[:5], 2, padding=1,
                                     channels_last=True)
    fastpool.strided_conv1d_backward(np.ones((2, c_out, 12)), np.ones((2, 3, 24)), w, 2,
                                     padding=1)
    assert copies[0] == 0 and copies[1] > 0 and copies[2] > 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_a_backward_without_the_input_gradient_builds_none(monkeypatch, channels_last):
    """Without the input gradient (a first layer's), the weight gradient's copies are
    the forward's copy kernel's: no input gradient kernel is launched (or compiled)."""
    launched = []
    launch = CPU_CONV.launch

    def recording(kernel, *args, **options):
        launched.append(kernel.__name__)
        return launch(kernel, *args, **options)

    monkeypatch.setattr(CPU_CONV, "launch", recording)
    x = np.ones((2, 24, 3) if channels_last else (2, 3, 24), np.float32)
    w = np.ones((5, 3, 4), np.float32)
    grad = np.ones_like(fastpool.strided_conv1d(x, w, 2, 1, channels_last=channels_last))
    launched.clear()
    fastpool.strided_conv1d_backward(grad, x, w, 2, 1, channels_last=channels_last,
                                     output_mask=(False, True, True))
    # The gradient's rows (5 channels, a tile's padding) and the input's padded rows.
    assert launched == ["channels_last_copy", "channels_last_copy", "weight_gradient"]


def test_the_input_rows_are_copied_for_window_rows_unless_read_in_place(monkeypatch):
    """The weight gradient's window rows (pixels of few channels) read the input's rows
    channels-last, padded along W: the input itself where it is channels-last and its
    windows lie inside its rows, else a copy from the input gradient's launch; inputs
    of more channels need none."""
    from fastpool.cpu.microkernel import tile_columns

    copies = []
    launch = CPU_CONV.launch

    def recording(kernel, *args, **options):
        if kernel.__name__ == "input_gradient":
            copies.append(args[7].size)  # x_rows
        return launch(kernel, *args, **options)

    monkeypatch.setattr(CPU_CONV, "launch", recording)
    lanes = tile_columns(4, 1)
    for channels, padding, channels_last in [(3, 0, True), (3, 1, True), (3, 0, False),
                                             (lanes, 0, False)]:
        x = np.ones((2, 24, channels) if channels_last else (2, channels, 24), np.float32)
        w = np.ones((5, channels, 4), np.float32)
        y = fastpool.strided_conv1d(x, w, 2, padding, channels_last=channels_last)
        fastpool.strided_conv1d_backward(np.ones_like(y), x, w, 2, padding,
                                         channels_last=channels_last)
    assert copies[0] == 0 and copies[1] > 0 and copies[2] > 0 and copies[3] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(2, 16, 1, 3, 16), (1, 37, 2, 3, 29), (1, 15, 1, 2, 40),
                                   (1, 40, 1, 2, 15), (3, 64, 1, 1, 64), (1, 1, 1, 1, 1)])
@pytest.mark.parametrize("pad, extra_columns", [(0, 0), (2, 0), (0, 3), (1, 16)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_channels_last_copy_in_blocks_and_one_by_one(shape, dtype, channels_last, pad,
                                                     extra_columns):
    """The copy into padded channels-last rows (the forward's input; the weight
    gradient's gradient and input rows): channels-first, blocks of a vector's lanes
    squared, the last of each axis flush with its end, and rows of fewer channels or
    pixels one by one; channels-last, runs of values.  Zeros in the padding and past
    the channels, whatever the buffer held."""
    from fastpool.cpu.runtime import launch
    from fastpool.cpu.tasks import Constant

    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    moved = np.moveaxis(x, 1, -1)
    n, c, d, h, w = shape
    target = np.full((n, d, h, w + 2 * pad + 1, c + extra_columns), np.nan, dtype)
    want = np.zeros_like(target)
    want[:, :, :, pad:pad + w, :c] = moved
    source = np.ascontiguousarray(moved) if channels_last else x
    launch(CPU_CONV.channels_last_copy, source, target, pad, Constant(channels_last),
           work=target.size)
    assert_array_equal(target, want)


def test_transpose_block_against_numpy():
    """The register transpose of one block, at element offsets and strides."""
    from numba import njit

    from fastpool.cpu.microkernel import block_lanes, transpose_block

    @njit
    def transpose(source, s_at, s_row, target, t_at, t_row):
        transpose_block(source, s_at, s_row, target, t_at, t_row)

    for dtype in (np.float32, np.float64):
        lanes = block_lanes(np.dtype(dtype).itemsize)
        source = np.arange(50 * 50, dtype=dtype)
        target = np.zeros(50 * 50, dtype)
        transpose(source, 3, 41, target, 7, 37)
        rows = source[3:3 + 41 * lanes].reshape(lanes, 41)[:, :lanes]
        written = target[7:7 + 37 * lanes].reshape(lanes, 37)
        assert_array_equal(written[:, :lanes], rows.T)
        assert np.count_nonzero(written[:, lanes:]) == 0 and not target[:7].any()


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_read_only_arrays_match_writable_ones(channels_last):
    """Arrays the caller cannot write (a torch tensor's, a memory map's) are read in
    place as writable ones are, with the same results."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
    w = rng.standard_normal((64, 8, 3, 3)).astype(np.float32)
    grad = rng.standard_normal((2, 64, 5, 5)).astype(np.float32)
    if channels_last:
        x, grad = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, grad))
    want = [fastpool.strided_conv2d(x, w, 2, 1, channels_last=channels_last),
            *fastpool.strided_conv2d_backward(grad, x, w, 2, 1, channels_last=channels_last)]
    for a in (x, w, grad):
        a.flags.writeable = False
    got = [fastpool.strided_conv2d(x, w, 2, 1, channels_last=channels_last),
           *fastpool.strided_conv2d_backward(grad, x, w, 2, 1, channels_last=channels_last)]
    for g, t in zip(got, want):
        assert_array_equal(g, t)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("chunk_bytes", [1, 3000, 12000],
                         ids=["one-image", "two-images", "whole-batch"])
def test_chunks_of_images_match_torch(monkeypatch, chunk_bytes, channels_last):
    monkeypatch.setattr(CPU_CONV, "CHUNK_BYTES", chunk_bytes)
    _check_against_torch(2, (5, 3, 9, 10), 4, 3, 2, 1, channels_last)
    _check_against_torch(3, (3, 2, 5, 6, 7), 3, (2, 3, 2), (1, 2, 3), (1, 0, 1),
                         channels_last)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_input_gradient_summed_in_place_matches_torch(dtype):
    """Channels-last input gradients summed straight into the gradient's rows (whole
    tiles of channels, no padding along W): windows apart (pixels no window covers
    stay 0), adjacent and overlapping, 1-D to 3-D; and with padding, through the
    scratch row."""
    from fastpool.cpu.microkernel import tile_columns

    channels = tile_columns(np.dtype(dtype).itemsize)
    for kernel, stride, padding in [(2, 3, 0), (2, 2, 0), (3, 2, 0), (3, 1, 0), (3, 2, 1)]:
        _check_against_torch(2, (2, channels, 9, 11), 5, kernel, stride, padding, True, dtype)
    _check_against_torch(1, (2, 2 * channels, 13), 7, 3, 2, 0, True, dtype)
    _check_against_torch(3, (1, channels, 4, 5, 7), 3, 2, (1, 2, 3), 0, True, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("band_bytes", [1, 2**18], ids=["one-row", "default"])
def test_weight_gradient_bands_match_torch(monkeypatch, band_bytes, channels_last):
    monkeypatch.setattr(CPU_CONV, "BAND_BYTES", band_bytes)
    _check_against_torch(2, (2, 5, 13, 14), 70, 3, 1, 1, channels_last, np.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("c_in, c_out, width", [(1, 1, 7), (5, 65, 13), (64, 64, 24), (7, 129, 40)])
def test_channel_and_row_tails_match_torch(c_in, c_out, width, channels_last):
    """Channel counts and output rows that are not whole tiles (or are): the packed
    weights' and copies' zeros, and the extra outputs of a row's last tile."""
    _check_against_torch(2, (2, c_in, 5, width), c_out, 3, 2, 1, channels_last, np.float32)
    _check_against_torch(1, (1, c_in, width), c_out, 2, 1, 0, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_pooled_outputs_and_scratch_are_not_shared(channels_last):
    """Outputs, transposes and cols of over a MiB come from fastpool's buffer pool:
    a result still held is never handed out again, nor written by a later call."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 16, 130, 130)).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    first = fastpool.strided_conv2d(x, w, 1, 1, channels_last=channels_last)
    assert first.nbytes > 2**20
    kept = first.copy()
    second = fastpool.strided_conv2d(-x, w, 1, 1, channels_last=channels_last)
    assert not np.shares_memory(first, second)
    assert_array_equal(first, kept)
    assert_allclose(second, -kept, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("kernel, stride", [(3, 2), (2, 3)], ids=["overlap", "gaps"])
def test_backward_writes_every_input_gradient_of_a_reused_buffer(kernel, stride,
                                                                 channels_last):
    """Each input gradient row is written whole by the one task that owns it (zeros
    where no window reads, then its sums; or, in window-row mode, zeroed and then
    added into): a pooled buffer full of NaN, handed out again, comes back as the
    gradient, every element written."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 131, 131)).astype(np.float32)
    w = rng.standard_normal((16, 8, kernel, kernel)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = F.conv2d(xt, torch.from_numpy(w), None, stride)
    grad = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(torch.from_numpy(grad))
    want = xt.grad.numpy()
    if channels_last:
        x, grad, want = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, grad, want))
    for _ in range(2):
        got = fastpool.strided_conv2d_backward(grad, x, w, stride,
                                               channels_last=channels_last)[0]
        assert got.nbytes > 2**20  # from the buffer pool
        assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        got.fill(np.nan)  # then freed: the next call's gradient reuses it
        del got


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("nd, shape, kernel, stride, padding", [
    (1, (3, 4, 23), 5, 3, 2),
    (2, (2, 3, 11, 8), (3, 2), (2, 1), (1, 0)),
    (3, (2, 3, 6, 7, 5), 3, (1, 2, 2), 1),
    (1, (1, 1, 3000), 7, 2, 3),       # one long 1-channel signal: blocks along the axis
    (2, (1, 1, 40, 33), 3, 1, 1),     # one plane: blocks of rows
    (1, (2, 3, 2), 5, 1, 2),          # windows wider than the input: every tile an end
    (2, (2, 2, 3, 30), (2, 7), 2, (1, 3)),  # ends of several outputs
    # Windows apart along D and H, overlapping along W, in the padding at each end:
    # a channels-first input's rows copied by the forward's tasks, none twice.
    (3, (2, 5, 7, 8, 9), (2, 3, 4), (3, 3, 2), 1),
])
def test_both_layouts_match_torch(nd, shape, kernel, stride, padding, dtype, channels_last):
    _check_against_torch(nd, shape, 3, kernel, stride, padding, channels_last, dtype)


def test_gradient_dtype_follows_grad_output():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 3, 9, 10)), rng.standard_normal((4, 3, 3, 3))
    grad = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    got = fastpool.strided_conv2d_backward(grad, x, w, 2, 1)
    want = fastpool.strided_conv2d_backward(grad, x, w, 2, 1, backend="numpy")
    for g, r in zip(got, want):
        assert g.dtype == np.float32
        assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_empty_and_channel_free_inputs(channels_last):
    def put(a):
        return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if channels_last else a

    w = np.ones((4, 3, 3, 3))
    out = fastpool.strided_conv2d(put(np.ones((0, 3, 9, 10))), w, 2, 1,
                                  channels_last=channels_last)
    assert out.shape == put(np.ones((0, 4, 5, 5))).shape
    gx, gw, gb = fastpool.strided_conv2d_backward(out, put(np.ones((0, 3, 9, 10))), w, 2, 1,
                                                  channels_last=channels_last)
    assert gx.shape == put(np.ones((0, 3, 9, 10))).shape
    assert_array_equal(gw, 0)
    assert_array_equal(gb, 0)
    # No input channels: the output is the bias alone.
    out = fastpool.strided_conv2d(put(np.ones((2, 0, 9, 10))), np.ones((4, 0, 3, 3)), 2, 1,
                                  np.arange(4.0), channels_last=channels_last)
    assert_array_equal(put(np.broadcast_to(np.arange(4.0)[:, None, None], (2, 4, 5, 5))), out)
    # No output channels: the gradients are zeros (the bias's is empty).
    x = put(np.ones((2, 3, 9, 7)))
    gx, gw, gb = fastpool.strided_conv2d_backward(put(np.ones((2, 0, 5, 4))), x,
                                                  np.ones((0, 3, 2, 2)), 2, 1,
                                                  channels_last=channels_last)
    assert gx.shape == x.shape and gw.shape == (0, 3, 2, 2) and gb.shape == (0,)
    assert_array_equal(gx, 0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
def test_results_do_not_depend_on_the_thread_count(channels_last):
    """Each output, input-gradient row and weight-gradient tile is summed by one task
    in a fixed order: one thread and all of them give the same bits."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 16, 33, 35)).astype(np.float32)
    w = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    grad = rng.standard_normal((3, 24, 17, 18)).astype(np.float32)
    if channels_last:
        x, grad = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, grad))

    def run():
        return (fastpool.strided_conv2d(x, w, 2, 1, b, channels_last=channels_last),
                *fastpool.strided_conv2d_backward(grad, x, w, 2, 1,
                                                  channels_last=channels_last))

    every = run()
    try:
        fastpool.set_num_threads(1)
        single = run()
    finally:
        fastpool.set_num_threads(None)
    for a, c in zip(every, single):
        assert_array_equal(a, c)


def test_concurrent_calls_match():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 12, 11)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    grad = rng.standard_normal((4, 5, 6, 6)).astype(np.float32)
    want = [fastpool.strided_conv2d(x, w, 2, 1),
            *fastpool.strided_conv2d_backward(grad, x, w, 2, 1)]
    errors = []

    def work():
        try:
            for _ in range(10):
                got = [fastpool.strided_conv2d(x, w, 2, 1),
                       *fastpool.strided_conv2d_backward(grad, x, w, 2, 1)]
                for a, b in zip(got, want):
                    assert_array_equal(a, b)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


_OTHER_REGISTERS = """
import numpy as np, torch, torch.nn.functional as F, fastpool
from fastpool.cpu import microkernel
assert microkernel.VECTOR_BYTES == {vector_bytes}, microkernel.VECTOR_BYTES
rng = np.random.default_rng(0)
for dtype in (np.float32, np.float64):
    x = rng.standard_normal((2, 5, 11, 13)).astype(dtype)
    w = rng.standard_normal((19, 5, 3, 3)).astype(dtype)
    tx, tw = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    out = F.conv2d(tx, tw, None, 2, 1)
    grad = rng.standard_normal(out.shape).astype(dtype)
    out.backward(torch.from_numpy(grad))
    got = fastpool.strided_conv2d(x, w, 2, 1)
    gx, gw, _ = fastpool.strided_conv2d_backward(grad, x, w, 2, 1)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for a, b in ((got, out), (gx, tx.grad), (gw, tw.grad)):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=tol, atol=tol)
print("ok")
"""


@pytest.mark.parametrize("cpu, features, vector_bytes", [
    ("haswell", "+avx,+avx2,+fma", 32),  # 12 accumulators of 16 ymm registers
    ("generic", "", 16),                 # SSE's 16 xmm registers
], ids=["avx2", "sse"])
def test_micro_kernel_tiles_of_narrower_registers(tmp_path, cpu, features, vector_bytes):
    """The tile shapes for machines without AVX-512 (this one may have it): numba
    compiling for an older CPU, in a process of its own."""
    import subprocess
    import sys
    env = {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features,
           "NUMBA_CACHE_DIR": str(tmp_path)}
    script = _OTHER_REGISTERS.format(vector_bytes=vector_bytes)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("vectors", [1, 2, 3, 4], ids=lambda v: f"{v}-vectors")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_micro_kernel_against_numpy(dtype, vectors):
    """multiply_tile's strides, blocks, row counts and widths: C[r, j] += sum_t sum_k
    A[t, r, k] B[t, k, j] for the first ``rows`` rows (more than a tile's count as a
    tile's) and the tile's columns, and nothing else written."""
    from numba import njit

    from fastpool.cpu.microkernel import TILE_ROWS, TILE_VECTORS, multiply_tile, tile_columns

    if vectors > TILE_VECTORS:
        pytest.skip(f"this machine's tiles are at most {TILE_VECTORS} vectors wide")

    @njit
    def run(rows, c, a, b, c_row, a_row, a_step, b_row, depth, blocks, a_block, b_block):
        multiply_tile(rows, c, 3, c_row, a, 2, a_row, a_step, b, 1, b_row, depth, blocks,
                      a_block, b_block, vectors)

    rng = np.random.default_rng(7)
    columns = tile_columns(np.dtype(dtype).itemsize, vectors)
    depth, blocks, a_step, a_row, a_block = 5, 3, 2, 11, 70
    b_row, b_block, c_row = columns + 1, 6 * (columns + 1), columns + 4
    a = rng.standard_normal(2 + a_block * blocks).astype(dtype)
    b = rng.standard_normal(1 + b_block * blocks).astype(dtype)
    for rows in range(TILE_ROWS + 2):
        c = rng.standard_normal(3 + c_row * (TILE_ROWS + 1)).astype(dtype)
        want = c.copy()
        for r in range(min(rows, TILE_ROWS)):
            for j in range(columns):
                for t in range(blocks):
                    for k in range(depth):
                        want[3 + r * c_row + j] += (a[2 + t * a_block + r * a_row + k * a_step]
                                                    * b[1 + t * b_block + k * b_row + j])
        run(rows, c, a, b, c_row, a_row, a_step, b_row, depth, blocks, a_block, b_block)
        assert_allclose(c, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
        before = c.copy()
        run(rows, c, a, b, c_row, a_row, a_step, b_row, 0, blocks, a_block, b_block)
        run(rows, c, a, b, c_row, a_row, a_step, b_row, depth, 0, a_block, b_block)
        assert_array_equal(c, before)  # no depth, no blocks: nothing to add


def test_tile_widths_fit_the_channels():
    """Each product's tiles are as wide as its channels want: whole vectors of
    channels up to a whole tile's sum no zero columns (16 float32 channels summed
    48 zeros each in whole tiles), and 3 float32 channels use one vector."""
    from fastpool.cpu.microkernel import TILE_VECTORS, tile_columns, tile_vectors

    for itemsize in (4, 8):
        lanes = tile_columns(itemsize, 1)
        for vectors in range(1, TILE_VECTORS + 1):
            assert tile_vectors(vectors * lanes, itemsize) == vectors
        assert tile_vectors(3, itemsize) == 1
        assert tile_vectors(4 * TILE_VECTORS * lanes, itemsize) == TILE_VECTORS
