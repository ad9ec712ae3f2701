"""Array handling shared by the host back ends (``cpu`` and ``numpy``).

Each back end module exposes the same small array API that the dispatch layer
uses: ``asarray``, ``canonical``, ``empty``, ``zeros``, ``absolute``, ``reverse_order``,
``times_sign``, ``scaled_sum``, ``concat_rows``, ``split_rows`` and ``wrap``; the CUDA
back end has its own versions.
"""

from __future__ import annotations

import numpy as np

from fastpool._params import FLOAT_DTYPES

__all__ = ["FLOAT_DTYPES", "asarray", "canonical", "empty", "zeros", "absolute",
           "reverse_order", "times_sign", "scaled_sum", "concat_rows", "split_rows", "wrap",
           "conv_bias_grad", "host_only"]


def asarray(x: object, op: str, name: str = "x", stream=None) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        array = np.asarray(x)
    except Exception as error:  # torch tensors needing grad, ragged lists, ...
        raise TypeError(f"{op}: {name} must be an array or a nested sequence of numbers, "
                        f"got {type(x).__name__} ({error})") from error
    if array.dtype == object:
        raise TypeError(f"{op}: {name} must be an array or a nested sequence of numbers, "
                        f"got {type(x).__name__}")
    return array


def canonical(array: np.ndarray, shape: tuple, stream=None) -> np.ndarray:
    """``array`` reshaped to ``shape``, C-contiguous and in native byte order
    (a view when it already is)."""
    if array.flags.c_contiguous and array.dtype.isnative:  # the common case, quickly
        return array.reshape(shape)
    dtype = array.dtype if array.dtype.isnative else array.dtype.newbyteorder("=")
    return np.ascontiguousarray(array.reshape(shape), dtype=dtype)


def empty(shape: tuple, dtype, stream=None) -> np.ndarray:
    return np.empty(shape, np.dtype(dtype).newbyteorder("="))


def zeros(shape: tuple, dtype, stream=None) -> np.ndarray:
    return np.zeros(shape, np.dtype(dtype).newbyteorder("="))


def absolute(array: np.ndarray, stream=None) -> np.ndarray:
    return np.abs(array)


def reverse_order(array: np.ndarray, stream=None) -> np.ndarray:
    """A new array under an order-reversing bijection of its dtype: negation for
    floats (NaN stays NaN), bitwise not for integers (``~x`` is ``-x - 1`` for signed,
    ``max - x`` for unsigned; it never overflows)."""
    return np.negative(array) if array.dtype.kind == "f" else np.invert(array)


def times_sign(values: np.ndarray, x: np.ndarray, stream=None) -> np.ndarray:
    """``values * sign(x)`` with torch's sign(NaN) = 0 (NumPy's is NaN): the gradient
    of ``|x|`` at NaN is 0 in torch."""
    sign = np.sign(x).astype(values.dtype)
    sign[np.isnan(sign)] = 0
    return values * sign


def scaled_sum(a: np.ndarray, b: np.ndarray, scale: float, stream=None) -> np.ndarray:
    """``scale * (a + b)`` in ``a``'s dtype (0.5: timm's avgmax head)."""
    out = np.add(a, b)
    if scale != 1:
        out *= out.dtype.type(scale)
    return out


def concat_rows(a: np.ndarray, b: np.ndarray, stream=None) -> np.ndarray:
    """Two (rows, C) arrays side by side: (rows, 2C), ``a`` first."""
    return np.concatenate((a, b), axis=1)


def split_rows(array: np.ndarray, stream=None) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`concat_rows`: a (rows, 2C) array as two C-contiguous
    (rows, C) arrays."""
    half = array.shape[1] // 2
    return np.ascontiguousarray(array[:, :half]), np.ascontiguousarray(array[:, half:])


def wrap(result: np.ndarray, like: object) -> np.ndarray:
    return result


def conv_bias_grad(grad: np.ndarray, stream=None, channels_last: bool = False) -> np.ndarray:
    """The bias gradient of a convolution: grad (canonical 5-D, channels at axis 1,
    or at axis 4 with ``channels_last``) summed over batch and space."""
    if channels_last:
        # The rows counted, not -1: with no channels, numpy cannot infer them.
        rows = grad.reshape(grad.size // max(grad.shape[-1], 1), grad.shape[-1])
        return rows.sum(axis=0, dtype=np.float64).astype(grad.dtype)
    return grad.sum(axis=(0, 2, 3, 4), dtype=np.float64).astype(grad.dtype)


# Marks the host back ends, which can also transpose channels-last input on the way in.
host_only = True
