"""STE: quantization-aware fine-tuning with the straight-through estimator (the thesis's QNN-STE
baseline). The forward pass uses W_q = α·Π(W/α); the backward pass treats the projection as the
identity, so the float shadow weights W keep learning. α is refitted from W every step (warm-started
alternating fit, thesis Algorithm 4); the epoch whose quantized model is best on validation is kept."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qadmm.data import Dataset
from qadmm.finetune import Hooks, Projector, train
from qadmm.methods.method import Method
from qadmm.spec import QuantResult, QuantSpec


# (measured on cnn-small Fashion-MNIST, 2 bits per channel, 1 epoch: ste +16.6, md-tanh +2.9, askewsgd +1.1,
# admm-q −0.3, proxquant −0.2 points; docs/paper-methods.md)


@dataclass
class Params:
    POSITIVE: ClassVar[tuple[str, ...]] = ("epochs", "lr", "batch_size")  # meaningless at 0: step sizes, penalties, counts
    epochs: int = 30
    lr: float = 1e-3  # Adam on the float shadow weights (and all float parameters)
    batch_size: int = 32


def hooks(model: nn.Module, spec: QuantSpec, p: Params, proj: Projector) -> Hooks:
    def weight(n: str, w: torch.Tensor) -> torch.Tensor:
        return w + (proj.one(n, w).weight() - w).detach()  # straight-through: d(W_q)/dW := I

    return Hooks(weight=weight)


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    return train("ste", hooks, Params, model, data, spec)


METHOD = Method("ste", quantize, Params, __doc__,
                recalibrate=True,  # BatchNorm's running statistics were gathered on weights before the final hard rounding: re-estimate them on α·Q
                hooks=hooks)
