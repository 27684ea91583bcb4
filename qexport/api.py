"""The Python API: a float model in, a self-contained artifact out, then ONNX and its check.

    import qexport
    art = qexport.quantize(model, data, method="gptq", bits=4, per_channel=True)
    art.save("model.qx.safetensors")
    qexport.to_onnx(art, "model.onnx", form="qoperator", calib_data=data)
    report = qexport.verify("model.onnx", art, data)

`data` is a `qadmm.data.Dataset` (`qexport.load_data("digits")`, ...) or `(x_train, y_train,
x_test, y_test)` arrays. The CLI calls these same functions; the metadata every file records
(method, bits, hyperparameters, data, seed, versions, graph) is built here and nowhere else.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from qadmm import methods
from qadmm.data import Dataset, from_arrays
from qadmm.errors import UserError
from qadmm.spec import QuantSpec
from qadmm.train import accuracy, agreement, predict, top1
from qadmm.zoo import Normalize
from qexport.artifact import Artifact, load_artifact
from qexport.config import Config, config
from qexport.graph import rebuilt, trace
from qexport.provenance import Provenance, stamp
from qexport.mixed import Budget, search
from qexport.ops.base import OUTPUT

DEFAULT_METHOD = "lq"


def as_dataset(data: Any, seed: int = 0) -> Dataset:
    """A Dataset; (x_train, y_train, x_test, y_test) arrays, split into train/val by `seed`; or
    unlabelled inputs: (x_train, x_test), or one array x of which 20% (by `seed`) is held out to
    compare the quantized model with the float one."""
    if isinstance(data, Dataset):
        return data

    def arr(d: Any) -> np.ndarray:
        return d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d)

    info = {"source": "arrays given to qexport"}
    if isinstance(data, (tuple, list)) and len(data) == 4:
        return from_arrays("arrays", *(arr(d) for d in data), info=info, seed=seed)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return from_arrays("arrays", arr(data[0]), None, arr(data[1]), None, info=info, seed=seed)
    if isinstance(data, (np.ndarray, torch.Tensor)) and arr(data).ndim >= 2:
        x = arr(data)
        order = np.random.default_rng(seed).permutation(len(x))
        cut = len(x) - max(1, int(round(0.2 * len(x))))
        return from_arrays("arrays", x[np.sort(order[:cut])], None, x[np.sort(order[cut:])], None,
                           info={**info, "split": "unlabelled, 80/20 by seed"}, seed=seed)
    raise UserError(f"data must be a qadmm Dataset, (x_train, y_train, x_test, y_test) arrays, or unlabelled inputs "
                    f"(x_train, x_test) or x, got {type(data).__name__}")


def normalization(spec: str | Sequence | None, data: Dataset) -> dict:
    """What `normalize` asks for, as recorded in the artifact: none, fit (mean/std of the training
    split, per channel for images), or given "MEAN,STD" / (mean, std)."""
    if spec in (None, "none"):
        return {"type": "none"}
    if spec == "fit":
        return {"type": "standardize", "mean": data.mean.tolist(), "std": data.std.tolist(), "fitted_on": "train split"}
    if isinstance(spec, str):
        try:
            mean, std = (float(v) for v in spec.split(","))
        except ValueError:
            raise UserError(f"--normalize {spec!r}: use none, fit, or MEAN,STD (e.g. 0.1307,0.3081)") from None
    else:
        mean, std = spec
    if not np.all(np.asarray(std, np.float64) > 0):
        raise UserError(f"normalize: std must be positive, got {std}")
    return {"type": "standardize", "mean": np.asarray(mean, np.float32).tolist(), "std": np.asarray(std, np.float32).tolist(),
            "fitted_on": "given"}


def with_normalization(model: nn.Module, pre: dict) -> nn.Module:
    """The model behind Normalize(mean, std) when asked (its layers are then named body.<name>)."""
    if pre["type"] == "none":
        return model
    return nn.Sequential(OrderedDict(normalize=Normalize(np.asarray(pre["mean"]), np.asarray(pre["std"])), body=model))


def quantize(model: nn.Module, data: Any, method: "str | Config" = DEFAULT_METHOD, bits: int | None = None, *,
             normalize: str | Sequence | None = None, budget: Budget | None = None, progress: bool = False,
             provenance: Provenance | None = None, **request_kw: Any) -> Artifact:
    """Quantize a trained float model's weights; the artifact, in memory (`art.save(path)` writes it).

    `method` is a typed request, `qexport.GPTQ(bits=4, per_channel=True, damp=0.01)` (`qexport.config`),
    or a back-end's name with the request as keywords, which make the same request:
    `quantize(model, data, "gptq", 4, per_channel=True, damp=0.01)` (bits; the spec's fields:
    scheme, per_channel, layer_bits (layer-name patterns to widths), exclude (patterns left float),
    keep_first/last, calib_samples, bn_reestimate, bias_correction, seed, device; the method's
    hyperparameters, or `params=` its Params dataclass or a dict). `normalize` puts (x - mean)/std in
    front of the model ("fit" on the training split, or (mean, std)); None adds nothing. `budget`
    (`qexport.Budget(size_bytes=, avg_bits=, max_drop=, ...)`) chooses a width per layer under it and
    measures (`qexport.mixed.search`); the request's bits are then unused. `provenance` names the model,
    its float training and the command for the artifact's metadata. The model is captured first, so
    what cannot be exported is refused before any work; the caller's model is not modified."""
    if isinstance(method, Config):
        if bits is not None or request_kw:
            given = ["bits"] * (bits is not None) + sorted(request_kw)
            raise UserError(f"quantize: {', '.join(given)} given beside a {method.method} config: put them in the config")
        request = method
    else:
        request = config(method, **({"bits": bits} if bits is not None else {}), **request_kw)
    method, spec = request.method, dataclasses.replace(request.spec, progress=progress)
    provenance = provenance or Provenance()
    seed = spec.seed
    data = as_dataset(data, seed)
    pre = normalization(normalize, data)
    model = with_normalization(copy.deepcopy(model), pre).eval()
    graph = trace(model, data.input_shape)  # refuses unsupported ops now, not after minutes of work
    _check_output(graph, data)
    if not data.labelled and not methods.calibration_only(method):
        raise UserError(f"method {method!r} trains on labels, and dataset {data.name!r} has none: use ptq, gptq or ldnq, "
                        "which need only inputs")
    first = graph.ops[0]
    if pre["type"] == "none" and first.kind == "normalize" and first.inputs == ["input"]:  # a zoo model's own
        pre = {"type": "standardize", "mean": first.module.mean.tolist(), "std": first.module.std.tolist(),
               "fitted_on": "inside the model (train split)"}
    t0 = time.perf_counter()
    # a torch.export capture is quantized as the graph (every layer a module call, in forward order); so is any
    # capture by a calibration-only back-end, whose layer walk then runs the images through once, not once per layer
    rebuild = graph.source != "torch.fx" or methods.calibration_only(method)
    work = rebuilt(graph, model) if rebuild else model
    mixed = None
    if budget is not None:
        result, spec, mixed = search(work, data, spec, budget, method, lambda s: methods.run(method, work, data, s))
    else:
        result = methods.run(method, work, data, spec)  # checked once, when the request was made
    seconds = time.perf_counter() - t0
    return _artifact(model, graph, data, method, spec, result, seconds, pre, provenance,
                     {"mixed_precision": mixed} if mixed else {})


