"""Users' own model factories, for the CLI tests of `--model package.module:factory`."""
from torch import nn


def small_mlp(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))


def with_sigmoid(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, num_classes))


def with_softplus(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Softplus(), nn.Linear(32, num_classes))


class _Sorted(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        import torch

        return self.fc(torch.sort(x.flatten(1), dim=1).values)


def with_sort(input_shape, num_classes):
    """An operator qexport does not run (sorting): refused at capture."""
    return _Sorted(num_classes)


class _Backbone(nn.Module):
    """Feature maps out, not class scores (a backbone / segmentation-style head)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        import torch

        return self.c2(torch.relu(self.bn(self.c1(x))))


def backbone(input_shape):
    return _Backbone()


def embedding(input_shape):
    """A 16-d embedding of each sample."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
