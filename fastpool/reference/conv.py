"""NumPy reference of the strided convolution: one tensordot per kernel offset."""

from __future__ import annotations

import itertools

import numpy as np


def _offsets(weight_shape, out_shape, stride):
    """Each kernel offset with the strided slices of the padded input it meets."""
    for kd, kh, kw in itertools.product(*(range(k) for k in weight_shape[2:])):
        yield (kd, kh, kw), tuple(
            slice(k, k + s * (o - 1) + 1, s)
            for k, s, o in zip((kd, kh, kw), stride, out_shape[2:]))


def _padded(x, pad):
    return np.pad(x, [(0, 0), (0, 0)] + [(int(p), int(p)) for p in pad])


def conv(x, weight, bias, out_shape, stride, pad, stream=None):
    xp = _padded(x.astype(np.float64), pad)
    out = np.zeros(out_shape) + bias.astype(np.float64)[None, :, None, None, None]
    for (kd, kh, kw), window in _offsets(weight.shape, out_shape, stride):
        patch = xp[(slice(None), slice(None)) + window]
        out += np.einsum("ncdhw,oc->nodhw", patch, weight[:, :, kd, kh, kw])
    return out.astype(x.dtype)


def conv_backward(grad, x, weight, stride, pad, stream=None, output_mask=(True, True)):
    """(grad_input, grad_weight), each None where ``output_mask`` says."""
    wants_input, wants_weight = output_mask
    xp = _padded(x.astype(np.float64), pad)
    grad_xp = np.zeros(xp.shape)
    grad_weight = np.zeros(weight.shape)
    g = grad.astype(np.float64)
    for (kd, kh, kw), window in _offsets(weight.shape, grad.shape, stride):
        index = (slice(None), slice(None)) + window
        if wants_input:
            grad_xp[index] += np.einsum("nodhw,oc->ncdhw", g, weight[:, :, kd, kh, kw])
        if wants_weight:
            grad_weight[:, :, kd, kh, kw] = np.einsum("nodhw,ncdhw->oc", g, xp[index])
    inner = tuple(slice(int(p), int(p) + n) for p, n in zip(pad, x.shape[2:]))
    grad_in = grad_xp[(slice(None), slice(None)) + inner]
    return (grad_in.astype(grad.dtype) if wants_input else None,
            grad_weight.astype(grad.dtype) if wants_weight else None)
