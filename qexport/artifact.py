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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qadmm.codes import CodeSet
from qadmm.errors import UserError
from qadmm.spec import LayerCodes, apply_codes
from qadmm.zoo import NAMES, build_model
from qexport.fileio import atomic_path
from qexport.graph import Graph, GraphModel

FORMAT = "qexport-artifact"
VERSION = 2


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


def model_from_meta(meta: dict[str, Any], where: str) -> nn.Module:
    """The float model a file describes, from its stored graph (no code is imported), or for a
    version-1 file without one, from the zoo name it records."""
    if "graph" in meta:
        return GraphModel(Graph.from_json(meta["graph"], where))
    arch, pre = meta.get("architecture", {}), meta.get("preprocessing", {})
    if arch.get("model") not in NAMES:
        raise UserError(f"{where} has no stored graph and names model {arch.get('model')!r}, which is not in qexport's "
                        f"zoo; qexport never imports code a file names: re-create the file with this qexport")
    return build_model(arch["model"], tuple(arch["input_shape"]), arch["num_classes"], torch.tensor(pre["mean"]),
                       torch.tensor(pre["std"]))


def reference_model(meta: dict[str, Any], floats: dict[str, torch.Tensor], layers: dict[str, LayerCodes],
                    where: str) -> nn.Module:
    """The fake-quant reference (W = α·Q exactly) from metadata, float tensors and codes; a
    UserError naming `where` when the tensors do not fit the graph."""
    model = model_from_meta(meta, where)
    state = {**floats, **{f"{name}.weight": lc.weight() for name, lc in layers.items()}}
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise UserError(f"{where}: tensors do not match the stored model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                        f"wrong shape {wrong[:3]}); the file is corrupted")
    model.load_state_dict(state)
    apply_codes(model, layers)
    return model.eval()


def pack_tensors(model: nn.Module, layers: dict[str, LayerCodes], meta: dict[str, Any],
                 graph: Graph) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """(tensors, metadata JSON, metadata) of an artifact: the float tensors the graph uses (not
    the quantized weights), codes and scales, and `meta` with the graph and per-layer code sets."""
    tensors: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    used = GraphModel(graph).state_dict()
    layers = {name: lc for name, lc in layers.items() if f"{name}.weight" in used}
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
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION), "qexport": meta_json, "content_sha256": digest})
    return digest


def read_header(path: str | Path) -> dict[str, str]:
    """The safetensors string metadata, with clear errors for missing/foreign/truncated files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); is it truncated or not a qexport file?") from None


def load_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    header = read_header(path)
    fmt = header.get("format")
    if fmt != FORMAT:
        raise UserError(f"{path} is not a qexport artifact (format {fmt!r}); make one with `qexport quantize`")
    try:
        version = int(header.get("version", "0"))
    except ValueError:
        version = -1
    if version > VERSION:
        raise UserError(f"{path} has artifact format version {version}, newer than this qexport reads ({VERSION}): upgrade qexport")
    if version < 1:
        raise UserError(f"{path} has an invalid artifact format version {header.get('version')!r}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read tensors ({e}); the file is truncated or corrupted") from None
    meta_json = header.get("qexport", "")
    digest = content_hash(tensors, meta_json)
    if digest != header.get("content_sha256"):
        raise UserError(f"{path}: content hash mismatch; the file is corrupted or was edited (re-export it)")
    meta = json.loads(meta_json)
    floats = {k[len("float/"):]: v for k, v in tensors.items() if k.startswith("float/")}
    layers = {name: LayerCodes(tensors[f"codes/{name}"], tensors[f"scale/{name}"], CodeSet(info["bits"], info["scheme"]))
              for name, info in meta["layers"].items()}
    model = reference_model(meta, floats, layers, str(path))
    graph = model.graph if isinstance(model, GraphModel) else trace_zoo(model, meta)
    return Artifact(model, layers, meta, digest, graph)


def trace_zoo(model: nn.Module, meta: dict[str, Any]) -> Graph:
    """The graph of a version-1 artifact's zoo model (qexport's own code, traced on load)."""
    from qexport.graph import trace

    return trace(model, tuple(meta["architecture"]["input_shape"]))
