"""Shared fixtures: the real datasets beside the checkout (skipped when absent) and a small
trained digits model, built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}: place the project's shared/ folder beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits():
    from qadmm.data import load_dataset

    return load_dataset("digits", seed=0)


def trained(name: str, digits, epochs: int):
    """A zoo model trained on digits for a few seconds (seed 0, one thread), in eval mode."""
    from qadmm.train import TrainConfig, seed_everything, train_epochs
    from qadmm.zoo import build_model

    torch.set_num_threads(1)
    seed_everything(0)
    model = build_model(name, digits.input_shape, digits.num_classes, digits.mean, digits.std)
    train_epochs(model, digits, TrainConfig(epochs=epochs, lr=3e-3, batch_size=32, patience=epochs), progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def digits_mlp(digits):
    """mlp-digits trained for a few epochs (about 96% test accuracy): a real model, quickly."""
    return trained("mlp-digits", digits, 25)


@pytest.fixture(scope="session")
def digits_cnn(digits):
    """cnn-small (convolutions + BatchNorm) trained on digits for a few seconds (about 93% test accuracy)."""
    return trained("cnn-small", digits, 30)