def _artifact(model: nn.Module, graph, data: Dataset, method: str, spec: QuantSpec, result, seconds: float, pre: dict,
              provenance: Provenance, extra: dict) -> Artifact:
    """The artifact of `result` (quantized from the float `model`, captured as `graph`): the one place
    its metadata is built (what produced it, how well it does against the float model)."""
    out_shape = graph.shapes.get(OUTPUT, [])
    classifier = data.labelled
    x_test = torch.as_tensor(data.x_test)
    float_out, q_out = predict(model, x_test), predict(result.model, x_test)  # once each: accuracy and agreement
    float_acc = top1(float_out, data.y_test) if classifier else None
    q_acc = top1(q_out, data.y_test) if classifier else None
    agree = agreement(float_out, q_out, classifier and len(out_shape) == 1)
    meta = {
        "architecture": {"model": provenance.model_name or type(model).__name__, "input_shape": list(data.input_shape),
                         **({"num_classes": out_shape[0]} if classifier else {}), "output_shape": list(out_shape),
                         "capture": graph.source},
        "preprocessing": pre,
        "dataset": data.describe(),
        "float_training": dict(provenance.float_training),
        "method": {"name": method, "params": result.params, "seconds": round(seconds, 2)},
        "spec": spec.to_json(),
        "recalibration": result.recalibration,
        "history": result.history,
        "accuracy": {"float_test": float_acc, "quantized_test": q_acc,
                     "quantized_val": accuracy(result.model, data.x_val, data.y_val) if classifier else None},
        "agreement": agree,
        **extra,
    }
    return Artifact.create(result.model, result.layers, stamp(meta, provenance.command), graph)


