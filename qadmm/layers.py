"""Which layers get integer codes, and writing W = α·Q into them."""
from __future__ import annotations

from torch import nn

QUANTIZABLE = (nn.Linear, nn.Conv2d)


def quantizable_layers(model: nn.Module, keep_first: bool = False, keep_last: bool = False) -> list[tuple[str, nn.Module]]:
    """Linear and Conv2d layers in registration (= forward, for the zoo) order, minus the first
    and/or last when asked to keep them float."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    if keep_first and layers:
        layers = layers[1:]
    if keep_last and layers:
        layers = layers[:-1]
    return layers
