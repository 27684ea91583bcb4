"""The packed binary: an artifact's codes at exactly N bits per weight, in a safetensors file.

Tensors: ``packed/<layer>`` U8, the layer's codes packed by `qexport.pack.bitpack` (ceil(count·N/8)
bytes); ``scale/<layer>`` F32 (shape () per tensor, (C_out,) per channel); ``float/<name>`` every
parameter and buffer that is not a quantized weight (biases, BatchNorm, kept layers, the input
normalisation), with its own dtype. String metadata: ``format``, ``layout_version``,
``architecture``, ``preprocessing``, ``layers`` (per tensor: shape, bits, scheme, width, encoding,
axis), ``source_sha256`` (the artifact packed), ``provenance`` and ``content_sha256``.
docs/packing.md is the specification; `read_packed` checks every rule it states.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn

from qadmm.codes import CodeSet
from qadmm.errors import BadFile, UserError
from qadmm.spec import LayerCodes
from qexport.pack import bitpack
from qexport.artifact import Artifact, describe_output, reference_model, save_artifact
from qexport.fileio import atomic_path, read_header, read_safetensors

FORMAT = "qexport-packed"
LAYOUT_VERSION = 1
# The input normalisation lives in these float tensors; the metadata names them instead of
# repeating 2·784 numbers as JSON text (which would double a 1-bit MNIST file).
NORM_MEAN, NORM_STD = "float/normalize.mean", "float/normalize.std"
# Artifact metadata left out of the packed file: values kept as tensors, or logs that can be
# large (per-iteration history); `source_sha256` points at the artifact that has them.
DROPPED_META = ("layers", "preprocessing", "history")


def encoding_for(codes: CodeSet) -> str:
    """Binary codes use Larq's sign bit; every other scheme two's complement at its stored width."""
    return bitpack.SIGN if codes.scheme == "binary" else bitpack.TWOS_COMPLEMENT


@dataclass
class PackedLayer:
    """One quantized weight: packed codes (uint8), scale (float32) and how to read them."""

    name: str
    shape: tuple[int, ...]
    codes: CodeSet
    data: np.ndarray  # uint8, ceil(count·width/8) bytes
    scale: np.ndarray  # float32, shape () or (shape[0],)

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def width(self) -> int:
        return self.codes.storage_bits

    @property
    def encoding(self) -> str:
        return encoding_for(self.codes)

    @property
    def axis(self) -> int | None:
        return 0 if self.scale.ndim == 1 else None

    def unpack(self) -> torch.Tensor:
        """The exact integer codes, in the artifact's dtype (int8, int16 for thesis 8-bit)."""
        q = bitpack.unpack(self.data, self.count, self.width, self.encoding).reshape(self.shape)
        return torch.from_numpy(q).to(self.codes.storage_dtype)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "bits": self.codes.bits, "scheme": self.codes.scheme,
                "width": self.width, "encoding": self.encoding, "axis": self.axis, "order": "C",
                "packed": f"packed/{self.name}", "scale": f"scale/{self.name}"}


