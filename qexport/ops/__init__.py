"""The registry of operator kinds: one module per kind, collected by plain imports.

Adding an op is one new file with a `Kind` subclass instance `KIND` (see `base.py`) and one line
below. Dropout and Identity are not kinds: tracing passes their input through.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qexport.ops import activation, add, aten, avgpool, batchnorm, concat, conv, flatten, layernorm, linear, maxpool, mean, \
    mul, normalize, relu, reshape, softmax
from qexport.ops.base import Kind

_ALL: list[Kind] = [normalize.KIND, linear.KIND, conv.KIND, batchnorm.KIND, relu.KIND, *activation.KINDS, maxpool.KIND,
                    avgpool.KIND, mean.KIND, flatten.KIND, reshape.KIND, add.KIND, mul.KIND, concat.KIND, layernorm.KIND,
                    softmax.KIND, *aten.KINDS]
KINDS: dict[str, Kind] = {k.name: k for k in _ALL}

IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
IDENTITY_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout)
IDENTITY_METHODS = ("contiguous",)


def is_identity_call(target, args: tuple, kwargs: dict) -> bool:
    """A call that is the identity in eval mode though not a registered function: torchvision's
    `stochastic_depth(x, p, mode, training=False)` (EfficientNet, ConvNeXt, Swin), recognised by its
    module and name so qexport never imports torchvision."""
    if getattr(target, "__name__", "") == "stochastic_depth" and \
            getattr(target, "__module__", "").startswith("torchvision.ops"):
        training = args[3] if len(args) > 3 else kwargs.get("training", True)
        return training is False
    return False


def kind_of_module(m: nn.Module) -> Kind | None:
    """The kind of a leaf module, by exact type (a subclass may override forward)."""
    return next((k for k in _ALL if type(m) in k.modules), None)


def kind_of_call(target, method: bool) -> Kind | None:
    if method:
        return next((k for k in _ALL if target in k.methods), None)
    return next((k for k in _ALL if any(target is f for f in k.functions)), None)
