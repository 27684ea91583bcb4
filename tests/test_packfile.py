"""The packed file: exact codes back, exact payload sizes, a file near the physical limit, a
loadable artifact from `unpack`, and one clear error (no output) for each kind of broken file."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qadmm import methods
from qadmm.errors import UserError
from qadmm.spec import QuantSpec
from qexport.artifact import load_artifact, save_artifact
from qexport.pack.packfile import pack_artifact, read_packed, unpack_file, write_packed
from tests_helpers import cnn_artifact, run_cli

CONFIGS = [  # bits, scheme, per_channel, keep_first -> every scheme and stored width 1..9
    (1, None, False, False), (2, None, True, False), (3, "thesis", False, True), (4, None, False, False),
    (5, None, True, False), (8, None, False, True), (8, "thesis", True, False),
]


def make_artifact(path, data, model, bits, scheme=None, per_channel=False, keep_first=False):
    spec = QuantSpec(bits=bits, scheme=scheme, per_channel=per_channel, keep_first=keep_first, progress=False)
    res = methods.quantize("ptq", model, data, spec)
    meta = {"architecture": {"model": "mlp-digits", "input_shape": list(data.input_shape), "num_classes": data.num_classes},
            "preprocessing": {"type": "standardize", "mean": data.mean.tolist(), "std": data.std.tolist()},
            "dataset": data.describe(), "method": {"name": "ptq", "params": res.params},
            "spec": {"bits": bits, "scheme": spec.codes.scheme, "per_channel": per_channel}, "history": res.history}
    save_artifact(path, res.model, res.layers, meta)
    return load_artifact(path)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, digits, digits_mlp):
    d = tmp_path_factory.mktemp("art")
    return {cfg: make_artifact(d / f"a{i}.qx.safetensors", digits, digits_mlp, *cfg) for i, cfg in enumerate(CONFIGS)}


@pytest.fixture()
def packed_path(tmp_path, artifacts):
    path = tmp_path / "m.qpk.safetensors"
    write_packed(pack_artifact(artifacts[(2, None, True, False)]), path)
    return path


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[1] or 'default'}{c[0]}{'-pc' if c[2] else ''}{'-kf' if c[3] else ''}")
def test_pack_unpack_round_trip_and_sizes(tmp_path, digits, artifacts, cfg):
    art = artifacts[cfg]
    path = tmp_path / "m.qpk.safetensors"
    write_packed(pack_artifact(art), path)
    p = read_packed(path)
    assert [lay.name for lay in p.layers] == list(art.layers)
    for lay in p.layers:
        lc = art.layers[lay.name]
        width = lc.codes.storage_bits  # thesis: bits + 1
        assert lay.width == width and lay.data.size == -(-lc.q.numel() * width // 8)
        q = lay.unpack()
        assert q.dtype == lc.q.dtype and torch.equal(q, lc.q)
        assert np.array_equal(lay.scale, lc.alpha.numpy())
    # the whole file is the payload at the physical limit plus a small header
    s = p.sizes()
    assert path.stat().st_size <= 1.01 * s["tensors"] + 4096, (path.stat().st_size, s)
    # unpack: a loadable artifact with the same codes, scales, floats and outputs
    out = tmp_path / "u.qx.safetensors"
    unpack_file(path, out)
    back = load_artifact(out)
    for name, lc in art.layers.items():
        assert torch.equal(back.layers[name].q, lc.q) and torch.equal(back.layers[name].alpha, lc.alpha)
    for k, v in art.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k
    x = torch.as_tensor(digits.x_test)
    assert torch.equal(back.model(x), art.model(x))
    assert back.meta["preprocessing"]["mean"] == art.meta["preprocessing"]["mean"]
    assert back.meta["packed_from"]["source_sha256"] == art.sha256
    assert back.meta["method"] == art.meta["method"] and back.meta["spec"] == art.meta["spec"]


def test_cnn_small_file_size_bound(tmp_path, digits):
    """The size bound also holds with BatchNorm tensors (cnn-small: 13 float tensors); the fixed
    part is the header and metadata, which holds the model's graph (~4 KiB for cnn-small)."""
    res = cnn_artifact(tmp_path / "c.qx.safetensors", digits, bits=1)
    packed = pack_artifact(load_artifact(tmp_path / "c.qx.safetensors"))
    write_packed(packed, tmp_path / "c.qpk.safetensors")
    assert packed.file_bytes <= 1.01 * packed.sizes()["tensors"] + 8192
    x = torch.as_tensor(digits.x_test[:50])
    assert torch.equal(read_packed(tmp_path / "c.qpk.safetensors").model()[0](x), res.model.eval()(x))


def test_metadata_is_self_describing(packed_path, artifacts):
    with safe_open(str(packed_path), "np") as f:
        meta = f.metadata()
        assert f.get_tensor("packed/body.1").dtype == np.uint8
    assert meta["format"] == "qexport-packed" and meta["layout_version"] == "1"
    assert meta["source_sha256"] == artifacts[(2, None, True, False)].sha256
    layers = json.loads(meta["layers"])
    assert layers[0] == {"name": "body.1", "shape": [64, 64], "bits": 2, "scheme": "symmetric", "width": 2,
                         "encoding": "twos_complement", "axis": 0, "order": "C", "packed": "packed/body.1", "scale": "scale/body.1"}
    assert json.loads(meta["architecture"])["model"] == "mlp-digits"
    assert json.loads(meta["preprocessing"])["mean_tensor"] == "float/normalize.mean"


