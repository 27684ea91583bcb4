"""The quantized-model artifact: one safetensors file, loaded without executing code.

Tensors:  ``codes/<layer>`` int8 (int16 for the thesis scheme at 8 bits), ``scale/<layer>``
float32 (shape () or (C_out,)), ``float/<name>`` every float parameter and buffer that is not a
quantized weight (biases, BatchNorm, kept layers, the input normalisation).
Metadata: ``format``, ``version`` and ``qexport`` (JSON: architecture, preprocessing, per-layer
code sets, method and hyperparameters, dataset and seed, accuracies, versions), and
``content_sha256`` over all tensors and that JSON.
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
from qadmm.zoo import build_model
from qexport.fileio import atomic_path

FORMAT = "qexport-artifact"
VERSION = 1


@dataclass
class Artifact:
    """A loaded artifact: the fake-quant reference model (W = α·Q exactly), codes and metadata."""

    model: nn.Module
    layers: dict[str, LayerCodes]
    meta: dict[str, Any]
    sha256: str

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


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
    arch = meta["architecture"]
    shape = tuple(arch["input_shape"])
    pre = meta["preprocessing"]
    return build_model(arch["model"], shape, arch["num_classes"], torch.tensor(pre["mean"]), torch.tensor(pre["std"]))


def reference_model(meta: dict[str, Any], floats: dict[str, torch.Tensor], layers: dict[str, LayerCodes],
                    where: str) -> nn.Module:
    """The fake-quant reference (W = α·Q exactly) from metadata, float tensors and codes; a
    UserError naming `where` when the tensors do not fit the architecture."""
    model = model_from_meta(meta)
    state = {**floats, **{f"{name}.weight": lc.weight() for name, lc in layers.items()}}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{where}: tensors do not match architecture {meta['architecture'].get('model')!r} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the file is corrupted")
    apply_codes(model, layers)
    return model.eval()


def save_artifact(path: str | Path, model: nn.Module, layers: dict[str, LayerCodes], meta: dict[str, Any]) -> str:
    """Write the artifact atomically; returns its content hash. `meta` must hold `architecture`
    and `preprocessing`; the per-layer code sets are added here."""
    tensors: dict[str, torch.Tensor] = {}
    quantized_weights = {f"{name}.weight" for name in layers}
    for name, t in model.state_dict().items():
        if name not in quantized_weights:
            tensors[f"float/{name}"] = t.detach().to(torch.float32 if t.is_floating_point() else t.dtype).contiguous().clone()
    for name, lc in layers.items():
        tensors[f"codes/{name}"] = lc.q.to(lc.codes.storage_dtype).contiguous()
        tensors[f"scale/{name}"] = lc.alpha.to(torch.float32).contiguous()
    meta = dict(meta)
    meta["layers"] = {
        name: {"shape": list(lc.q.shape), "bits": lc.codes.bits, "scheme": lc.codes.scheme,
               "granularity": "per_channel" if lc.per_channel else "per_tensor", "storage_bits": lc.codes.storage_bits}
        for name, lc in layers.items()
    }
    meta_json = json.dumps(meta, sort_keys=True)
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
    return Artifact(reference_model(meta, floats, layers, str(path)), layers, meta, digest)
