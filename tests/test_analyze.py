"""`qexport analyze`: per-layer sensitivity is reproducible and names a damaged layer first."""
import json

import torch

from qadmm.sensitivity import sensitivity
from qadmm.zoo import build_model
from tests_helpers import run_cli


def test_a_damaged_layer_ranks_first(digits):
    torch.manual_seed(0)
    model = build_model("mlp-digits", digits.input_shape, digits.num_classes, digits.mean, digits.std).eval()
    with torch.no_grad():  # one large weight per row: nearest rounding at few bits wipes the rest of the layer
        w = model.body[3].weight
        w[:, 0] = 40 * w.abs().max()
    a = sensitivity(model, digits, [4, 2], per_channel=True, calib_samples=256, eval_samples=200)
    b = sensitivity(model, digits, [4, 2], per_channel=True, calib_samples=256, eval_samples=200)
    assert a.to_json() == b.to_json()  # reproducible
    assert a.ranking(2)[0] == "body.3" and a.layers[1].sqnr_db[2] < min(a.layers[0].sqnr_db[2], a.layers[2].sqnr_db[2])
    assert all(s.sqnr_db[4] >= s.sqnr_db[2] for s in a.layers)  # more bits, never more error
    assert a.metric == "accuracy" and a.layers[0].bytes[2] == 4096 * 2 // 8 + 4 * 64


def test_cli_analyze_writes_json_and_refuses_bad_bits(tmp_path, digits):
    ckpt = tmp_path / "m.safetensors"
    run_cli(["train", "--epochs", "2", "-q", "-o", str(ckpt)])
    out = run_cli(["analyze", "--checkpoint", str(ckpt), "--bits", "4,1", "-q", "--json", str(tmp_path / "s.json")])
    assert "most sensitive at 1 bits:" in out
    rec = json.loads((tmp_path / "s.json").read_text())
    assert rec["bits"] == [4, 1] and [s["name"] for s in rec["layers"]] == ["body.1", "body.3", "body.5"]
    msg = run_cli(["analyze", "--checkpoint", str(ckpt), "--bits", "4,9"], code=2)
    assert "every width must be from 1 to 8" in msg


def test_size_budget_is_never_exceeded_and_is_recorded(tmp_path, digits):
    import qexport
    from qexport.artifact import load_artifact

    torch.manual_seed(0)
    model = build_model("mlp-digits", digits.input_shape, digits.num_classes, digits.mean, digits.std).eval()
    two_bit = (4096 + 4096 + 640) * 2 // 8 + 4 * (64 + 64 + 10)  # every layer at 2 bits, one scale per channel
    for budget in (two_bit, two_bit + 600, 5000):
        art = qexport.quantize(model, digits, "gptq", 4, per_channel=True, size_budget=budget, bit_choices=(8, 4, 2, 1))
        used = sum(-(-lc.q.numel() * lc.codes.storage_bits // 8) + 4 * lc.alpha.numel() for lc in art.layers.values())
        mp = art.meta["mixed_precision"]
        assert used == mp["bytes"] <= budget
        assert {n: lc.codes.bits for n, lc in art.layers.items()} == mp["chosen"]
    assert len(set(mp["chosen"].values())) >= 1 and max(mp["chosen"].values()) >= 4
    art.save(tmp_path / "m.qx.safetensors")
    assert load_artifact(tmp_path / "m.qx.safetensors").meta["mixed_precision"]["chosen"] == mp["chosen"]


def test_size_budget_refusals(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    run_cli(["train", "--epochs", "2", "-q", "-o", str(ckpt)])
    msg = run_cli(["quantize", "--checkpoint", str(ckpt), "--method", "ptq", "--size-budget", "100", "-q",
                   "-o", str(tmp_path / "a.qx.safetensors")], code=2)
    assert "below the smallest model" in msg and not (tmp_path / "a.qx.safetensors").exists()
    msg = run_cli(["quantize", "--checkpoint", str(ckpt), "--size-budget", "lots", "-q"], code=2)
    assert "--size-budget 'lots'" in msg
    msg = run_cli(["quantize", "--checkpoint", str(ckpt), "--method", "ptq", "--size-budget", "5KB", "--layer-bits", "body.1=8",
                   "-q", "-o", str(tmp_path / "b.qx.safetensors")], code=2)
    assert "drop --layer-bits" in msg
