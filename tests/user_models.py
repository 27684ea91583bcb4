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
