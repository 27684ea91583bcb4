"""The steps every command shares: load the data, get the float model (checkpoint or trained here),
describe the preprocessing. Used by the CLI and the benchmarks alike."""
from __future__ import annotations

import time

from qadmm.errors import UserError


def default_epochs(dataset_name: str) -> int:
    return {"seeds": 300, "pendigits": 150, "digits": 100}.get(dataset_name, 30)


def float_model(data, model_name: str | None, checkpoint: str | None, seed: int, epochs: int | None, lr: float,
                batch_size: int, patience: int, progress: bool):
    """The float model to quantize: a qexport checkpoint, a user's factory + state_dict, or a zoo
    model trained here. Returns (model, architecture dict, float-training info)."""
    from qadmm.train import TrainConfig, accuracy, seed_everything, train_epochs
    from qadmm.zoo import build_model, default_model
    from qexport.checkpoint import load_checkpoint, load_user_state

    if checkpoint and not (model_name and ":" in model_name):
        model, meta = load_checkpoint(checkpoint)
        arch = meta["architecture"]
        if tuple(arch["input_shape"]) != data.input_shape or arch["num_classes"] != data.num_classes:
            raise UserError(f"checkpoint {checkpoint} was trained for input {tuple(arch['input_shape'])} with "
                            f"{arch['num_classes']} classes, but dataset {data.name!r} has {data.input_shape} and {data.num_classes}")
        return model, arch, {"checkpoint": str(checkpoint), **meta.get("training", {})}
    name = model_name or default_model(data.name, data.input_shape)
    seed_everything(seed)
    model = build_model(name, data.input_shape, data.num_classes, data.mean, data.std)
    arch = {"model": name, "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    if checkpoint:
        state = load_user_state(checkpoint)
        try:
            model.body.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"checkpoint {checkpoint} does not fit model {name}: {str(e).splitlines()[0]}") from None
        return model, arch, {"checkpoint": str(checkpoint)}
    cfg = TrainConfig(epochs=epochs or default_epochs(data.name), lr=lr, batch_size=batch_size, patience=patience, seed=seed)
    t0 = time.time()
    res = train_epochs(model, data, cfg, desc=f"train float {name}", progress=progress)
    info = {"epochs": cfg.epochs, "epochs_run": res.epochs_run, "best_epoch": res.best_epoch, "lr": cfg.lr,
            "batch_size": cfg.batch_size, "patience": cfg.patience, "optimizer": "adam+cosine", "seed": seed,
            "val_acc": res.best_val, "seconds": round(time.time() - t0, 2)}
    info["test_acc"] = accuracy(model, data.x_test, data.y_test)
    return model, arch, info


def load_data(data_name: str, data_dir: str | None, seed: int, label_column: str | None):
    from qadmm.data import load_dataset

    return load_dataset(data_name, data_dir, seed=seed, label_column=label_column)


def preprocessing(data) -> dict:
    return {"type": "standardize", "mean": data.mean.tolist(), "std": data.std.tolist(), "fitted_on": "train split"}