def _check_output(graph, data: Dataset) -> None:
    out_shape = graph.shapes.get(OUTPUT, [])
    if data.labelled and (len(out_shape) != 1 or out_shape[0] < data.num_classes):
        raise UserError(f"the model outputs {tuple(out_shape)} per sample, but dataset {data.name!r} has labels 0..{data.num_classes - 1}: "
                        "labelled data needs one score per class; for another output (embeddings, maps, a backbone) "
                        "give unlabelled inputs (an .npz with just x, or arrays x)")


def prepare(model: nn.Module, method: str, bits: int = 4, *, steps: int, input_shape: Sequence[int], scheme: str | None = None,
            per_channel: bool = False, layer_bits: dict[str, int] | None = None, exclude: Sequence[str] = (),
            keep_first: bool = False, keep_last: bool = False, params: Any = None, seed: int = 0) -> nn.Module:
    """Quantization-aware training in your own loop (`qadmm.qat`): `model`, in place, with its layers
    wrapped for `method` (ste, admm-q, proxquant, md-tanh, md-softmax, askewsgd) over `steps` optimiser
    steps. The model is captured first (`input_shape`, one sample's), so what qexport cannot export is
    refused before you train. Then `qexport.optimizer(model, your_optimizer)`, your loop, and
    `qexport.convert(model, data)`."""
    from qadmm import qat

    spec = config(method, bits=bits, scheme=scheme, per_channel=per_channel, keep_first=keep_first, keep_last=keep_last,
                  seed=seed, params=params, progress=False, layer_bits=dict(layer_bits or {}), exclude=tuple(exclude)).spec
    qat.check_unprepared(model)
    was_training = model.training
    trace(model.eval(), tuple(input_shape))  # refuses what cannot be exported now, not after training
    model.train(was_training)
    return qat.prepare(model, method, spec, steps)


def optimizer(model: nn.Module, opt: torch.optim.Optimizer):
    """Your optimiser, built over `model.parameters()` after `prepare`, with the method's steps hooked
    around each `step()` (schedules, projections, ADMM-Q's penalty gradient); the same object."""
    from qadmm import qat

    return qat.optimizer(model, opt)


