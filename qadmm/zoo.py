"""The model zoo: thesis MLPs, a small CNN and ResNet-20, each behind a `Normalize` first layer.

Every model is `nn.Sequential(normalize=Normalize(mean, std), body=...)`: the deployed graph then takes raw
features, and the preprocessing fitted on the training split travels inside the model.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from qadmm.errors import UserError

# Hidden widths of the thesis topologies (Table 6.2) and of our digits MLP.
MLP_HIDDEN = {"mlp-seeds": [5, 5], "mlp-pendigits": [12, 12], "mlp-mnist": [200, 200], "mlp-digits": [64, 64]}
NAMES = (*MLP_HIDDEN, "cnn-small", "resnet20")


class Normalize(nn.Module):
    """(x - mean) / std with the statistics of the training split (buffers, saved with the model)."""

    def __init__(self, mean: np.ndarray | torch.Tensor, std: np.ndarray | torch.Tensor):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def mlp(sizes: list[int]) -> nn.Sequential:
    """Flatten, then Linear+ReLU for each hidden width, then a final Linear (the logits)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn_small(in_channels: int, num_classes: int) -> nn.Sequential:
    """Two conv blocks and a linear head; works for 8x8 digits and 28x28 MNIST (global pooling)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, num_classes),
    )


class BasicBlock(nn.Module):
    """ResNet basic block; a strided/widening block uses a 1x1 conv + BN shortcut (option B)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def resnet20(in_channels: int, num_classes: int) -> nn.Sequential:
    """CIFAR ResNet-20 (He et al. 2016): 3 stages x 3 basic blocks, 16/32/64 channels."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for b in range(3):
            layers.append(BasicBlock(cin, cout, stride if b == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def mlp_layers(model: nn.Module) -> tuple[list[nn.Module], list[tuple[str, nn.Linear, bool]]]:
    """Read `model` as an MLP: preprocessing leaves (Normalize, Flatten, Identity), then Linear
    layers each followed by at most one ReLU. Returns (preprocessing modules, [(name, Linear,
    ReLU follows)]); raises ValueError naming the first module that does not fit."""
    for name, m in model.named_modules():
        if list(m.children()) and not isinstance(m, nn.Sequential):
            raise ValueError(f"{name or 'model'} is {type(m).__name__}")
    pre: list[nn.Module] = []
    layers: list[tuple[str, nn.Linear, bool]] = []
    for name, m in model.named_modules():
        if list(m.children()):
            continue
        if not layers and isinstance(m, (Normalize, nn.Flatten, nn.Identity)):
            pre.append(m)
        elif isinstance(m, nn.Linear):
            layers.append((name, m, False))
        elif isinstance(m, nn.ReLU) and layers and not layers[-1][2]:
            layers[-1] = (layers[-1][0], layers[-1][1], True)
        else:
            raise ValueError(f"layer {name} is {type(m).__name__}")
    if not layers:
        raise ValueError("it has no Linear layer")
    return pre, layers


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, mean, std) -> nn.Sequential:
    """A zoo model (see NAMES) or a user's `package.module:factory`, behind Normalize(mean, std)."""
    input_shape = tuple(input_shape)
    features = int(np.prod(input_shape))
    if name in MLP_HIDDEN:
        body = mlp([features, *MLP_HIDDEN[name], num_classes])
    elif name == "cnn-small":
        if len(input_shape) != 3:
            raise UserError(f"cnn-small needs image input (C, H, W), got {input_shape}: use an MLP for tabular data")
        body = cnn_small(input_shape[0], num_classes)
    elif name == "resnet20":
        if len(input_shape) != 3:
            raise UserError(f"resnet20 needs image input (C, H, W), got {input_shape}: use an MLP for tabular data")
        body = resnet20(input_shape[0], num_classes)
    else:
        raise UserError(f"unknown model {name!r}: use one of {', '.join(NAMES)}, module:factory or path/to/file.py:factory")
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), body=body))


def default_model(dataset: str, input_shape: tuple[int, ...]) -> str:
    """The zoo model a dataset gets when the user names none."""
    return {"seeds": "mlp-seeds", "pendigits": "mlp-pendigits", "mnist": "mlp-mnist", "mnist-10k": "mlp-mnist",
            "fashion-mnist": "mlp-mnist", "digits": "mlp-digits", "cifar10": "resnet20", "cifar100": "resnet20"}.get(
        dataset, "mlp-digits" if len(input_shape) != 3 else "cnn-small")