@dataclass
class Packed:
    """A packed model in memory: what `pack_artifact` makes and `read_packed` returns."""

    layers: list[PackedLayer]
    floats: dict[str, np.ndarray]  # state_dict name (without "float/") -> array
    architecture: dict[str, Any]
    preprocessing: dict[str, Any]  # without the mean/std values (those are float tensors)
    provenance: dict[str, Any]  # the artifact's metadata, less DROPPED_META
    source_sha256: str
    content_sha256: str = ""
    file_bytes: int | None = None  # set by read_packed / write_packed
    layout_version: int = LAYOUT_VERSION
    _header: dict[str, str] = field(default_factory=dict, repr=False)

    def tensors(self) -> dict[str, np.ndarray]:
        out = {f"float/{k}": v for k, v in self.floats.items()}
        for lay in self.layers:
            out[f"packed/{lay.name}"] = lay.data
            out[f"scale/{lay.name}"] = lay.scale
        return out

    def metadata(self) -> dict[str, str]:
        """The safetensors string metadata (without content_sha256)."""
        dump = lambda v: json.dumps(v, sort_keys=True, separators=(",", ":"))  # noqa: E731
        return {"format": FORMAT, "layout_version": str(self.layout_version), "architecture": dump(self.architecture),
                "preprocessing": dump(self.preprocessing), "layers": json.dumps([lay.info() for lay in self.layers], separators=(",", ":")),
                "source_sha256": self.source_sha256, "provenance": dump(self.provenance)}

    def layer_codes(self) -> dict[str, LayerCodes]:
        return {lay.name: LayerCodes(lay.unpack(), torch.from_numpy(lay.scale.copy()), lay.codes) for lay in self.layers}

    def full_meta(self, where: str = "packed file") -> dict[str, Any]:
        """Artifact metadata rebuilt from the packed file (normalisation values read back from the tensors)."""
        if not all(isinstance(v, dict) for v in (self.preprocessing, self.provenance, self.architecture)):
            raise BadFile(f"{where}: metadata 'preprocessing', 'provenance' or 'architecture' is not a JSON object; the file is corrupted")
        pre = dict(self.preprocessing)
        for key, tname in (("mean", pre.pop("mean_tensor", None)), ("std", pre.pop("std_tensor", None))):
            if tname is not None:
                arr = self.floats.get(str(tname)[len("float/"):])
                if arr is None:
                    raise BadFile(f"{where}: the normalisation tensor {tname!r} is missing; the file is corrupted")
                pre[key] = arr.tolist()
        meta = {**self.provenance, "architecture": self.architecture, "preprocessing": pre}
        meta["packed_from"] = {"source_sha256": self.source_sha256, "packed_sha256": self.content_sha256,
                               "layout_version": self.layout_version, "note": "per-iteration history is kept only in the source artifact"}
        return meta

    def model(self, where: str = "packed file") -> tuple[nn.Module, dict[str, LayerCodes]]:
        """The fake-quant reference model (W = α·Q exactly) and its codes, checked (`reference_model`)."""
        layers = self.layer_codes()
        floats = {k: torch.from_numpy(np.array(v)) for k, v in self.floats.items()}
        return reference_model(self.full_meta(where), floats, layers, where), layers

    def sizes(self) -> dict[str, int]:
        """Bytes of packed payloads, scales, float tensors, their sum, and float32 weights."""
        payload = sum(lay.data.nbytes for lay in self.layers)
        scales = sum(lay.scale.nbytes for lay in self.layers)
        floats = sum(v.nbytes for v in self.floats.values())
        return {"payload": payload, "scales": scales, "floats": floats, "tensors": payload + scales + floats,
                "float32_weights": sum(4 * lay.count for lay in self.layers),
                "float32_model": sum(4 * lay.count for lay in self.layers) + floats}


