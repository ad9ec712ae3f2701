"""Drop-in replacements for torch.nn's pooling modules, on fastpool's kernels.

Each class with a torch.nn name subclasses torch's own module (same
constructor, attributes and repr) and only replaces ``forward``.  fastpool's
own: ``Global{Max,Avg,Min}Pool{1,2,3}d``, ``GlobalPool{1,2,3}d(mode)`` (timm's
avgmax and catavgmax heads too), ``MinPool{1,2,3}d`` and
``AdaptiveMinPool{1,2,3}d`` (torch's max-pooling constructors, with the
minimum), ``StridedConv{1,2,3}d`` and ``GeM{1,2,3}d`` (long names
``GeneralizedMeanPooling{1,2,3}d``; ``GeM`` is the 2-D one), generalized-mean pooling
with a learnable (or, with ``learn_p=False``, fixed) ``p``.

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
from torch.nn.modules import pooling as _torch_pooling

from fastpool.torch import functional

# family: torch.nn's class name stem (each in 1, 2 and 3 dimensions unless _NDS says)
_TORCH_MODULES = {
    "max_pool": "MaxPool", "avg_pool": "AvgPool", "lp_pool": "LPPool",
    "adaptive_max_pool": "AdaptiveMaxPool", "adaptive_avg_pool": "AdaptiveAvgPool",
    "fractional_max_pool": "FractionalMaxPool", "max_unpool": "MaxUnpool",
}
_NDS = {"fractional_max_pool": (2, 3)}
# fastpool's min pooling, on the constructors of torch's max pooling (their private
# bases, so an isinstance check for torch's max pooling does not match).
_MIN_MODULES = {"min_pool": ("MinPool", _torch_pooling._MaxPoolNd),
                "adaptive_min_pool": ("AdaptiveMinPool", _torch_pooling._AdaptiveMaxPoolNd)}


def _prepare_scriptable(self):
    """torch.jit.script calls this first: fastpool's modules cannot be scripted."""
    raise RuntimeError(
        f"fastpool.torch.nn.{type(self).__name__} cannot be compiled by torch.jit.script "
        f"(TorchScript is in maintenance mode and does not compile fastpool's Python "
        f"wrappers); use torch.export.export to get a graph to save and deploy (fastpool's "
        f"ops appear as torch.ops.fastpool.*), or torch.compile to speed the model up")


def _module(family: str, nd: int, base: type, name: str | None = None) -> type:
    function = getattr(functional, f"{family}{nd}d")
    # max_unpool's indices and output_size come with each call.
    skip = ("input", "indices", "output_size") if family == "max_unpool" else ("input",)
    names = [arg for arg in inspect.signature(function).parameters if arg not in skip]

    def forward(self, input: torch.Tensor):
        return function(input, **{name: getattr(self, name) for name in names
                                   if hasattr(self, name)})

    def unpool_forward(self, input: torch.Tensor, indices: torch.Tensor,
                       output_size=None) -> torch.Tensor:
        return function(input, indices, **{name: getattr(self, name) for name in names},
                        output_size=output_size)

    doc = (f"torch.nn.{base.__name__} computed by fastpool's kernels." if name is None else
           f"{name}: {family.replace('_', ' ')}ing with the constructor of torch.nn."
           f"{name.replace('Min', 'Max')}.")
    return type(name or base.__name__, (base,), {
        "forward": unpool_forward if family == "max_unpool" else forward,
        "__module__": __name__, "__prepare_scriptable__": _prepare_scriptable,
        "__doc__": doc})


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
    name = f"Global{family.split('_')[1].capitalize()}Pool{nd}d"
    return type(name, (_GlobalPool,), {
        "family": family, "nd": nd, "__module__": __name__,
        "__doc__": f"Pool each {nd}-D plane to one value: (N, C), or (N, C, 1, ...) with "
                   f"keepdims."})


for _family, _stem in _TORCH_MODULES.items():
    for _nd in _NDS.get(_family, (1, 2, 3)):
        globals()[f"{_stem}{_nd}d"] = _module(_family, _nd, getattr(torch.nn, f"{_stem}{_nd}d"))
for _family, (_stem, _base) in _MIN_MODULES.items():
    for _nd in (1, 2, 3):
        globals()[f"{_stem}{_nd}d"] = _module(_family, _nd, _base, f"{_stem}{_nd}d")
for _family in ("global_max_pool", "global_avg_pool", "global_min_pool"):
    for _nd in (1, 2, 3):
        _cls = _global_module(_family, _nd)
        globals()[_cls.__name__] = _cls


class _GlobalPoolByMode(torch.nn.Module):
    nd = 0
    __prepare_scriptable__ = _prepare_scriptable

    def __init__(self, mode: str = "avg", keepdims: bool = False) -> None:
        super().__init__()
        if mode not in ("avg", "max", "min", "avgmax", "catavgmax"):
            raise ValueError(f"{type(self).__name__}: mode must be one of ('avg', 'max', "
                             f"'min', 'avgmax', 'catavgmax'), got {mode!r}")
        self.mode, self.keepdims = mode, keepdims

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return getattr(functional, f"global_pool{self.nd}d")(input, self.mode, self.keepdims)

    def feat_mult(self) -> int:
        """The channel multiplier, as timm's ``SelectAdaptivePool2d.feat_mult``."""
        return 2 if self.mode == "catavgmax" else 1

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, keepdims={self.keepdims}"


