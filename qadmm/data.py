"""Datasets by name, deterministic splits, normalisation fitted on the training split only.

Every loader returns raw features (what a user would feed the deployed model); the model's first
layer (`zoo.Normalize`) applies the mean/std fitted here, so preprocessing travels with the model.
"""
from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qadmm.errors import BadData, UserError

NAMES = ("digits", "seeds", "pendigits", "mnist", "mnist-10k", "fashion-mnist", "cifar10", "cifar100", "npz", "csv")
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Dataset:
    """Raw features (float32, shape (N, *input_shape)) and int64 labels for each split; unlabelled
    data (calibration inputs only) has labels None and num_classes 0."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_val: np.ndarray
    y_val: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    num_classes: int
    mean: np.ndarray  # broadcastable to input_shape, fitted on x_train only
    std: np.ndarray
    info: dict = field(default_factory=dict)  # provenance: files, split sizes, seed

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def labelled(self) -> bool:
        return self.y_train is not None

    def calibration(self, n: int, seed: int = 0) -> torch.Tensor:
        """`n` training inputs drawn without replacement by `seed` (all of them if fewer): the unlabeled
        calibration set of the calibration-only back-ends and of BatchNorm re-estimation."""
        idx = np.sort(np.random.default_rng(seed + 7).permutation(len(self.x_train))[:n])
        return torch.as_tensor(self.x_train[idx])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "labelled": self.labelled,
            "n_train": len(self.x_train),
            "n_val": len(self.x_val),
            "n_test": len(self.x_test),
            **self.info,
        }


def default_data_dir() -> Path:
    return Path(os.environ.get("QEXPORT_DATA", "data"))


def _need(path: Path, name: str) -> Path:
    if not path.is_file():
        how = {
            "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist` or put the four IDX .gz files there",
            "cifar10": "download the CIFAR-10 python version and unpack it there",
            "cifar100": "download the CIFAR-100 python version and unpack it there",
        }.get(name, f"put the original files under --data-dir DIR as DIR/{name}/")
        raise UserError(f"dataset {name!r}: file not found: {path} ({how}; or set --data-dir / QEXPORT_DATA)")
    return path


def _stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, take) with `fraction` of every class in `take`; deterministic given rng."""
    keep, take = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n = int(round(len(idx) * fraction))
        take.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(take))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e} (re-download it)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise UserError(f"{path} is not an unsigned-byte IDX file (wrong magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path}: header says {tuple(dims)} but holds {data.size} values (truncated file?)")
    return data.reshape(dims)


def _idx_pair(folder: Path, prefix: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    def find(stem: str) -> Path:
        for cand in (folder / f"{stem}.gz", folder / stem):
            if cand.is_file():
                return cand
        return _need(folder / f"{stem}.gz", name)

    x = _read_idx(find(f"{prefix}-images-idx3-ubyte"))
    y = _read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if len(x) != len(y):
        raise UserError(f"dataset {name!r}: {len(x)} images but {len(y)} labels in {folder}")
    return x[:, None].astype(np.float32), y.astype(np.int64)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles; allow only what rebuilds dicts of numpy arrays and
    lists, so loading a file can never run code from it."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UserError(f"refusing to load {module}.{name} from a CIFAR batch file: not a plain data file")


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            d = _ArrayOnlyUnpickler(f, encoding="bytes").load()
        except UserError:
            raise
        except Exception as e:  # truncated or foreign file
            raise UserError(f"cannot read CIFAR batch {path}: {e}") from None
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).astype(np.float32)
    return x, np.asarray(d[label_key.encode()], dtype=np.int64)


