"""TensorFlow/Keras and Flax padding forms: "valid", "same" and (before, after) pairs.

The oracle is JAX's ``lax.reduce_window`` with ``lax.padtype_to_pads`` (an
independent implementation of TensorFlow's "SAME" rule), for max, sum and the
valid-element counts that TensorFlow's average divides by.
"""

import itertools

import jax
import numpy as np
import pytest
from jax import lax

import fastpool
from tests.oracle import to_channels_first, to_channels_last

jax.config.update("jax_enable_x64", True)

BACKENDS = ["cpu", "numpy"]


def _jax_pads(shape, kernel, stride, dilation, padding):
    if isinstance(padding, str):
        effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
        return lax.padtype_to_pads(shape, effective, stride, padding.upper())
    return [tuple(p) for p in padding]


def _reduce(x, init, op, kernel, stride, dilation, pads):
    nd = len(kernel)
    lead = x.ndim - nd
    return np.asarray(lax.reduce_window(
        x, init, op, (1,) * lead + tuple(kernel), (1,) * lead + tuple(stride),
        [(0, 0)] * lead + list(pads), window_dilation=(1,) * lead + tuple(dilation)))


def jax_pool(x, mode, kernel, stride, dilation, padding, count_include_pad=True, p=None):
    """max, avg (TensorFlow's when count_include_pad is False, Flax's when True) or
    Lp (zeros in the padding) over the trailing len(kernel) axes."""
    pads = _jax_pads(x.shape[-len(kernel):], kernel, stride, dilation, padding)
    if mode == "max":
        return _reduce(x, -np.inf, lax.max, kernel, stride, dilation, pads)
    if mode == "lp":
        return _reduce(x ** p, 0.0, lax.add, kernel, stride, dilation, pads) ** (1 / p)
    total = _reduce(x, 0.0, lax.add, kernel, stride, dilation, pads)
    if count_include_pad:
        return total / np.prod(kernel)
    counts = _reduce(np.ones_like(x), 0.0, lax.add, kernel, stride, dilation, pads)
    return total / counts


CASES = [  # (spatial size, kernel, stride, dilation, padding)
    ((7,), (3,), (2,), (1,), "same"),
    ((8,), (2,), (2,), (1,), "same"),           # even kernel, no padding needed
    ((9,), (4,), (3,), (1,), "same"),           # even kernel, padding after
    ((5,), (2,), (4,), (1,), "same"),           # stride > kernel: total clamps to 0
    ((10,), (3,), (1,), (2,), "same"),          # dilation
    ((6,), (3,), (2,), (1,), "valid"),
    ((6,), (3,), (2,), (1,), ((2, 0),)),
    ((6, 7), (3, 2), (2, 1), (1, 1), "same"),
    ((5, 6), (2, 3), (1, 2), (1, 1), ((0, 1), (2, 1))),
    ((6, 5), (3, 3), (3, 2), (2, 1), "same"),
    ((4, 5, 6), (2, 3, 2), (2, 2, 3), (1, 1, 1), "same"),
    ((4, 5, 6), (3, 2, 2), (1, 2, 2), (1, 1, 1), ((1, 1), (0, 1), (1, 0))),
]


