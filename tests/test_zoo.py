"""torchvision's own models through the CLI as a user runs them: quantize, every ONNX form, verify.

Three architectures that exercise what the capture had to learn (`qexport/capture.py`):
MobileNetV3-small (depthwise convolutions, Hardswish, Hardsigmoid squeeze-excite, x.mean),
ShuffleNetV2 (channel shuffle: shape arithmetic and chunk), and a small VisionTransformer (class
token and position embedding used directly in forward, nn.MultiheadAttention, LayerNorm on
tokens). Weights are seeded, BatchNorm statistics those of the images; the images are the digits
upsampled to 3x32x32. Skipped where torchvision is not installed (`./dev test` installs it).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests_helpers import run_cli

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
FACTORIES = '''
import sys
sys.path.insert(0, {bench!r})
from zoo_models import import_torchvision


def mobilenet_v3_small():
    return import_torchvision().models.mobilenet_v3_small(weights=None, num_classes=10)


def shufflenet_v2():
    return import_torchvision().models.shufflenet_v2_x0_5(weights=None, num_classes=10)


def vit():
    import_torchvision()
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)
'''


def _torchvision():
    sys.path.insert(0, str(BENCH))
    try:
        from zoo_models import import_torchvision

        return import_torchvision()
    except Exception:
        return None
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def images(tmp_path_factory, digits):
    """The digits as 3x32x32 images in [0, 1] (an .npz as a user brings one)."""
    def up(x):
        t = torch.nn.functional.interpolate(torch.as_tensor(x, dtype=torch.float32) / 16.0, size=32, mode="bilinear")
        return t.repeat(1, 3, 1, 1).numpy()

    path = tmp_path_factory.mktemp("zoo") / "digits32.npz"
    np.savez(path, x_train=up(np.concatenate([digits.x_train, digits.x_val])),
             y_train=np.concatenate([digits.y_train, digits.y_val]), x_test=up(digits.x_test), y_test=digits.y_test)
    return path


@pytest.mark.parametrize("factory", ["mobilenet_v3_small", "shufflenet_v2", "vit"])
def test_torchvision_model_quantizes_exports_and_verifies(tmp_path, images, factory):
    if _torchvision() is None:
        pytest.skip("torchvision is not installed")
    src = tmp_path / "tv_models.py"
    src.write_text(FACTORIES.format(bench=str(BENCH)))
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        mod = importlib.import_module("tv_models")
        torch.manual_seed(0)
        model = getattr(mod, factory)().eval()
        x = torch.as_tensor(np.load(images)["x_train"][:256])
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in bns:  # statistics of the images, as a trained network's would be
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            model(x)
        model.eval()
        torch.save(model.state_dict(), tmp_path / "w.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tv_models", None)
    art = tmp_path / "m.qx.safetensors"
    out = run_cli(["quantize", "--model", f"{src}:{factory}", "--checkpoint", str(tmp_path / "w.pt"), "--data", str(images),
                   "--method", "ptq", "--bits", "8", "--per-channel", "-q", "-o", str(art)])
    assert "quantized test accuracy" in out
    if factory == "vit":  # every Linear of attention is quantized, nn.MultiheadAttention's packed in_proj too
        shown = run_cli(["inspect", str(art)])
        assert "self_attention.in_proj" in shown and "self_attention.out_proj" in shown, shown
    src.unlink()  # every later step works from the artifact alone
    for form in ("weights", "qdq", "qoperator"):
        onnx_path = tmp_path / f"{form}.onnx"
        run_cli(["to-onnx", str(art), "--form", form, "--data", str(images), "-o", str(onnx_path)])
        out = run_cli(["verify", str(onnx_path), "--artifact", str(art), "--data", str(images), "--max-samples", "128"])
        assert "PASSED" in out and "FAILED" not in out, out
