"""Dataset loaders on the real files, deterministic splits, and the errors users see."""
import gzip

import numpy as np
import pytest

from qadmm.data import load_dataset
from qadmm.errors import UserError


def test_digits_builtin_split_is_deterministic_and_stratified():
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == 1797
    # every class keeps ~20% in test
    counts = np.bincount(a.y_test, minlength=10) / np.bincount(np.concatenate([a.y_train, a.y_val, a.y_test]))
    assert np.all(np.abs(counts - 0.2) < 0.02)
    c = load_dataset("digits", seed=4)
    assert not np.array_equal(a.y_test, c.y_test)


def test_normalisation_uses_training_split_only():
    d = load_dataset("digits", seed=0)
    assert np.allclose(d.mean, d.x_train.mean(), atol=1e-4)
    assert np.allclose(d.std, d.x_train.std(), atol=1e-4)


@pytest.mark.parametrize("name,shape,classes,n_test", [("seeds", (7,), 3, 42), ("pendigits", (16,), 10, 3498),
                                                        ("mnist-10k", (1, 28, 28), 10, 2000)])
def test_shared_datasets_load(shared_data, name, shape, classes, n_test):
    d = load_dataset(name, shared_data, seed=0)
    assert d.input_shape == shape and d.num_classes == classes and len(d.y_test) == n_test
    assert np.isfinite(d.x_train).all() and d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "pendigits" / "pendigits.tra")):
        load_dataset("pendigits", tmp_path)


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        load_dataset("nope")


def test_npz_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.normal(size=(40, 3)), y_train=rng.integers(0, 2, 40),
             x_test=rng.normal(size=(10, 3)), y_test=rng.integers(0, 2, 10))
    d = load_dataset(str(tmp_path / "d.npz"))
    assert d.input_shape == (3,) and len(d.y_test) == 10
    # x and y alone: labelled, 20% held out by seed (the labels were once dropped without a word)
    np.savez(tmp_path / "xy.npz", x=rng.normal(size=(50, 3)), y=rng.integers(0, 3, 50))
    d = load_dataset(str(tmp_path / "xy.npz"))
    assert d.labelled and len(d.y_test) == 10 and len(d.y_train) + len(d.y_val) == 40
    np.savez(tmp_path / "bad.npz", x=rng.normal(size=(50, 3)), y=rng.integers(0, 3, 49))
    with pytest.raises(UserError, match="x has 50 samples but y has 49"):
        load_dataset(str(tmp_path / "bad.npz"))
    (tmp_path / "d.csv").write_text("a,b,label\n" + "\n".join(f"{i},{i * 2},{i % 2}" for i in range(30)))
    d = load_dataset(str(tmp_path / "d.csv"), label_column="label")
    assert d.input_shape == (2,) and d.num_classes == 2
    with pytest.raises(UserError, match="no column 'y'"):
        load_dataset(str(tmp_path / "d.csv"), label_column="y")


def test_nan_and_wrong_shape_are_refused(tmp_path):
    x = np.ones((20, 3))
    x[0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=x, y_train=np.zeros(20), x_test=np.ones((5, 3)), y_test=np.zeros(5))
    with pytest.raises(UserError, match="NaN"):
        load_dataset(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "shape.npz", x_train=np.ones((20, 3)), y_train=np.zeros(20), x_test=np.ones((5, 4)), y_test=np.zeros(5))
    with pytest.raises(UserError, match="differ in shape"):
        load_dataset(str(tmp_path / "shape.npz"))


def test_truncated_idx_file(tmp_path):
    (tmp_path / "mnist").mkdir()
    with gzip.open(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + np.array([10, 28, 28], dtype=">u4").tobytes() + bytes(100))
    with gzip.open(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + np.array([10], dtype=">u4").tobytes() + bytes(10))
    with pytest.raises(UserError, match="truncated"):
        load_dataset("mnist-10k", tmp_path)


def _cifar_dir(tmp_path, n=20):
    import pickle

    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def test_cifar_python_batches(tmp_path):
    _cifar_dir(tmp_path)
    d = load_dataset("cifar10", tmp_path)
    assert d.input_shape == (3, 32, 32) and len(d.y_test) == 20 and d.mean.shape == (3, 1, 1)


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    import pickle

    folder = _cifar_dir(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        load_dataset("cifar10", tmp_path)