def convert(model: nn.Module, data: Any, *, calib_samples: int = 2048, provenance: Provenance | None = None) -> Artifact:
    """The artifact of a model trained after `prepare` (in place it becomes a plain float model again):
    its weights projected onto the codes, BatchNorm re-estimated as the method asks, on `data`
    (a Dataset or arrays, as `quantize` takes them; its test split measures the result)."""
    from qadmm import qat

    float_model, result, st = qat.convert(model)
    data = as_dataset(data, st.spec.seed)
    spec = dataclasses.replace(st.spec, calib_samples=calib_samples)
    float_model, result.model = float_model.cpu().eval(), result.model.cpu()
    graph = trace(float_model, data.input_shape)
    _check_output(graph, data)
    result = methods.finish(st.method, float_model, result, data, spec)
    return _artifact(float_model, graph, data, st.method, spec, result, 0.0, {"type": "none"}, provenance or Provenance(),
                     {"training_loop": "the user's (qexport.prepare / optimizer / convert)"})


@dataclass
class Analysis:
    """What `analyze` measured: each layer alone at each width, and (for a quantized model) the
    layers along the network."""

    sensitivity: Any  # qadmm.sensitivity.Sensitivity
    along: tuple | None = None  # (metric, float metric, [AlongLayer]) for a quantized model
    quantized_metric: float | None = None  # that quantized model's own metric on the same samples

    def to_json(self) -> dict:
        out = self.sensitivity.to_json()
        if self.along is not None:
            metric, float_metric, steps = self.along
            num = (lambda v: v if np.isfinite(v) else None)  # noqa: E731
            out["along"] = {"metric": metric, "float_metric": float_metric, "quantized_metric": self.quantized_metric,
                            "layers": [{"name": s.name, "sqnr_db": num(s.sqnr_db), "alone": s.alone, "cumulative": s.cumulative}
                                       for s in steps]}
        return out


def analyze(model: nn.Module, data: Any, bits: Sequence[int] = (8, 4, 3, 2, 1), *, per_channel: bool = True,
            method: str = "ptq", artifact: Artifact | None = None, calib_samples: int = 512, eval_samples: int | None = 2000,
            seed: int = 0, progress: bool = False) -> Analysis:
    """Which layer hurts: each quantizable layer of the float `model` quantized alone at each width
    (`qadmm.sensitivity.sensitivity`), rounded as `method` rounds one layer (ptq: its nearest fit; gptq,
    ldnq: their layer solvers, default hyperparameters); with `artifact` (quantized from this model),
    also its layers put into the float model one at a time and cumulatively (`qadmm.sensitivity.along`)."""
    from qadmm.sensitivity import along, sensitivity

    solve = methods.layer_solver(method, QuantSpec(bits=max(bits), per_channel=per_channel, seed=seed))
    if solve is None and method != "ptq":
        walkers = [n for n, m in methods.METHODS.items() if m.layer_solver is not None]
        raise UserError(f"analyze rounds each layer alone as ptq or a layer-by-layer method does ({', '.join(['ptq', *walkers])}); "
                        f"{method!r} trains the whole network: analyze with ptq, then quantize with {method}")
    data = as_dataset(data, seed)
    model = copy.deepcopy(model).eval()
    sens = sensitivity(model, data, list(bits), per_channel, calib_samples, eval_samples, seed, progress=progress, solve=solve,
                       rounding=method)
    if artifact is None:
        return Analysis(sens)
    modules = dict(artifact.model.named_modules())
    replaced = {n: {k: getattr(modules[n], k).detach() for k in ("weight", "bias") if getattr(modules[n], k, None) is not None}
                for n in artifact.layers}
    path = along(model, replaced, data, calib_samples, eval_samples, seed, progress)
    x = data.x_test[:eval_samples]
    if data.labelled:
        quantized = round(accuracy(artifact.model, x, data.y_test[:eval_samples]), 3)
    else:
        a = agreement(predict(model, x), predict(artifact.model, x), path[0] == "top1 agreement")
        quantized = a["top1_agreement"] if path[0] == "top1 agreement" else a["sqnr_db"]
    return Analysis(sens, path, quantized)