def content_hash(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{t.dtype.str}|{tuple(t.shape)}|".encode())
        h.update(t.tobytes())
    for key in sorted(metadata):
        h.update(f"{key}={metadata[key]}\n".encode())
    return h.hexdigest()


def pack_artifact(art: Artifact) -> Packed:
    """Pack a loaded artifact's codes at their stored width (binary 1, symmetric N, thesis N+1)."""
    quantized = {f"{name}.weight" for name in art.layers}
    floats = {k: v.detach().cpu().contiguous().numpy().copy() for k, v in art.model.state_dict().items() if k not in quantized}
    layers = []
    for name, lc in art.layers.items():
        try:
            data = bitpack.pack(lc.q.numpy(), lc.codes.storage_bits, encoding_for(lc.codes))
        except ValueError as e:
            raise UserError(f"layer {name}: {e}; the artifact's codes are not {lc.codes.describe()}") from None
        layers.append(PackedLayer(name, tuple(lc.q.shape), lc.codes, data, lc.alpha.to(torch.float32).numpy().copy()))
    pre = {k: v for k, v in art.meta["preprocessing"].items() if k not in ("mean", "std")}
    if NORM_MEAN[len("float/"):] in floats and NORM_STD[len("float/"):] in floats:
        pre.update(mean_tensor=NORM_MEAN, std_tensor=NORM_STD)
    provenance = {k: v for k, v in art.meta.items() if k not in (*DROPPED_META, "architecture")}
    packed = Packed(layers, floats, art.meta["architecture"], pre, provenance, art.sha256)
    packed.content_sha256 = content_hash(packed.tensors(), packed.metadata())
    return packed


def write_packed(packed: Packed, path: str | Path) -> str:
    """Write the packed file atomically; returns its content hash."""
    meta = packed.metadata()
    packed.content_sha256 = content_hash(packed.tensors(), meta)
    with atomic_path(path) as tmp:
        save_file(packed.tensors(), str(tmp), metadata={**meta, "content_sha256": packed.content_sha256})
        packed.file_bytes = Path(tmp).stat().st_size
    return packed.content_sha256


def pack_file(artifact_path: str | Path, out_path: str | Path) -> Packed:
    """`qexport pack`: load an artifact, pack it, write it; returns the packed model."""
    from qexport.artifact import load_artifact

    packed = pack_artifact(load_artifact(artifact_path))
    write_packed(packed, out_path)
    return packed


def _json(header: dict[str, str], key: str, path: Path):
    try:
        return json.loads(header[key])
    except (KeyError, json.JSONDecodeError):
        raise BadFile(f"{path}: metadata entry {key!r} is missing or not JSON; the file is corrupted") from None


def _layer(info: dict, tensors: dict[str, np.ndarray], path: Path) -> PackedLayer:
    """One layer entry checked against every rule of docs/packing.md."""
    try:
        name, shape, bits, scheme = str(info["name"]), tuple(int(s) for s in info["shape"]), info["bits"], info["scheme"]
        width, encoding, axis = info["width"], info["encoding"], info["axis"]
    except (KeyError, TypeError, ValueError):
        raise BadFile(f"{path}: a layer entry lacks name/shape/bits/scheme/width/encoding/axis; the file is corrupted") from None
    where = f"{path}: layer {name}"
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise BadFile(f"{where} has bits={bits!r}, outside 1-8; the file is corrupted or was not written by qexport")
    try:
        codes = CodeSet(bits, scheme)
    except ValueError as e:
        raise BadFile(f"{where}: {e}") from None
    if width != codes.storage_bits or encoding != encoding_for(codes):
        raise BadFile(f"{where}: {codes.describe()} is stored as {codes.storage_bits}-bit {encoding_for(codes)}, "
                        f"but the file says {width}-bit {encoding}")
    if info.get("order", "C") != "C" or any(s < 0 for s in shape):
        raise BadFile(f"{where}: shape {shape} in order {info.get('order')!r} is not supported (C order only)")
    data = tensors.get(str(info.get("packed", f"packed/{name}")))
    scale = tensors.get(str(info.get("scale", f"scale/{name}")))
    if data is None or scale is None:
        raise BadFile(f"{where}: tensor packed/{name} or scale/{name} is missing; the file is corrupted")
    count = int(np.prod(shape, dtype=np.int64))
    need = bitpack.packed_size(count, width)
    if data.dtype != np.uint8 or data.ndim != 1 or data.size != need:
        raise BadFile(f"{where}: payload has {data.size} bytes ({data.dtype}), but shape {shape} at {width} bits "
                        f"needs exactly {need} (uint8); the file is corrupted")
    want_scale = (shape[0],) if axis == 0 else ()
    if axis not in (None, 0) or scale.dtype != np.float32 or scale.shape != want_scale or not np.all(np.isfinite(scale) & (scale > 0)):
        raise BadFile(f"{where}: scale has shape {scale.shape} ({scale.dtype}) for axis {axis!r}; "
                        f"expected float32 {want_scale} with finite positive values")
    return PackedLayer(name, shape, codes, data, scale)


def read_packed(path: str | Path) -> Packed:
    """Read and check a packed file; one clear UserError for anything that breaks the layout."""
    path = Path(path)
    header, tensors = read_safetensors(path, numpy=True)  # missing file, not safetensors, truncated
    fmt = header.get("format")
    if fmt != FORMAT:
        raise BadFile(f"{path} is not a qexport packed file (format {fmt!r}); make one with `qexport pack ARTIFACT`")
    version = header.get("layout_version", "")
    if version != str(LAYOUT_VERSION):
        raise BadFile(f"{path} has unknown layout version {version!r}; this qexport reads layout {LAYOUT_VERSION} "
                        "(upgrade qexport or re-pack the artifact)")
    infos = _json(header, "layers", path)
    if not isinstance(infos, list):
        raise BadFile(f"{path}: metadata 'layers' is not a list; the file is corrupted")
    layers = [_layer(info, tensors, path) for info in infos]
    if len({lay.name for lay in layers}) != len(layers):
        raise BadFile(f"{path}: a layer is listed twice; the file is corrupted")
    floats = {k[len("float/"):]: v for k, v in tensors.items() if k.startswith("float/")}
    known = {f"packed/{lay.name}" for lay in layers} | {f"scale/{lay.name}" for lay in layers} | {f"float/{k}" for k in floats}
    if set(tensors) - known:
        raise BadFile(f"{path}: unexpected tensors {sorted(set(tensors) - known)[:3]}; the file is corrupted")
    meta = {k: v for k, v in header.items() if k != "content_sha256"}
    digest = content_hash(tensors, meta)
    if digest != header.get("content_sha256"):
        raise BadFile(f"{path}: content hash mismatch; the file is corrupted or was edited (re-pack the artifact)")
    packed = Packed(layers, floats, _json(header, "architecture", path), _json(header, "preprocessing", path),
                    _json(header, "provenance", path), header.get("source_sha256", ""), digest,
                    path.stat().st_size, LAYOUT_VERSION, header)
    for lay in layers:
        try:
            q = lay.unpack()
        except ValueError as e:
            raise BadFile(f"{path}: layer {lay.name}: {e}") from None
        if not lay.codes.contains(q):
            raise BadFile(f"{path}: layer {lay.name} holds codes outside {lay.codes.describe()}; the file is corrupted")
    packed.model(str(path))  # the model it describes builds, fits its tensors and runs (`reference_model`)
    return packed


def unpack_file(packed_path: str | Path, out_path: str | Path) -> str:
    """`qexport unpack`: the packed file back to a loadable artifact; returns its sha256."""
    packed = read_packed(packed_path)
    model, layers = packed.model()
    return save_artifact(out_path, model, layers, packed.full_meta())


def describe_packed(path: str | Path, as_json: bool = False) -> str:
    """`qexport inspect` for a packed file: bytes per layer against float32."""
    p = read_packed(path)
    if as_json:
        return json.dumps({"content_sha256": p.content_sha256, "file_bytes": p.file_bytes, "sizes": p.sizes(),
                           **{k: (json.loads(v) if k in ("architecture", "preprocessing", "layers", "provenance") else v)
                              for k, v in p._header.items()}}, indent=2, sort_keys=True)
    arch = p.architecture
    prov = p.provenance
    lines = [f"{path}: qexport packed file, layout {p.layout_version} (sha256 {p.content_sha256[:16]}), "
             f"packed from artifact {p.source_sha256[:16]}",
             f"model {arch.get('model')} input {tuple(arch.get('input_shape', ()))} {describe_output(arch)}; "
             f"method {prov.get('method', {}).get('name', '?')}"]
    acc = prov.get("accuracy", {})
    if acc.get("quantized_test") is not None:
        lines.append(f"accuracy: float {acc['float_test']:.2f}%  quantized {acc['quantized_test']:.2f}%")
    header = f"{'layer':24s} {'shape':16s} {'codes':14s} {'width':>5s} {'encoding':16s} {'packed':>9s} {'scales':>7s} {'fp32':>9s} {'ratio':>6s}"
    lines += ["", header, "-" * len(header)]
    for lay in p.layers:
        f32 = 4 * lay.count
        lines.append(f"{lay.name:24s} {str(lay.shape):16s} {lay.codes.scheme + ' ' + str(lay.codes.bits) + 'b':14s} "
                     f"{lay.width:5d} {lay.encoding:16s} {lay.data.nbytes:9d} {lay.scale.nbytes:7d} {f32:9d} "
                     f"{f32 / max(lay.data.nbytes + lay.scale.nbytes, 1):5.1f}x")
    s = p.sizes()
    lines.append(f"{'quantized weights':24s} {'':16s} {'':14s} {'':5s} {'':16s} {s['payload']:9d} {s['scales']:7d} "
                 f"{s['float32_weights']:9d} {s['float32_weights'] / max(s['payload'] + s['scales'], 1):5.1f}x")
    overhead = p.file_bytes - s["tensors"]
    lines.append(f"float tensors kept (biases, normalisation, ...): {len(p.floats)} tensors, {s['floats']} bytes")
    lines.append(f"file {p.file_bytes} bytes = tensors {s['tensors']} + header {overhead}; "
                 f"float32 model {s['float32_model']} bytes ({s['float32_model'] / max(p.file_bytes, 1):.1f}x larger)")
    return "\n".join(lines)


def load_packed(path: str | Path) -> Packed:
    """A packed file as is, or an artifact packed in memory (what `to-c` accepts)."""
    if read_header(path).get("format") == FORMAT:
        return read_packed(path)
    from qexport.artifact import load_artifact

    return pack_artifact(load_artifact(path))