def _load_raw(name: str, data_dir: Path, path: Path | None, label_column: str | None, seed: int):
    """Returns (x_trainval, y_trainval, x_test, y_test, info)."""
    rng = np.random.default_rng(seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data.reshape(-1, 1, 8, 8).astype(np.float32), d.target.astype(np.int64)
        tr, te = _stratified_split(y, 0.2, rng)
        return x[tr], y[tr], x[te], y[te], {"source": "sklearn.datasets.load_digits", "split": "stratified 80/20 test"}
    if name == "seeds":
        f = _need(data_dir / "seeds" / "seeds_dataset.txt", name)
        rows = [line.split() for line in f.read_text().splitlines() if line.strip()]
        try:
            arr = np.array(rows, dtype=np.float64)
        except ValueError:
            raise UserError(f"{f}: rows must hold 8 numbers (7 features and the class 1-3)") from None
        x, y = arr[:, :7].astype(np.float32), arr[:, 7].astype(np.int64) - 1
        tr, te = _stratified_split(y, 0.2, rng)
        return x[tr], y[tr], x[te], y[te], {"source": str(f), "split": "stratified 80/20 test"}
    if name == "pendigits":
        def read(fname: str):
            f = _need(data_dir / "pendigits" / fname, name)
            arr = np.loadtxt(f, delimiter=",", dtype=np.float64)
            return arr[:, :16].astype(np.float32), arr[:, 16].astype(np.int64)

        xtr, ytr = read("pendigits.tra")
        xte, yte = read("pendigits.tes")
        return xtr, ytr, xte, yte, {"source": str(data_dir / "pendigits"), "split": "official tra/tes"}
    if name in ("mnist", "fashion-mnist"):
        folder = data_dir / name
        if name == "fashion-mnist" and not (folder / "train-images-idx3-ubyte.gz").is_file() and FASHION_SYSTEM_DIR.is_dir():
            folder = FASHION_SYSTEM_DIR
        xtr, ytr = _idx_pair(folder, "train", name)
        xte, yte = _idx_pair(folder, "t10k", name)
        return xtr, ytr, xte, yte, {"source": str(folder), "split": "official 60k/10k"}
    if name == "mnist-10k":
        folder = data_dir / "mnist"
        x, y = _idx_pair(folder, "t10k", name)
        tr, te = _stratified_split(y, 0.2, rng)
        return x[tr], y[tr], x[te], y[te], {"source": str(folder), "split": "official 10k test set split 8k/2k stratified"}
    if name in ("cifar10", "cifar100"):
        folder = data_dir / name
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if (folder / sub).is_dir():
                folder = folder / sub
        if name == "cifar10":
            parts = [_cifar_batch(_need(folder / f"data_batch_{i}", name), "labels") for i in range(1, 6)]
            xtr, ytr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            xte, yte = _cifar_batch(_need(folder / "test_batch", name), "labels")
        else:
            xtr, ytr = _cifar_batch(_need(folder / "train", name), "fine_labels")
            xte, yte = _cifar_batch(_need(folder / "test", name), "fine_labels")
        return xtr, ytr, xte, yte, {"source": str(folder), "split": "official 50k/10k"}
    if name == "npz":
        if path is None:
            raise UserError("dataset 'npz' needs a file: pass --data path/to/file.npz")
        try:
            with np.load(_need(path, name), allow_pickle=False) as z:
                if "x" in z and not any(k in z for k in ("x_train", "y_train", "x_test", "y_test")):
                    # inputs, with labels y or without: 20% held out (by seed) for the test split
                    x, y = z["x"], (z["y"] if "y" in z else None)
                    if y is not None and len(y) != len(x):
                        raise UserError(f"{path}: x has {len(x)} samples but y has {len(y)}: give one label per sample")
                    order = rng.permutation(len(x))
                    cut = len(x) - max(1, int(round(0.2 * len(x))))
                    train, test = np.sort(order[:cut]), np.sort(order[cut:])
                    return (x[train], None if y is None else y[train], x[test], None if y is None else y[test],
                            {"source": str(path), "split": f"{'labelled' if y is not None else 'unlabelled'}, 80/20 by seed"})
                missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z]
                if missing:
                    raise UserError(f"{path}: missing arrays {missing}; an npz dataset holds x_train, y_train, x_test, "
                                    "y_test, or x and y (split 80/20 by seed), or just x (unlabelled inputs)")
                xtr, ytr, xte, yte = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        except (ValueError, OSError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"cannot read {path} as npz: {e}") from None
        return xtr, ytr, xte, yte, {"source": str(path), "split": "file's train/test"}
    if name == "csv":
        if path is None:
            raise UserError("dataset 'csv' needs a file: pass --data path/to/file.csv --label-column NAME")
        if not label_column:
            raise UserError(f"{path}: name the label column with --label-column NAME")
        lines = [line for line in _need(path, name).read_text().splitlines() if line.strip()]
        if len(lines) < 2:
            raise BadData(f"{path}: no data rows (a .csv dataset is a header line, then one sample per line)")
        header = [h.strip() for h in lines[0].split(",")]
        if label_column not in header:
            raise UserError(f"{path}: no column {label_column!r}; columns are {', '.join(header)}")
        try:
            arr = np.array([[float(v) for v in line.split(",")] for line in lines[1:]], dtype=np.float64)
        except ValueError:
            raise BadData(f"{path}: every value must be numeric and every row must have {len(header)} values "
                          "(encode categories as numbers first)") from None
        li = header.index(label_column)
        y_raw = _labels(arr[:, li], f"{path} column {label_column!r}")  # whole numbers; mapped to 0..C-1 below
        classes, y = np.unique(y_raw, return_inverse=True)
        x = np.delete(arr, li, axis=1).astype(np.float32)
        tr, te = _stratified_split(y.astype(np.int64), 0.2, rng)
        return x[tr], y[tr].astype(np.int64), x[te], y[te].astype(np.int64), {"source": str(path), "split": "stratified 80/20 test", "classes": classes.tolist()}
    raise UserError(f"unknown dataset {name!r}: use one of {', '.join(NAMES)}, or a path to a .npz or .csv file")


