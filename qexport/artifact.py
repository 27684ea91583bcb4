"""The quantized-model artifact: one safetensors file, loaded without executing code.

Tensors:  ``codes/<layer>`` int8 (int16 for the thesis scheme at 8 bits), ``scale/<layer>``
float32 (shape () or (C_out,)), ``float/<name>`` every float parameter and buffer that is not a
quantized weight (biases, BatchNorm, kept layers, the input normalisation).
Metadata: ``format``, ``version`` and ``qexport`` (JSON: the traced graph, architecture,
preprocessing, per-layer code sets, method and hyperparameters, dataset and seed, accuracies,
versions), and ``content_sha256`` over all tensors and that JSON.

The graph (`qexport.graph`) makes the file self-contained: loading rebuilds the model from it and
never imports or calls anything the file names. Version 1 files (no graph) load for zoo models.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from qadmm.codes import CodeSet
from qadmm.errors import BadFile, UserError
from qadmm.spec import LayerCodes
from qadmm.zoo import NAMES, Normalize, build_model
from qexport.fileio import atomic_path, read_header, read_safetensors
from qexport.graph import Graph, GraphModel, evaluate
from qexport.ops.base import OUTPUT

FORMAT = "qexport-artifact"
VERSION = 3  # the newest this qexport reads and writes; 3: graphs with `aten` ops and folded constants


@dataclass
class Artifact:
    """A loaded artifact: the fake-quant reference model (W = α·Q exactly), codes and metadata."""

    model: nn.Module
    layers: dict[str, LayerCodes]
    meta: dict[str, Any]
    sha256: str
    graph: Graph  # the traced graph, bound to `model`

    @classmethod
    def create(cls, model: nn.Module, layers: dict[str, LayerCodes], meta: dict[str, Any], graph: Graph) -> "Artifact":
        """The artifact exactly as `save` writes and `load_artifact` reads it back (same model,
        same content hash), from a quantized model, its codes, metadata and traced graph."""
        tensors, meta_json, full = pack_tensors(model, layers, meta, graph)
        floats = {k[len("float/"):]: v for k, v in tensors.items() if k.startswith("float/")}
        kept = {name: layers[name] for name in full["layers"]}
        ref = reference_model(full, floats, kept, "artifact")
        return cls(ref, kept, full, content_hash(tensors, meta_json), ref.graph)

    def save(self, path: str | Path) -> str:
        """Write the artifact (atomically); returns its content hash."""
        meta = {k: v for k, v in self.meta.items() if k not in ("graph", "layers")}
        return save_artifact(path, self.model, self.layers, meta, self.graph)

    def sizes(self) -> dict[str, int]:
        """Bytes of the deployed model (codes at their storage bits, one fp32 α per scale, every
        other parameter and buffer fp32) and of the same model in fp32."""
        state = self.model.state_dict()
        codes = sum(-(-lc.q.numel() * lc.codes.storage_bits // 8) + 4 * lc.alpha.numel() for lc in self.layers.values())
        floats = sum(v.numel() for k, v in state.items() if not (k.endswith(".weight") and k[:-7] in self.layers))
        return {"model_bytes": codes + 4 * floats, "float_bytes": 4 * sum(v.numel() for v in state.values())}

    @property
    def bits_summary(self) -> str:
        sets = {(lc.codes.scheme, lc.codes.bits) for lc in self.layers.values()}
        return ", ".join(f"{s} {b}-bit" for s, b in sorted(sets)) or "no quantized layers"


def content_hash(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    h.update(meta_json.encode())
    return h.hexdigest()


MAX_INPUT_VALUES = 1 << 24  # per sample (a 3×2048×2048 image fits); more is a forged or corrupted shape
QUANTIZED_KINDS = ("linear", "conv")
# Provenance entries the commands read, and the JSON type each must have.
PROVENANCE = {"preprocessing": dict, "dataset": dict, "method": dict, "spec": dict, "accuracy": dict, "history": list,
              "recalibration": dict, "versions": dict, "float_training": dict, "training": dict}


def _positive_ints(v: Any, n: int | None = None) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(isinstance(s, int) and not isinstance(s, bool)
                                                                       and s > 0 for s in v)


def check_architecture(meta: Any, where: str) -> dict[str, Any]:
    """The metadata fields every loader relies on, checked: a JSON object whose architecture has a
    sane input shape and class count."""
    if not isinstance(meta, dict):
        raise BadFile(f"{where}: metadata is not a JSON object; the file is corrupted")
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or not _positive_ints(arch.get("input_shape")) \
            or not (_positive_ints([arch.get("num_classes")]) if "num_classes" in arch else _positive_ints(arch.get("output_shape"))) \
            or "output_shape" in arch and not isinstance(arch["output_shape"], list):
        raise BadFile(f"{where}: metadata 'architecture' lacks a valid input_shape and num_classes or output_shape; "
                      "the file is corrupted")
    if "output_shape" in arch and "num_classes" in arch and arch["output_shape"] != [arch["num_classes"]]:
        raise BadFile(f"{where}: metadata 'architecture' declares {arch['num_classes']} classes and output shape "
                      f"{arch['output_shape']}; the file is corrupted")
    if not isinstance(arch.get("model", ""), str):
        raise BadFile(f"{where}: metadata 'architecture.model' is not a name; the file is corrupted")
    for key, kind in PROVENANCE.items():
        if key in meta and not isinstance(meta[key], kind):
            raise BadFile(f"{where}: metadata {key!r} is not a JSON {'object' if kind is dict else 'list'}; the file is corrupted")
    method, acc, pre = meta.get("method", {}), meta.get("accuracy", {}), meta.get("preprocessing", {})
    if not isinstance(method.get("name", ""), str) or not isinstance(method.get("params", {}), dict) \
            or not all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in acc.values()):
        raise BadFile(f"{where}: metadata 'method' or 'accuracy' is malformed; the file is corrupted")
    if pre.get("type", "standardize") == "standardize" and ("mean" in pre or "std" in pre):
        try:
            mean, std = np.asarray(pre["mean"], np.float64), np.asarray(pre["std"], np.float64)
            ok = mean.shape == std.shape and np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise BadFile(f"{where}: metadata 'preprocessing' needs finite mean and positive std of one shape; the file is corrupted")
    if math.prod(arch["input_shape"]) > MAX_INPUT_VALUES:
        raise BadFile(f"{where}: declared input shape {arch['input_shape']} is absurd "
                      f"(over {MAX_INPUT_VALUES} values per sample); the file is corrupted or forged")
    return arch


def output_shape(arch: dict[str, Any]) -> list[int]:
    """The per-sample output shape an architecture declares ((num_classes,) for a classifier)."""
    return list(arch["output_shape"]) if "output_shape" in arch else [arch["num_classes"]]


def describe_output(arch: dict[str, Any]) -> str:
    return f"classes {arch['num_classes']}" if "num_classes" in arch else f"output {tuple(output_shape(arch))}"


def model_from_meta(meta: dict[str, Any], where: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """The float model a file describes with the file's tensors `state` loaded, from its stored
    graph (no code is imported) or, for a version-1 file without one, from the zoo name it records.
    Everything is checked before it is trusted: the graph's ops against the registry, every
    parameter's shape against `state` before anything of the declared size is allocated, and one
    forward pass on the declared input shape. Any failure is a BadFile naming `where`."""
    arch = check_architecture(meta, where)
    if "graph" not in meta and arch.get("model") not in NAMES:
        raise BadFile(f"{where} has no stored graph and names model {arch.get('model')!r}, which is not in qexport's "
                      f"zoo; qexport never imports code a file names: re-create the file with this qexport")

    def build() -> nn.Module:
        if "graph" in meta:
            graph = Graph.from_json(meta["graph"], where)
            if graph.input_shape != list(arch["input_shape"]):
                raise BadFile(f"{where}: the graph takes input {graph.input_shape}, the architecture says {arch['input_shape']}")
            return GraphModel(graph)
        pre = meta.get("preprocessing", {})
        return build_model(arch["model"], tuple(arch["input_shape"]), arch["num_classes"],
                           np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32))

    try:
        with torch.device("meta"):  # shapes only: a forged 10^12-weight layer allocates nothing
            skeleton = build()
        _check_state(skeleton.state_dict(), state, where)
        model = build()
        model.load_state_dict(state)
        model.eval()
        bad_std = [n for n, m in model.named_modules() if isinstance(m, Normalize) and not (m.std > 0).all()]
        if bad_std:  # a division by zero or a sign flip no preprocessing record could describe
            raise BadFile(f"{where}: the input normalisation {bad_std[0]} has a std that is not positive; the file is corrupted")
        x = torch.zeros(1, *arch["input_shape"])
        if isinstance(model, GraphModel):  # every value's shape from running the graph, not from the file
            vals = evaluate(model.graph.ops, x)
            model.graph.shapes = {k: list(v.shape[1:]) for k, v in vals.items()}
            out = vals[OUTPUT]
        else:
            with torch.no_grad():
                out = model(x)
    except UserError:
        raise
    except Exception as e:  # attributes of the wrong type or size: whatever the module constructors raise
        raise BadFile(f"{where}: the stored model does not build or run ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "the file is corrupted or was edited") from None
    if not torch.isfinite(out).all():  # e.g. a normalisation std or a BatchNorm variance of 0 or below
        raise BadFile(f"{where}: the stored model computes NaN or infinity on a zero input (a normalisation std or "
                      "BatchNorm variance that is zero or negative?); the file is corrupted or was edited")
    if list(out.shape) != [1, *output_shape(arch)]:
        raise BadFile(f"{where}: the stored model outputs {tuple(out.shape[1:])} per sample, the architecture declares "
                      f"{tuple(output_shape(arch))}; the file is corrupted or was edited")
    return model


def _check_state(want: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in set(want) & set(state)
                   if tuple(want[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"missing {', '.join(missing[:4])}" if missing else "", f"unexpected {', '.join(unexpected[:4])}" if unexpected else "",
                 f"wrong shape {', '.join(wrong[:4])}" if wrong else ""]
        raise BadFile(f"{where}: tensors do not match the stored model ({'; '.join(p for p in parts if p)}); the file is corrupted")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise BadFile(f"{where}: tensor(s) {', '.join(sorted(nonfinite)[:4])} hold NaN or infinite values; "
                      "the model it came from diverged or the file is corrupted")


def check_layer(name: str, lc: LayerCodes, where: str) -> None:
    """One quantized layer against its code set: integer codes of the stored dtype, every code in
    the set, scales float32, finite, positive, one per tensor or one per output channel."""
    at = f"{where}: layer {name}"
    if lc.q.dtype != lc.codes.storage_dtype:
        raise BadFile(f"{at}: codes are {lc.q.dtype}, {lc.codes.describe()} is stored as {lc.codes.storage_dtype}; the file is corrupted")
    if lc.q.dim() < 1 or not lc.codes.contains(lc.q):
        bad = sorted({int(v) for v in lc.q.flatten().unique()} - set(lc.codes.levels))[:4] if lc.q.numel() else []
        raise BadFile(f"{at}: codes {bad} lie outside {lc.codes.describe()}; the file is corrupted or forged")
    a = lc.alpha
    if a.dtype != torch.float32 or tuple(a.shape) not in ((), (lc.q.shape[0],)):
        raise BadFile(f"{at}: scale has shape {tuple(a.shape)} ({a.dtype}); expected float32 () or ({lc.q.shape[0]},)")
    if not (torch.isfinite(a) & (a > 0)).all():
        raise BadFile(f"{at}: scales must be finite and positive, found {a.flatten()[~(torch.isfinite(a.flatten()) & (a.flatten() > 0))][:3].tolist()}")


def reference_model(meta: dict[str, Any], floats: dict[str, torch.Tensor], layers: dict[str, LayerCodes],
                    where: str) -> nn.Module:
    """The fake-quant reference (W = α·Q exactly) from metadata, float tensors and codes, every
    part checked (`check_layer`, `model_from_meta`); a BadFile naming `where` when anything is off."""
    for name, lc in layers.items():
        check_layer(name, lc, where)
    graph = meta.get("graph")
    if isinstance(graph, dict) and isinstance(graph.get("ops"), list):
        kinds = {o["name"]: o.get("kind") for o in graph["ops"] if isinstance(o, dict) and isinstance(o.get("name"), str)}
        odd = [n for n in layers if kinds.get(n) not in QUANTIZED_KINDS]
        if odd:
            raise BadFile(f"{where}: codes for {', '.join(odd[:3])}, which is not a Linear/Conv layer of the stored graph; "
                          "the file is corrupted or forged")
    state = {**floats, **{f"{name}.weight": lc.weight() for name, lc in layers.items()}}
    return model_from_meta(meta, where, state)


def pack_tensors(model: nn.Module, layers: dict[str, LayerCodes], meta: dict[str, Any],
                 graph: Graph) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """(tensors, metadata JSON, metadata) of an artifact: the float tensors the graph uses (not
    the quantized weights), codes and scales, and `meta` with the graph and per-layer code sets."""
    tensors: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    state = {**graph.constants, **state}
    state.update({k: state[v] for k, v in graph.renames.items() if k not in state})
    used = GraphModel(graph).state_dict()
    linear = {op.name for op in graph.ops if op.kind in QUANTIZED_KINDS}  # a weight an `aten` op reads stays float
    layers = {name: lc for name, lc in layers.items() if name in linear}
    quantized_weights = {f"{name}.weight" for name in layers}
    for name in used:
        if name not in state:
            raise AssertionError(f"the graph uses {name}, which the model does not have")
        t = state[name]
        if name not in quantized_weights:
            tensors[f"float/{name}"] = t.detach().to(torch.float32 if t.is_floating_point() else t.dtype).contiguous().clone()
    for name, lc in layers.items():
        tensors[f"codes/{name}"] = lc.q.to(lc.codes.storage_dtype).contiguous()
        tensors[f"scale/{name}"] = lc.alpha.to(torch.float32).contiguous()
    meta = dict(meta)
    meta["graph"] = graph.to_json()
    meta["layers"] = {
        name: {"shape": list(lc.q.shape), "bits": lc.codes.bits, "scheme": lc.codes.scheme,
               "granularity": "per_channel" if lc.per_channel else "per_tensor", "storage_bits": lc.codes.storage_bits}
        for name, lc in layers.items()
    }
    return tensors, json.dumps(meta, sort_keys=True), meta


def save_artifact(path: str | Path, model: nn.Module, layers: dict[str, LayerCodes], meta: dict[str, Any],
                  graph: Graph | None = None) -> str:
    """Write the artifact atomically; returns its content hash. `graph` is `model` traced (see
    `qexport.graph.trace`; traced here on meta's architecture.input_shape when not given); the
    model's tensors the graph does not use are not saved. `qexport.api.quantize` builds `meta`."""
    if graph is None:
        from qexport.graph import trace

        try:
            shape = tuple(meta["architecture"]["input_shape"])
        except (KeyError, TypeError):
            raise UserError("save_artifact needs meta['architecture']['input_shape'] or a graph; "
                            "qexport.quantize(...).save(path) builds both") from None
        graph = trace(model, shape)
    tensors, meta_json, _ = pack_tensors(model, layers, meta, graph)
    digest = content_hash(tensors, meta_json)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(format_version(graph)), "qexport": meta_json,
                                               "content_sha256": digest})
    return digest