def load(path: str | Path) -> Artifact:
    """An artifact from disk (checked: format, version, content hash, graph); no code is imported."""
    return load_artifact(path)


def to_onnx(art: Artifact, path: str | Path | None = None, form: str = "qdq", calib_data: Any = None,
            opset: int | None = None, calibration: str = "minmax", percentile: float = 99.99,
            calib_batches: int = 8, calib_batch_size: int = 64, progress: bool = False, dequant: str = "cast"):
    """The ONNX ModelProto of `art` in `form` (weights | qdq | qoperator), written to `path` when
    given. Integer forms calibrate activation ranges on `calib_data`'s training split; `dequant`
    (weights form): `cast` (fp32 speed in onnxruntime's defaults) or `dequantizelinear`."""
    import onnx

    from qexport.fileio import atomic_path, check_output_path
    from qexport.onnx.export import export_onnx
    from qexport.onnx.calibrate import CalibConfig
    from qexport.onnx.forms import get_form

    integer = get_form(form).integer
    if path is not None:
        check_output_path(path)
    x_calib, cfg = None, None
    if integer:
        if calib_data is None:
            raise UserError(f"form {form!r} calibrates activation ranges: pass calib_data (a Dataset or arrays)")
        data = as_dataset(calib_data)
        x_calib = data.x_train
        cfg = CalibConfig(calibration, percentile, calib_batches, calib_batch_size, data.info.get("seed", 0))
    model = export_onnx(art, form, x_calib, cfg, progress=progress, opset=opset, dequant=dequant)
    if path is not None:
        with atomic_path(path) as tmp:
            onnx.save(model, str(tmp))
    return model


def to_c(art: Artifact, folder: str | Path | None = None, calib_data: Any = None, calibration: str = "minmax",
         percentile: float = 99.99, calib_batches: int = 8, calib_batch_size: int = 64, progress: bool = False):
    """Integer C99 sources of `art` (`qexport.pack.c_integer`): activation ranges calibrated on
    `calib_data`'s training split exactly as `to_onnx` calibrates its integer forms. Written into
    `folder` when given; returns the `CModel` (files, flash and RAM bytes)."""
    from qexport.graph import fuse
    from qexport.onnx.calibrate import CalibConfig, calibrate
    from qexport.pack.c_export import write_sources
    from qexport.pack.c_integer import integer_c
    from qexport.pack.packfile import pack_artifact

    if calib_data is None:
        raise UserError("to_c calibrates activation ranges: pass calib_data (a Dataset or arrays)")
    data = as_dataset(calib_data)
    cfg = CalibConfig(calibration, percentile, calib_batches, calib_batch_size, data.info.get("seed", 0))
    from qexport.onnx.integer_graph import check_int8
    from qexport.pack.c_integer import check_c

    check_int8(art)  # refuse before spending time on calibration
    packed = pack_artifact(art)
    check_c(art, packed)
    qp = calibrate(fuse(art.graph), data.x_train, cfg, progress)
    cm = integer_c(art, packed, qp, cfg.describe())
    if folder is not None:
        write_sources(cm.files, folder)
    return cm


def verify(onnx_path: str | Path, art: Artifact, data: Any, max_samples: int | None = None, tol=None) -> dict:
    """onnxruntime against the exact PyTorch reference of `art` on `data`'s test split; the report
    (`report["passed"]`). `onnx_path` may also be a folder written by `to_c`: its C, built with the
    host compiler, against the integer reference and onnxruntime (0 differing outputs to pass)."""
    from qexport.onnx.verify import verify as run_verify

    d = as_dataset(data)
    if Path(onnx_path).is_dir():
        from qexport.pack.c_integer import verify_folder

        return verify_folder(onnx_path, art, d.x_test[:max_samples], d.y_test[:max_samples] if d.labelled else None)
    return run_verify(str(onnx_path), art, d.x_test[:max_samples], d.y_test[:max_samples] if d.labelled else None, tol)
