"""Shared fixtures: the real datasets beside the checkout (skipped when absent) and a small
trained digits model, built once per test session.

The suite gives the same result on every machine and every run of the same commit:
- Hypothesis runs derandomized when `CI` is set (profile `ci`: each test's examples come from a
  hash of the test, no example database), and with one printed seed otherwise (profile `dev`:
  a fresh seed each run, or `--hypothesis-seed=N` to replay one); the seed or profile is printed
  at the end of the run. The Hypothesis version is pinned in the `test` extra, because its
  generator defines which examples a seed draws.
- Every test starts from the same random state (torch, numpy, `random` seeded 0), so a test's
  numbers do not depend on which tests ran before it (`-k`, `--lf`, a new test added earlier).
- torch computes with one thread, here and in the qexport processes the tests start, so float
  reductions sum in the same order on a 2-core CI machine and a 64-core workstation.
"""
from __future__ import annotations

import os
import random
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import core as hypothesis_core

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Child processes (the CLI under subprocess) read these before torch starts its thread pool.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
torch.set_num_threads(1)

# A loaded 2-core machine can be slow to build a model: never fail a test on Hypothesis's timing checks.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", print_blob=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pytest_configure(config: pytest.Config) -> None:
    # Runs after Hypothesis's own plugin has read --hypothesis-profile/--hypothesis-seed.
    if config.getoption("hypothesis_profile", None):
        return
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
    if settings.get_current_profile_name() == "dev" and hypothesis_core.global_force_seed is None:
        hypothesis_core.global_force_seed = secrets.randbelow(2**32)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    import hypothesis

    profile = settings.get_current_profile_name()
    seed = hypothesis_core.global_force_seed
    if seed is not None:
        how = f"seed {seed} (replay: ./dev test --hypothesis-seed={seed})"
    elif settings.default.derandomize:
        how = "derandomized: each test's seed is a hash of the test, no example database"
    else:
        how = "random seeds"
    terminalreporter.write_line(f"hypothesis {hypothesis.__version__}, profile {profile!r}: {how}")


@pytest.fixture(autouse=True)
def same_random_state():
    """Each test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


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
    """A zoo model trained on digits for a few seconds (seed 0), in eval mode."""
    from qadmm.train import TrainConfig, seed_everything, train_epochs
    from qadmm.zoo import build_model

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
