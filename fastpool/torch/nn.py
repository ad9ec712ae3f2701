"""Drop-in replacements for torch.nn's pooling modules, on fastpool's kernels.

Each class subclasses torch's own module (same constructor, attributes and
repr) and only replaces ``forward``.

>>> import torch
>>> from fastpool.torch import nn
>>> pool = nn.MaxPool2d(3, 2, 1)
>>> pool
MaxPool2d(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False)
>>> pool(torch.zeros(8, 64, 112, 112)).shape
torch.Size([8, 64, 56, 56])
"""

from __future__ import annotations

import copy
import inspect

import torch

from fastpool.torch import functional

_TORCH_MODULES = {
    "max_pool": "MaxPool", "avg_pool": "AvgPool", "lp_pool": "LPPool",
    "adaptive_max_pool": "AdaptiveMaxPool", "adaptive_avg_pool": "AdaptiveAvgPool",
}


def _prepare_scriptable(self):
    """torch.jit.script calls this first: fastpool's modules cannot be scripted."""
    raise RuntimeError(
        f"fastpool.torch.nn.{type(self).__name__} cannot be compiled by torch.jit.script "
        f"(TorchScript is in maintenance mode and does not compile fastpool's Python "
        f"wrappers); use torch.export.export to get a graph to save and deploy (fastpool's "
        f"ops appear as torch.ops.fastpool.*), or torch.compile to speed the model up")


def _module(family: str, nd: int, base: type) -> type:
    function = getattr(functional, f"{family}{nd}d")
    names = [name for name in inspect.signature(function).parameters if name != "input"]

    def forward(self, input: torch.Tensor):
        return function(input, **{name: getattr(self, name) for name in names
                                   if hasattr(self, name)})

    return type(base.__name__, (base,), {
        "forward": forward, "__module__": __name__,
        "__prepare_scriptable__": _prepare_scriptable,
        "__doc__": f"torch.nn.{base.__name__} computed by fastpool's kernels."})


class _GlobalPool(torch.nn.Module):
    family = ""
    nd = 0
    __prepare_scriptable__ = _prepare_scriptable

    def __init__(self, keepdims: bool = False) -> None:
        super().__init__()
        self.keepdims = keepdims

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return getattr(functional, f"{self.family}{self.nd}d")(input, keepdims=self.keepdims)

    def extra_repr(self) -> str:
        return f"keepdims={self.keepdims}"


def _global_module(family: str, nd: int) -> type:
    name = f"Global{'Max' if 'max' in family else 'Avg'}Pool{nd}d"
    return type(name, (_GlobalPool,), {
        "family": family, "nd": nd, "__module__": __name__,
        "__doc__": f"Pool each {nd}-D plane to one value: (N, C), or (N, C, 1, ...) with "
                   f"keepdims."})


for _family, _stem in _TORCH_MODULES.items():
    for _nd in (1, 2, 3):
        globals()[f"{_stem}{_nd}d"] = _module(_family, _nd, getattr(torch.nn, f"{_stem}{_nd}d"))
for _family in ("global_max_pool", "global_avg_pool"):
    for _nd in (1, 2, 3):
        _cls = _global_module(_family, _nd)
        globals()[_cls.__name__] = _cls



def _conv_module(nd: int) -> type:
    base = getattr(torch.nn, f"Conv{nd}d")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=2, padding=0,
                 bias: bool = True, device=None, dtype=None):
        base.__init__(self, in_channels, out_channels, kernel_size, stride=stride,
                      padding=padding, bias=bias, device=device, dtype=dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return getattr(functional, f"strided_conv{nd}d")(input, self.weight, self.stride,
                                                         self.padding, self.bias)

    return type(f"StridedConv{nd}d", (base,), {
        "__init__": __init__, "forward": forward, "__module__": __name__,
        "__doc__": f"A torch.nn.Conv{nd}d (stride 2 by default; no groups or dilation) "
                   f"computed by fastpool's strided-convolution kernels."})


StridedConv1d, StridedConv2d, StridedConv3d = (_conv_module(nd) for nd in (1, 2, 3))

__all__ = [f"{stem}{nd}d" for stem in (*_TORCH_MODULES.values(), "GlobalMaxPool",
                                       "GlobalAvgPool", "StridedConv") for nd in (1, 2, 3)] + [
    "convert"]


def _replacements() -> dict:
    return {getattr(torch.nn, f"{stem}{nd}d"): globals()[f"{stem}{nd}d"]
            for stem in _TORCH_MODULES.values() for nd in (1, 2, 3)}


def convert(module: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Replace every torch.nn pooling module of a model by fastpool's equivalent.

    The pattern of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: each
    ``torch.nn.{Max,Avg,LP,AdaptiveMax,AdaptiveAvg}Pool{1,2,3}d`` (exactly that
    class, not a subclass, whose ``forward`` may differ) becomes the
    ``fastpool.torch.nn`` class of the same name with the same configuration,
    hooks and training flag.  Pooling modules hold no parameters or buffers, so
    the state dict is unchanged and stays loadable either way.  Pooling written
    as ``torch.nn.functional`` calls inside a ``forward`` is not converted.

    Parameters
    ----------
    module : torch.nn.Module
        A model, or a single pooling module.
    inplace : bool
        Convert ``module`` itself; by default a deep copy is converted and
        ``module`` is left as it was.

    Returns
    -------
    torch.nn.Module
        The converted model (``module`` itself when ``inplace``).

    Examples
    --------
    >>> import torch
    >>> import fastpool.torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.MaxPool2d(2),
    ...                             torch.nn.AdaptiveAvgPool2d(1))
    >>> fast = fastpool.torch.convert(model)
    >>> type(fast[1]).__module__
    'fastpool.torch.nn'
    >>> fast[1]
    MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
    >>> type(model[1]).__module__  # the original is unchanged
    'torch.nn.modules.pooling'
    >>> fast.load_state_dict(model.state_dict())
    <All keys matched successfully>
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"convert: module must be a torch.nn.Module, got "
                        f"{type(module).__name__}")
    if not inplace:
        module = copy.deepcopy(module)
    replacements = _replacements()
    for submodule in module.modules():
        replacement = replacements.get(type(submodule))
        if replacement is not None:
            # fastpool's class subclasses torch's and adds no state: the same
            # object, with fastpool's forward.
            submodule.__class__ = replacement
    return module