def test_a_reader_written_from_the_docs(packed_path, artifacts):
    """docs/packing.md alone is enough: parse the container with struct/json and decode the bit
    stream bit by bit (no qexport code), and get the artifact's codes and scales."""
    import struct

    raw = packed_path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    buf = raw[8 + n:]
    meta = header["__metadata__"]
    assert meta["format"] == "qexport-packed" and meta["layout_version"] == "1"
    art = artifacts[(2, None, True, False)]
    for lay in json.loads(meta["layers"]):
        b0, b1 = header[lay["packed"]]["data_offsets"]
        data, width, count = buf[b0:b1], lay["width"], int(np.prod(lay["shape"]))
        codes = []
        for i in range(count):
            v = sum(((data[(i * width + j) // 8] >> ((i * width + j) % 8)) & 1) << j for j in range(width))
            codes.append((-1 if v else 1) if lay["encoding"] == "sign" else (v - (1 << width) if v >> (width - 1) else v))
        assert codes == art.layers[lay["name"]].q.reshape(-1).tolist()
        s0, s1 = header[lay["scale"]]["data_offsets"]
        assert np.array_equal(np.frombuffer(buf[s0:s1], "<f4"), art.layers[lay["name"]].alpha.numpy())


def test_cli_pack_inspect_unpack(tmp_path, artifacts):
    art_path = tmp_path / "d.qx.safetensors"
    art = artifacts[(1, None, False, False)]
    save_artifact(art_path, art.model, art.layers, art.meta)
    out = run_cli(["pack", str(art_path)])
    packed = tmp_path / "d.qpk.safetensors"
    assert "wrote" in out and packed.is_file()
    text = run_cli(["inspect", str(packed)])
    assert "binary 1b" in text and "sign" in text
    # bytes per layer against float32: body.1 is 64x64 -> 512 packed bytes vs 16384
    row = next(line for line in text.splitlines() if line.startswith("body.1 "))
    assert "512" in row.split() and "16384" in row.split()
    assert json.loads(run_cli(["inspect", "--json", str(packed)]))["layout_version"] == "1"
    run_cli(["unpack", str(packed), "-o", str(tmp_path / "back.qx.safetensors")])
    assert torch.equal(load_artifact(tmp_path / "back.qx.safetensors").layers["body.1"].q, art.layers["body.1"].q)


def _rewrite(path, tensors=None, **meta_changes):
    """Rewrite a packed file with some tensors or metadata entries replaced."""
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    t = load_file(str(path))
    t.update(tensors or {})
    meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta_changes.items()})
    save_file(t, str(path), metadata=meta)


def _layers_with(path, **changes):
    with safe_open(str(path), "np") as f:
        layers = json.loads(f.metadata()["layers"])
    layers[1].update(changes)
    return layers


def _expect_error(tmp_path, path, match):
    with pytest.raises(UserError, match=match):
        read_packed(path)
    out = tmp_path / "out.qx.safetensors"
    msg = run_cli(["unpack", str(path), "-o", str(out)], code=2)
    assert msg.startswith("error: ") and msg.count("\n") == 1 and "Traceback" not in msg
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial output
    return msg


def test_truncated_file(tmp_path, packed_path):
    data = packed_path.read_bytes()
    for cut in (len(data) - 100, 20, 4):
        packed_path.write_bytes(data[:cut])
        _expect_error(tmp_path, packed_path, "truncated")


def test_payload_length_disagrees_with_shape(tmp_path, packed_path):
    short = load_file(str(packed_path))["packed/body.3"][:-1].copy()
    _rewrite(packed_path, {"packed/body.3": short})
    _expect_error(tmp_path, packed_path, r"layer body.3: payload has 1023 bytes .* needs exactly 1024")


def test_unknown_layout_version(tmp_path, packed_path):
    _rewrite(packed_path, layout_version="2")
    _expect_error(tmp_path, packed_path, "unknown layout version '2'")


@pytest.mark.parametrize("bits", [0, 9, 12])
def test_bits_outside_1_to_8(tmp_path, packed_path, bits):
    _rewrite(packed_path, layers=_layers_with(packed_path, bits=bits))
    _expect_error(tmp_path, packed_path, f"bits={bits}, outside 1-8")


def test_width_or_encoding_disagreeing_with_scheme(tmp_path, packed_path):
    _rewrite(packed_path, layers=_layers_with(packed_path, width=3))
    _expect_error(tmp_path, packed_path, "stored as 2-bit twos_complement, but the file says 3-bit")


def test_edited_payload_fails_the_hash(tmp_path, packed_path):
    t = load_file(str(packed_path))["packed/body.3"].copy()
    t[0] ^= 0x01  # 01 -> 00: still a valid code, only the hash can tell
    _rewrite(packed_path, {"packed/body.3": t})
    _expect_error(tmp_path, packed_path, "content hash mismatch")


def test_not_a_packed_file(tmp_path, artifacts):
    art_path = tmp_path / "a.qx.safetensors"
    art = artifacts[(4, None, False, False)]
    save_artifact(art_path, art.model, art.layers, art.meta)
    _expect_error(tmp_path, art_path, "not a qexport packed file")
