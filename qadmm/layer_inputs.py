"""What a layer sees: its inputs on calibration data, as the rows of the matrix its weight multiplies.

Calibration-only back-ends (GPTQ, LDNQ, bias correction) reason about one layer at a time through
its output Y = W X: for a Linear layer X holds the input vectors, for a Conv2d the unfolded patches
(C_in·k·k values per output position, zero padding included), so the weight is read as a matrix
(C_out, C_in·k·k) and everything is a matrix product. The inputs come from running the *current*
model, so a layer quantized after others sees the outputs of the already-quantized layers before it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


class _Stop(Exception):
    """Raised from a hook once the layer's input is captured: the rest of the forward pass is not needed."""


def supports_matrix(m: nn.Module) -> bool:
    """Whether `m` reads as one matrix product on patches (groups=1, zero padding)."""
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"


def _padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":  # stride 1 (PyTorch's own rule); odd kernels pad symmetrically
        return tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size))  # type: ignore[return-value]
    return tuple(m.padding)  # type: ignore[return-value]


def as_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows (samples × patch positions, C_in·k·k or in_features), float32."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1]).float()
    cols = F.unfold(x.float(), m.kernel_size, m.dilation, _padding(m), m.stride)  # (N, C·k·k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def weight_matrix(m: nn.Module) -> torch.Tensor:
    """The weight as (C_out, C_in·k·k): the layout `as_rows` multiplies."""
    return m.weight.detach().reshape(m.weight.shape[0], -1)


def for_each_input(model: nn.Module, layer: nn.Module, x: torch.Tensor, fn: Callable[[torch.Tensor], None],
                   batch_size: int = 256) -> None:
    """Run `model` (eval mode, no grad) on x in batches and call fn(rows) with each batch's input rows
    of `layer`; the forward pass stops at the layer."""
    def hook(_m, args):
        fn(as_rows(layer, args[0]))
        raise _Stop

    was_training = model.training
    model.eval()
    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                try:
                    model(x[i:i + batch_size])
                except _Stop:
                    pass
    finally:
        handle.remove()
        model.train(was_training)


def input_hessian(model: nn.Module, layer: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """H = XᵀX / n over the layer's input rows (float64, (d, d)): the curvature of the layer's
    output reconstruction error ‖(W − Ŵ)X‖² / n = tr((W − Ŵ) H (W − Ŵ)ᵀ)."""
    acc: dict[str, torch.Tensor | int] = {"h": 0, "n": 0}

    def add(rows: torch.Tensor) -> None:  # float32 products per batch (4x faster), float64 running sum
        acc["h"] = acc["h"] + (rows.T @ rows).double()
        acc["n"] = int(acc["n"]) + len(rows)

    for_each_input(model, layer, x, add, batch_size)
    return acc["h"] / max(int(acc["n"]), 1)  # type: ignore[operator]


def input_mean(model: nn.Module, layer: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """E[x] over the layer's input rows (float64, (d,))."""
    acc: dict[str, torch.Tensor | int] = {"s": 0, "n": 0}

    def add(rows: torch.Tensor) -> None:
        acc["s"] = acc["s"] + rows.double().sum(0)
        acc["n"] = int(acc["n"]) + len(rows)

    for_each_input(model, layer, x, add, batch_size)
    return acc["s"] / max(int(acc["n"]), 1)  # type: ignore[operator]