def check_input_shape(data: Dataset, shape: tuple[int, ...], model: str) -> None:
    """Refuse a dataset whose samples do not have the model's input shape, naming a channels-last
    layout when that is what it is."""
    got, shape = tuple(data.input_shape), tuple(shape)
    if got == shape:
        return
    hint = ""
    if len(got) == len(shape) == 3 and got == (*shape[1:], shape[0]):
        hint = "; the data looks channels-last (N, H, W, C): transpose it to (N, C, H, W) with x.transpose(0, 3, 1, 2)"
    raise BadData(f"dataset {data.name!r} has samples of shape {got}, {model} takes {shape}{hint}")


def _features(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise BadData(f"{what}: features are {x.dtype}, not numbers; encode them as floats first")
    return x.astype(np.float32)


def _labels(y, what: str) -> np.ndarray:
    """Class indices 0..C-1, one per sample: one-hot rows and fractional values are refused."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        raise BadData(f"{what}: labels have shape {y.shape}, one-hot or scores; give class indices (y.argmax(1))")
    y = y.reshape(len(y)) if y.ndim == 2 else y
    if y.ndim != 1 or y.dtype.kind not in "biuf":
        raise BadData(f"{what}: labels must be a 1-D array of class indices, got {y.dtype} of shape {y.shape}")
    if y.dtype.kind == "f" and (not np.isfinite(y).all() or (y != np.round(y)).any()):
        raise BadData(f"{what}: labels must be whole class indices 0..C-1, found fractional or NaN values "
                      f"(e.g. {y[~np.isfinite(y) | (y != np.round(y))][:3].tolist()})")
    return y.astype(np.int64)


def _check(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if len(x) == 0:
        raise BadData(f"{what}: no samples")
    if x.ndim < 2 or len(x) != len(y):
        raise BadData(f"{what}: features must have shape (N, ...) with one label per row, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise BadData(f"{what}: features contain NaN or infinite values; clean or impute them first")


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    label_column: str | None = None,
) -> Dataset:
    """Load a dataset by name (see NAMES) or from a .npz/.csv path, split deterministically by seed.

    The test split is the official one where the data has one, else a stratified 20% by seed; a
    stratified `val_fraction` of the rest is held out for early stopping and model selection.
    """
    path = None
    if name.endswith(".npz") or name.endswith(".csv"):
        path, name = Path(name), name.rsplit(".", 1)[1]
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        xtv, ytv, xte, yte, info = _load_raw(name, data_dir, path, label_column, seed)
    except UserError:
        raise
    except Exception as e:  # a corrupted archive, a malformed text file: whatever its parser raises
        where = path or data_dir / name
        raise BadData(f"cannot read dataset {name!r} from {where} ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no detail'}); "
                      "the file is corrupted or not in the expected format (re-download or re-export it)") from None
    if label_column:
        info["label_column"] = label_column
    return from_arrays(name, xtv, ytv, xte, yte, info, seed, val_fraction)


def from_arrays(name: str, xtv: np.ndarray, ytv: np.ndarray | None, xte: np.ndarray, yte: np.ndarray | None,
                info: dict | None = None, seed: int = 0, val_fraction: float = 0.1) -> Dataset:
    """A Dataset from train and test arrays (features (N, ...), labels 0..C-1, or None for both
    when unlabelled): a stratified `val_fraction` of the training rows is held out (a random one
    when unlabelled), the normalisation statistics fitted on the rest."""
    xtv, xte = _features(xtv, f"dataset {name!r} (train)"), _features(xte, f"dataset {name!r} (test)")
    if ytv is None or yte is None:
        if ytv is not None or yte is not None:
            raise UserError(f"dataset {name!r}: labels for one split only; give both or neither")
        for x, what in ((xtv, "train"), (xte, "test")):
            _check(x, np.zeros(len(x)), f"dataset {name!r} ({what})")
        if xtv.shape[1:] != xte.shape[1:]:
            raise UserError(f"dataset {name!r}: train features {xtv.shape[1:]} and test features {xte.shape[1:]} differ in shape")
        order = np.random.default_rng(seed + 1).permutation(len(xtv))
        n_val = int(round(len(xtv) * val_fraction)) if len(xtv) > 1 else 0
        va, tr = np.sort(order[:n_val]), np.sort(order[n_val:])
        mean, std = _moments(xtv[tr])
        info = {**(info or {}), "seed": seed, "val_fraction": val_fraction}
        return Dataset(name, xtv[tr], None, xtv[va], None, xte, None, 0, mean, std, info)
    ytv, yte = _labels(ytv, f"dataset {name!r} (train)"), _labels(yte, f"dataset {name!r} (test)")
    _check(xtv, ytv, f"dataset {name!r} (train)")
    _check(xte, yte, f"dataset {name!r} (test)")
    if xtv.shape[1:] != xte.shape[1:]:
        raise UserError(f"dataset {name!r}: train features {xtv.shape[1:]} and test features {xte.shape[1:]} differ in shape")
    classes = np.unique(np.concatenate([ytv, yte]))
    if classes.min() < 0:
        raise UserError(f"dataset {name!r}: labels must be 0..C-1, found {classes.min()}")
    num_classes = int(classes.max()) + 1
    tr, va = _stratified_split(ytv, val_fraction, np.random.default_rng(seed + 1))
    xtr, ytr, xva, yva = xtv[tr], ytv[tr], xtv[va], ytv[va]
    mean, std = _moments(xtr)
    info = {**(info or {}), "seed": seed, "val_fraction": val_fraction}
    return Dataset(name, xtr, ytr, xva, yva, xte, yte, num_classes, mean, std, info)


def _moments(xtr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalisation from the training split only: per feature for vectors, per channel for images."""
    axes = (0,) if xtr.ndim == 2 else (0, *range(2, xtr.ndim))
    mean = xtr.mean(axis=axes, keepdims=True)[0].astype(np.float32)
    std = xtr.std(axis=axes, keepdims=True)[0].astype(np.float32)
    return mean, np.where(std < 1e-6, 1.0, std).astype(np.float32)
