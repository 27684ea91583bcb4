"""What a layer sees: its inputs on calibration data, as the rows of the matrix its weight multiplies.

Calibration-only back-ends (GPTQ, LDNQ, bias correction) reason about one layer at a time through
its output Y = W X: for a Linear layer X holds the input vectors, for a Conv1d/Conv2d the unfolded
patches (C_in·k or C_in·k·k values per output position, padding included, whatever its mode), so the
weight is read as a matrix (C_out, C_in·k·k) and everything is a matrix product. A grouped convolution
(groups = g) is g such products side by side: output channels of group i see only the columns of
input-channel group i, so its weight matrix is (C_out, C_in/g·k·k) with rows in groups of C_out/g, and
its input Hessian is one (d/g, d/g) block per group. The inputs come from running the *current*
model, so a layer quantized after others sees the outputs of the already-quantized layers before it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


class _Stop(Exception):
    """Raised from a hook once the layer's input is captured: the rest of the forward pass is not needed."""


@contextmanager
def stop_before(layer: nn.Module | None, on_input: Callable[[torch.Tensor], None] | None = None):
    """Within the block, `run(model, x)` runs the model up to `layer` only: `on_input(its input)` is
    called, then the rest of the forward pass is skipped. With layer None, `run` runs it whole."""
    def hook(_m, args):
        if on_input is not None:
            on_input(args[0])
        raise _Stop

    def run(model: nn.Module, x: torch.Tensor) -> None:
        try:
            model(x)
        except _Stop:
            pass

    handle = layer.register_forward_pre_hook(hook) if layer is not None else None
    try:
        yield run
    finally:
        if handle is not None:
            handle.remove()


def groups(m: nn.Module) -> int:
    """Independent input/output channel groups of a layer (1 for Linear)."""
    return int(getattr(m, "groups", 1))


def _pads(m: nn.Conv1d | nn.Conv2d) -> list[int]:
    """The F.pad amounts (last dimension first, left then right) of PyTorch's own forward pass;
    'same' pads the extra element of an even kernel on the right, as PyTorch does."""
    if m.padding == "valid":
        return [0] * (2 * len(m.kernel_size))
    pads: list[int] = []
    for i in reversed(range(len(m.kernel_size))):
        if m.padding == "same":  # stride 1 (PyTorch's own rule)
            total = m.dilation[i] * (m.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [m.padding[i], m.padding[i]]
    return pads


def as_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows (samples × output positions, in_features or C_in·k(·k)), float32."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1]).float()
    x = x.float()
    if x.dim() == len(m.kernel_size) + 1:  # an unbatched input
        x = x.unsqueeze(0)
    pads = _pads(m)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    kernel, dilation, stride = m.kernel_size, m.dilation, m.stride
    if isinstance(m, nn.Conv1d):  # a Conv1d is a Conv2d over a height-1 image
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    # F.unfold's patches, but gathered once straight into rows (unfold then transpose copies twice):
    # row (n, i, j) holds x[n, c, i·stride + a·dilation, j·stride + b·dilation] at column (c, a, b)
    x = x.contiguous()
    n, c, hp, wp = x.shape
    ho, wo = ((size - d * (k - 1) - 1) // s + 1 for size, k, d, s in zip((hp, wp), kernel, dilation, stride))
    patches = x.as_strided((n, ho, wo, c, *kernel), (c * hp * wp, stride[0] * wp, stride[1], hp * wp,
                                                      dilation[0] * wp, dilation[1]))
    return patches.reshape(n * ho * wo, -1)


def gram(rows: torch.Tensor) -> torch.Tensor:
    """rows.T @ rows for rows (n, d), float32. The product is symmetric: for d >= 512 it is computed
    as 4 x 4 column blocks, the upper ones only, and mirrored (about 1.3x faster; the same values
    as the full product, whose entries are the same dot products)."""
    d = rows.shape[1]
    if d < 512:
        return rows.T @ rows
    edges = [d * i // 4 for i in range(5)]
    out = torch.empty(d, d, dtype=rows.dtype)
    for lo, hi in zip(edges, edges[1:]):
        band = rows[:, lo:hi].T @ rows[:, lo:]  # block row: (hi - lo, d - lo)
        out[lo:hi, lo:] = band
        out[hi:, lo:hi] = band[:, hi - lo:].T
    return out


def weight_matrix(m: nn.Module) -> torch.Tensor:
    """The weight as (C_out, C_in/groups·k·k): the layout `as_rows` multiplies, group by group."""
    return m.weight.detach().reshape(m.weight.shape[0], -1)


def times_hessian(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """W·H for a weight matrix W (out, d) and an input Hessian H: (d, d), or (g, d, d) per group
    (the rows of W in g consecutive groups)."""
    if h.dim() == 2:
        return w @ h
    return (w.reshape(len(h), -1, w.shape[1]) @ h).reshape(w.shape)


def times_input(w: torch.Tensor, v: torch.Tensor, n_groups: int = 1) -> torch.Tensor:
    """W·v for a weight matrix W (out, d) and an input row v (n_groups·d): each group of rows of W
    multiplies its own slice of v."""
    return (w.reshape(n_groups, -1, w.shape[1]) @ v.reshape(n_groups, -1, 1)).reshape(-1)


def for_each_input(model: nn.Module, layer: nn.Module, x: torch.Tensor, fn: Callable[[torch.Tensor], None],
                   batch_size: int = 256) -> None:
    """Run `model` (eval mode, no grad) on x in batches and call fn(rows) with each batch's input rows
    of `layer`; the forward pass stops at the layer. A model that keeps its values between the
    layers of a walk (a `stream_inputs(layer, x, batch_size)` method that returns the batches; see
    `walk`) gives them without running the layers before again: the same rows, computed once."""
    stream = getattr(model, "stream_inputs", None)
    batches = stream(layer, x, batch_size) if stream is not None else None
    if batches is not None:
        for b in batches:
            fn(as_rows(layer, b))
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), stop_before(layer, lambda inp: fn(as_rows(layer, inp))) as run:
            for i in range(0, len(x), batch_size):
                run(model, x[i:i + batch_size])
    finally:
        model.train(was_training)


def input_hessian(model: nn.Module, layer: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """H = XᵀX / n over the layer's input rows (float64, (d, d)): the curvature of the layer's
    output reconstruction error ‖(W − Ŵ)X‖² / n = tr((W − Ŵ) H (W − Ŵ)ᵀ). For a grouped convolution
    one block per group, (groups, d/groups, d/groups): the cross-group blocks never meet a weight."""
    g = groups(layer)
    acc: dict[str, torch.Tensor | int] = {"h": 0, "n": 0}

    def add(rows: torch.Tensor) -> None:  # float32 products per batch (4x faster), float64 running sum
        if g == 1:
            acc["h"] = acc["h"] + gram(rows).double()
        else:
            r = rows.reshape(len(rows), g, -1).transpose(0, 1)  # (g, n, d/g)
            acc["h"] = acc["h"] + (r.transpose(1, 2) @ r).double()
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