def _global_mode_module(nd: int) -> type:
    return type(f"GlobalPool{nd}d", (_GlobalPoolByMode,), {
        "nd": nd, "__module__": __name__,
        "__doc__": f"""Global pooling of {nd}-D planes by mode, timm's heads included.

``mode``: "avg", "max", "min", "avgmax" (``0.5 * (avg + max)``) or "catavgmax"
(average then maximum on the channel axis: 2C channels, ``feat_mult() == 2``).
Output (N, C) or (N, C{', 1' * nd}) with keepdims (timm's ``flatten=False``).
"""})


GlobalPool1d, GlobalPool2d, GlobalPool3d = (_global_mode_module(nd) for nd in (1, 2, 3))


class _GeneralizedMeanPooling(torch.nn.Module):
    nd = 0
    __prepare_scriptable__ = _prepare_scriptable

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True,
                 per_channel: int | bool | None = False, output_size=1, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        name = type(self).__name__
        if per_channel is None or per_channel is False:
            per_channel = False
        elif per_channel is True:
            raise ValueError(f"{name}: a per-channel p needs the number of channels: pass "
                             f"per_channel=C (an int), not True")
        elif not isinstance(per_channel, int) or per_channel < 1:
            raise ValueError(f"{name}: per_channel must be False or the number of channels "
                             f"C (a positive int), got {per_channel!r}")
        if not isinstance(learn_p, bool):
            raise TypeError(f"{name}: learn_p must be a bool, got {learn_p!r}")
        self.eps, self.per_channel, self.output_size = eps, per_channel, output_size
        self.learn_p = learn_p
        # Shape (1,) for one p, as retrieval models (cnnimageretrieval's GeM) hold it.
        p = torch.full((per_channel or 1,), float(p), device=device, dtype=dtype)
        if learn_p:
            self.p = torch.nn.Parameter(p)
        else:  # fixed: in the state dict, not in parameters()
            self.register_buffer("p", p)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return getattr(functional, f"gem_pool{self.nd}d")(input, self.p, self.eps,
                                                          self.output_size)

    def extra_repr(self) -> str:
        if self.per_channel:
            p = f"per_channel={self.per_channel}"
        else:  # the current (learned) p
            p = "p=?" if self.p.device.type == "meta" else f"p={self.p.item():.4g}"
        fixed = "" if self.learn_p else ", learn_p=False"
        size = "" if self.output_size == 1 else f", output_size={self.output_size}"
        return f"{p}, eps={self.eps}{fixed}{size}"


def _gem_module(nd: int) -> type:
    return type(f"GeM{nd}d", (_GeneralizedMeanPooling,), {
        "nd": nd, "__module__": __name__,
        "__doc__": f"""Generalized-mean (GeM) pooling of {nd}-D planes with a learnable power p.

``mean(clamp(x, min=eps) ** p) ** (1/p)`` over each plane (``output_size=1``: the
global pool of retrieval and fine-grained models, output (N, C{', 1' * nd})), or to
another adaptive ``output_size``. ``p`` is an ``nn.Parameter`` (a buffer with
``learn_p=False``), initialised to ``p``: one value (shape (1,)), or one per channel
with ``per_channel=C``.  CPU and CUDA tensors (the CUDA back end's GeM kernels).
``GeneralizedMeanPooling{nd}d`` is the same class.

Parameters
----------
p : float, default 3.0
    The initial power.
eps : float, default 1e-6
    Values below eps count as eps.
learn_p : bool, default True
    Learn p (an ``nn.Parameter``); False keeps it fixed, a buffer (saved in the state
    dict, absent from ``parameters()``).
per_channel : False or int, default False
    False: one p for every channel.  A per-channel p needs the channel count, so pass
    ``per_channel=C``, the number of input channels (True is refused).
output_size : int or tuple of {nd} ints (or None), default 1
    The adaptive output size.
"""})


GeM1d, GeM2d, GeM3d = (_gem_module(nd) for nd in (1, 2, 3))
# The long names, the same classes.
GeneralizedMeanPooling1d, GeneralizedMeanPooling2d, GeneralizedMeanPooling3d = (
    GeM1d, GeM2d, GeM3d)
GeneralizedMeanPooling = GeM = GeM2d



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

__all__ = [f"{stem}{nd}d" for family, stem in _TORCH_MODULES.items()
           for nd in _NDS.get(family, (1, 2, 3))] + [
    f"{stem}{nd}d" for stem in ("MinPool", "AdaptiveMinPool", "GlobalMaxPool",
                                "GlobalAvgPool", "GlobalMinPool", "GlobalPool", "StridedConv",
                                "GeneralizedMeanPooling", "GeM") for nd in (1, 2, 3)] + [
    "GeneralizedMeanPooling", "GeM", "convert"]


def _replacements() -> dict:
    return {getattr(torch.nn, f"{stem}{nd}d"): globals()[f"{stem}{nd}d"]
            for family, stem in _TORCH_MODULES.items() for nd in _NDS.get(family, (1, 2, 3))}


def convert(module: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Replace every torch.nn pooling module of a model by fastpool's equivalent.

    The pattern of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: each
    ``torch.nn.{Max,Avg,LP,AdaptiveMax,AdaptiveAvg}Pool{1,2,3}d``,
    ``torch.nn.MaxUnpool{1,2,3}d`` and ``torch.nn.FractionalMaxPool{2,3}d``
    (exactly that class, not a subclass, whose ``forward`` may differ) becomes
    the ``fastpool.torch.nn`` class of the same name with the same configuration,
    hooks and training flag.  These modules hold no parameters (a fractional
    pool's fixed ``_random_samples`` buffer stays as it is), so the state dict is
    unchanged and stays loadable either way.  Pooling written
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
