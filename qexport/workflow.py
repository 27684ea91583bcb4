"""The steps the CLI commands share: load the data, get the float model (a qexport checkpoint, a
user's factory with their weights, or a zoo model trained here). Used by the CLI and benchmarks."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch import nn

from qadmm.errors import UserError


def default_epochs(dataset_name: str) -> int:
    return {"seeds": 300, "pendigits": 150, "digits": 100}.get(dataset_name, 30)


def user_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A user's model from `module:factory` (importable, or a module in the current directory) or
    `path/to/file.py:factory`; the factory is called with input_shape= and num_classes= when it
    takes them, else with no arguments. Only ever called for code the user names on the command
    line: nothing read from a file is imported."""
    target, _, fn_name = spec.rpartition(":")
    if not target or not fn_name:
        raise UserError(f"--model {spec!r}: write module:factory or path/to/file.py:factory")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UserError(f"--model {spec!r}: file {path} not found")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules.setdefault(path.stem, module)
            mod_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # `mycnn:make` from the current directory, as `python -m` would
            module = importlib.import_module(target)
        fn = getattr(module, fn_name)
    except UserError:
        raise
    except Exception as e:  # ImportError, SyntaxError, or anything the module raises while it runs
        raise UserError(f"cannot load model factory {spec!r}: {type(e).__name__}: {_first_line(e)} "
                        "(fix the module, or name it as module:factory or path/to/file.py:factory)") from None
    if not callable(fn):
        raise UserError(f"--model {spec!r}: {fn_name} is a {type(fn).__name__}, not a function or class")
    try:
        try:  # unlabelled data (num_classes 0) says nothing about the output: the factory's default
            model = fn(input_shape=input_shape, **({"num_classes": num_classes} if num_classes else {}))
        except TypeError:
            model = fn()
    except Exception as e:
        raise UserError(f"model factory {spec!r} raised {type(e).__name__}: {_first_line(e)} (fix the factory; it is "
                        f"called with input_shape={tuple(input_shape)}, num_classes={num_classes} when it takes them)") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def unwrap_state(state: dict, model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """A state_dict as people save them: `{'state_dict': ...}` / `{'model': ...}` wrappers and the
    `module.` prefix of DataParallel are removed; key mismatches are named in full."""
    for key in ("state_dict", "model_state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    want = set(model.state_dict())
    if not want & set(state) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{where} holds non-tensor entries {[k for k, v in state.items() if not isinstance(v, torch.Tensor)][:4]}: "
                        "save model.state_dict()")
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    shapes = {k: (tuple(v.shape), tuple(model.state_dict()[k].shape)) for k, v in state.items()
              if k in want and tuple(v.shape) != tuple(model.state_dict()[k].shape)}
    if missing or unexpected or shapes:
        parts = [f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}" if missing else "",
                 f"unexpected {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}" if unexpected else "",
                 "shape " + ", ".join(f"{k} {a} vs model {b}" for k, (a, b) in list(shapes.items())[:4]) if shapes else ""]
        raise UserError(f"{where} does not fit the model: {'; '.join(p for p in parts if p)}")
    return state


def float_model(data, model_name: str | None, checkpoint: str | None, seed: int, epochs: int | None, lr: float,
                batch_size: int, patience: int, progress: bool, normalize=None):
    """The float model to quantize: a qexport checkpoint, a user's factory + state_dict, or a zoo
    model trained here. Returns (model, model name, float-model info). A user's model gets no
    normalisation here: `normalize` (none | fit | MEAN,STD) is applied by `qexport.api.quantize`,
    or, when the model is trained here, before training."""
    from qadmm.data import check_input_shape
    from qadmm.train import TrainConfig, accuracy, seed_everything, train_epochs
    from qadmm.zoo import NAMES, build_model, default_model
    from qexport import api
    from qexport.checkpoint import check_finite, load_checkpoint, load_user_state
    from qexport.provenance import is_user_model

    user = is_user_model(model_name)
    if checkpoint and not user:
        model, meta = load_checkpoint(checkpoint)
        arch = meta["architecture"]
        check_input_shape(data, tuple(arch["input_shape"]), f"checkpoint {checkpoint}")
        if arch["num_classes"] < data.num_classes:
            raise UserError(f"checkpoint {checkpoint} has {arch['num_classes']} classes, but dataset {data.name!r} has "
                            f"labels up to {data.num_classes - 1}")
        return model, arch["model"], {"checkpoint": str(checkpoint), **meta.get("training", {})}
    name = model_name or default_model(data.name, data.input_shape)
    seed_everything(seed)
    if user:
        from qexport.graph import trace

        model = user_model(name, data.input_shape, data.num_classes)
        trace(model, data.input_shape)  # an unsupported op is refused before any loading or training
        if checkpoint:
            state = check_finite(unwrap_state(load_user_state(checkpoint), model, f"checkpoint {checkpoint}"), str(checkpoint))
            model.load_state_dict(state)
            return model.eval(), name, {"checkpoint": str(checkpoint), "factory": name}
        if not data.labelled:
            raise UserError(f"dataset {data.name!r} has no labels, so the model cannot be trained here: pass its trained "
                            "weights with --checkpoint")
        model = api.with_normalization(model, api.normalization(normalize, data))
    elif not data.labelled:
        raise UserError(f"dataset {data.name!r} has no labels: qexport's own models train on labels; quantize your "
                        "trained model with --model FILE.py:FACTORY --checkpoint WEIGHTS")
    elif name not in NAMES:
        raise UserError(f"unknown model {name!r}: use one of {', '.join(NAMES)}, module:factory or path/to/file.py:factory")
    else:
        model = build_model(name, data.input_shape, data.num_classes, data.mean, data.std)
    cfg = TrainConfig(epochs=epochs or default_epochs(data.name), lr=lr, batch_size=batch_size, patience=patience, seed=seed)
    t0 = time.perf_counter()
    res = train_epochs(model, data, cfg, desc=f"train float {name}", progress=progress)
    info = {"epochs": cfg.epochs, "epochs_run": res.epochs_run, "best_epoch": res.best_epoch, "lr": cfg.lr,
            "batch_size": cfg.batch_size, "patience": cfg.patience, "optimizer": "adam+cosine", "seed": seed,
            "val_acc": res.best_val, "seconds": round(time.perf_counter() - t0, 2)}
    info["test_acc"] = accuracy(model, data.x_test, data.y_test)
    return model, name, info


def load_data(data_name: str, data_dir: str | None, seed: int, label_column: str | None):
    from qadmm.data import load_dataset

    return load_dataset(data_name, data_dir, seed=seed, label_column=label_column)


def preprocessing(data) -> dict:
    """The record of a zoo model's built-in standardisation (fitted on the training split)."""
    from qexport.api import normalization

    return normalization("fit", data)