@pytest.mark.parametrize("size, kernel, stride, dilation, padding", CASES,
                         ids=[f"{c[0]}-k{c[1]}-s{c[2]}-d{c[3]}-{c[4]}" for c in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_max_avg_lp_match_jax(size, kernel, stride, dilation, padding, backend):
    nd = len(kernel)
    x = np.random.default_rng(0).standard_normal((2, 3, *size))
    for channels_last in (False, True):
        data = np.ascontiguousarray(to_channels_last(x, nd)) if channels_last else x
        kw = dict(stride=stride, padding=padding, channels_last=channels_last,
                  backend=backend)

        def run(mode, **extra):
            out = fastpool.pool(data, mode, kernel, **kw, **extra)
            return to_channels_first(out, nd) if channels_last else out

        np.testing.assert_array_equal(
            run("max", dilation=dilation), jax_pool(x, "max", kernel, stride, dilation, padding))
        if dilation != (1,) * nd:
            continue  # averages have no dilation
        for include in (False, True):
            np.testing.assert_allclose(
                run("avg", count_include_pad=include),
                jax_pool(x, "avg", kernel, stride, dilation, padding, include), rtol=1e-12)
        np.testing.assert_allclose(
            run("lp", norm_type=2), jax_pool(np.abs(x), "lp", kernel, stride, dilation,
                                             padding, p=2), rtol=1e-12)


def test_same_output_size_is_ceil_of_input_over_stride():
    # TensorFlow's documented rule, for every size, kernel, stride and dilation here;
    # a dilated window that "same" leaves wholly in the padding is refused instead.
    for size, k, s, d in itertools.product(range(1, 12), range(1, 5), range(1, 5), (1, 2)):
        x = np.zeros((1, 1, size))
        pads = lax.padtype_to_pads((size,), ((k - 1) * d + 1,), (s,), "SAME")[0]
        positions = np.arange(-(-size // s))[:, None] * s - pads[0] + np.arange(k) * d
        if ((positions < 0) | (positions >= size)).all(axis=1).any():
            with pytest.raises(ValueError, match="wholly in the padding"):
                fastpool.max_pool1d(x, k, s, "same", d)
        else:
            assert fastpool.max_pool1d(x, k, s, "same", d).shape[-1] == -(-size // s)


def test_same_splits_the_padding_with_the_extra_element_after():
    # Hand-derived (TensorFlow's docs): size 4, kernel 4, stride 1 pads 1 before and
    # 2 after; count_include_pad=False divides by the valid elements only.
    x = np.arange(1.0, 5.0).reshape(1, 1, 4)
    np.testing.assert_allclose(fastpool.avg_pool1d(x, 4, 1, "same", count_include_pad=False),
                               [[[2.0, 2.5, 3.0, 3.5]]])
    np.testing.assert_allclose(fastpool.avg_pool1d(x, 4, 1, "same"),
                               [[[1.5, 2.5, 2.25, 1.75]]])


def test_pairs_and_ceil_mode_follow_torch_on_the_padded_size():
    # Symmetric pairs are torch's int padding, ceil_mode included; asymmetric pairs
    # keep torch's rule (a last window must start inside the input or the padding
    # before it), so ((0, 1),) with ceil_mode adds no window starting in the padding.
    x = np.random.default_rng(1).standard_normal((2, 3, 9))
    for backend in BACKENDS:
        np.testing.assert_array_equal(
            fastpool.max_pool1d(x, 3, 2, ((1, 1),), ceil_mode=True, backend=backend),
            fastpool.max_pool1d(x, 3, 2, 1, ceil_mode=True, backend=backend))
        # Padded explicitly, the 11 positions give torch a 4th window starting at 9, in
        # the padding after the input: the pairs' rule drops it.
        padded = fastpool.avg_pool1d(np.pad(x, ((0, 0), (0, 0), (0, 2))), 4, 3,
                                     ceil_mode=True, backend=backend)
        got = fastpool.avg_pool1d(x, 4, 3, ((0, 2),), ceil_mode=True, backend=backend)
        assert padded.shape[-1] == 4 and got.shape[-1] == 3
        np.testing.assert_allclose(got, padded[..., :3], rtol=1e-12)
        assert fastpool.max_pool1d(x[..., :8], 2, 2, ((0, 1),), ceil_mode=True).shape[-1] == 4


def test_backward_of_the_new_forms_matches_autograd_of_the_padded_input():
    import torch
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 7))
    grad = None
    for backend in BACKENDS:
        out, indices = fastpool.max_pool2d(x, 3, 2, "same", return_indices=True,
                                           backend=backend)
        grad = np.random.default_rng(3).standard_normal(out.shape)
        got = fastpool.max_pool2d_backward(grad, indices, x.shape, backend=backend)
        avg = fastpool.avg_pool2d_backward(grad, x.shape, 3, 2, ((0, 1), (1, 1)),
                                           backend=backend)
        t = torch.from_numpy(x).requires_grad_()
        padded = torch.nn.functional.pad(t, (1, 1, 0, 1), value=-np.inf)  # "same" here
        torch.nn.functional.max_pool2d(padded, 3, 2).backward(torch.from_numpy(grad))
        np.testing.assert_array_equal(got, t.grad.numpy())
        t = torch.from_numpy(x).requires_grad_()
        padded = torch.nn.functional.pad(t, (1, 1, 0, 1))
        torch.nn.functional.avg_pool2d(padded, 3, 2).backward(torch.from_numpy(grad))
        np.testing.assert_allclose(avg, t.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda x: fastpool.max_pool1d(x, 2, padding="full"), ValueError, r"padding.*'full'"),
    (lambda x: fastpool.max_pool1d(x, 2, padding="same", ceil_mode=True), ValueError,
     r"ceil_mode=True does not combine with padding='same'"),
    (lambda x: fastpool.max_pool1d(x, 3, padding=((0, 3),)), ValueError,
     r"effective kernel size minus one.*\(\(0, 3\),\)"),
    (lambda x: fastpool.max_pool2d(x[None], 2, padding=((0, 1),)), ValueError,
     r"needs 2 \(before, after\) pairs"),
    (lambda x: fastpool.max_pool1d(x, 2, padding=((0, -1),)), ValueError, r"non-negative"),
    (lambda x: fastpool.max_pool1d(x, 2, padding=((0, 1.5),)), TypeError, r"padding.*1\.5"),
    (lambda x: fastpool.max_pool1d(x[..., :2], 2, 1, ((2, 1),), 3), ValueError,
     r"padding=\(\(2, 1\),\) leaves a window .* wholly in the padding of input size \(2,\)"),
    (lambda x: fastpool.max_pool1d(x, 9, padding="valid"), ValueError, r"output size \(0,\)"),
    (lambda x: fastpool.pool(x, "lp", (2,), padding=1, norm_type=2), ValueError,
     r"padding=\(1,\) is not supported by lp"),
], ids=range(9))
def test_bad_padding_is_a_clear_error(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(np.zeros((1, 2, 4)))
