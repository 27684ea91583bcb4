"""Which layers get integer codes, and writing W = α·Q into them."""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from qadmm.errors import UserError
from qadmm.spec import QuantSpec

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def select_layers(model: nn.Module, spec: QuantSpec) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to quantize, in registration (= forward, for the zoo) order: the
    Linear/Conv1d/Conv2d layers minus the first and/or last when kept float and minus those matching
    `spec.exclude`. A `layer_bits` or `exclude` pattern that matches none of the model's quantizable
    layers (kept ones included) is a UserError: a typo would otherwise quietly change nothing."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    names = [n for n, _ in layers]
    for what, patterns in (("layer_bits", list(spec.layer_bits)), ("exclude", list(spec.exclude))):
        for pattern in patterns:
            if not any(fnmatchcase(n, pattern) for n in names):
                shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                raise UserError(f"{what} pattern {pattern!r} matches no quantizable layer of this model "
                                f"(its layers: {shown or 'none'}): use one of these names or a glob such as 'body.*'")
    if spec.keep_first and layers:
        layers = layers[1:]
    if spec.keep_last and layers:
        layers = layers[:-1]
    return [(n, m) for n, m in layers if not any(fnmatchcase(n, pat) for pat in spec.exclude)]


@dataclass
class Stage:
    """The parameter sets of one layer's step: which modules run in train mode, what may move."""

    weight: nn.Parameter  # W_l
    bias: nn.Parameter | None  # b_l: float, trained with W_l and in the retraining after it
    after: list[nn.Parameter]  # the float parameters of the modules after layer l
    frozen_modules: list[nn.Module]  # leaf modules before layer l (eval mode: BatchNorm statistics fixed)
    after_buffers: list[torch.Tensor] = field(default_factory=list)  # BatchNorm statistics after layer l

    @property
    def later(self) -> list[nn.Parameter]:
        """What the retraining of eq. 5.17 may change."""
        return ([self.bias] if self.bias is not None else []) + self.after

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of everything training after layer l changes: the later parameters and the BatchNorm
        statistics (running in train mode, they move with every minibatch)."""
        return [t.detach().clone() for t in self.later + self.after_buffers]

    @torch.no_grad()
    def restore(self, snap: list[torch.Tensor]) -> None:
        for t, v in zip(self.later + self.after_buffers, snap):
            t.copy_(v)


def stage(model: nn.Module, layer_name: str) -> Stage:
    """Split `model` at `layer_name` in registration (= forward, for the zoo) order."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    order = [n for n, _ in leaves]
    if layer_name not in order:
        raise KeyError(layer_name)
    k = order.index(layer_name)
    layer = leaves[k][1]
    after = [p for _, m in leaves[k + 1:] for p in m.parameters(recurse=False)]
    buffers = [b for _, m in leaves[k + 1:] for b in m.buffers(recurse=False)]
    return Stage(layer.weight, getattr(layer, "bias", None), after, [m for _, m in leaves[:k]], buffers)