def format_version(graph: Graph) -> int:
    """The oldest format that describes the graph: 2 unless it holds ops only torch.export's
    capture makes (`aten`, folded constants), so older qexports read what they can."""
    return 3 if any(op.kind.startswith("aten") for op in graph.ops) or graph.constants else 2


def _layer_codes(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> dict[str, LayerCodes]:
    """The per-layer codes the metadata declares, each entry checked against its tensors."""
    infos = meta.get("layers", {})
    if not isinstance(infos, dict):
        raise BadFile(f"{where}: metadata 'layers' is not a map; the file is corrupted")
    layers = {}
    for name, info in infos.items():
        try:
            bits, scheme, shape = info["bits"], info["scheme"], info["shape"]
            codes = CodeSet(bits, scheme)
            q, alpha = tensors[f"codes/{name}"], tensors[f"scale/{name}"]
        except (KeyError, TypeError, ValueError) as e:
            raise BadFile(f"{where}: layer {name}: bad entry or missing tensor ({e}); the file is corrupted") from None
        if not isinstance(bits, int) or isinstance(bits, bool) or shape != list(q.shape) or info.get("storage_bits", codes.storage_bits) != codes.storage_bits:
            raise BadFile(f"{where}: layer {name} declares {bits!r}-bit {scheme} codes of shape {shape!r}, the file holds "
                          f"{list(q.shape)} ({q.dtype}); the file is corrupted or forged")
        layers[name] = LayerCodes(q, alpha, codes)
    known = {f"{k}/{n}" for n in layers for k in ("codes", "scale")}
    stray = sorted(k for k in tensors if not k.startswith("float/") and k not in known)
    if stray:
        raise BadFile(f"{where}: tensors {stray[:3]} are not declared in the metadata; the file is corrupted")
    return layers


def load_artifact(path: str | Path) -> Artifact:
    """Read an artifact and check everything in it before anything uses it (see `reference_model`):
    a BadFile (a UserError) naming the problem for anything corrupted, truncated or forged."""
    path = Path(path)
    header = read_header(path)
    fmt = header.get("format")
    if fmt != FORMAT:
        raise BadFile(f"{path} is not a qexport artifact (format {fmt!r}); make one with `qexport quantize`")
    try:
        version = int(header.get("version", "0"))
    except ValueError:
        version = -1
    if version > VERSION:
        raise BadFile(f"{path} has artifact format version {version}, newer than this qexport reads ({VERSION}): upgrade qexport")
    if version < 1:
        raise BadFile(f"{path} has an invalid artifact format version {header.get('version')!r}")
    _, tensors = read_safetensors(path)
    meta_json = header.get("qexport", "")
    digest = content_hash(tensors, meta_json)
    if digest != header.get("content_sha256"):
        raise BadFile(f"{path}: content hash mismatch; the file is corrupted or was edited (re-export it)")
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError:
        raise BadFile(f"{path}: metadata is not JSON; the file is corrupted") from None
    check_architecture(meta, str(path))
    floats = {k[len("float/"):]: v for k, v in tensors.items() if k.startswith("float/")}
    layers = _layer_codes(meta, tensors, str(path))
    model = reference_model(meta, floats, layers, str(path))
    graph = model.graph if isinstance(model, GraphModel) else trace_zoo(model, meta)
    return Artifact(model, layers, meta, digest, graph)


def trace_zoo(model: nn.Module, meta: dict[str, Any]) -> Graph:
    """The graph of a version-1 artifact's zoo model (qexport's own code, traced on load)."""
    from qexport.graph import trace

    return trace(model, tuple(meta["architecture"]["input_shape"]))
