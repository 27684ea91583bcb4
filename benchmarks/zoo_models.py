"""The models practitioners bring: torchvision's classifiers and timm's, built for a 3×64×64 input
and 10 classes with seeded random weights (benchmark and test code only: the package itself never
imports torchvision or timm).

torchvision 0.28.0 is the release that matches torch 2.13.0, but the package index serves a CUDA
build of it; with the CPU torch its C extension does not load, and `import torchvision` then fails
in `torchvision/_meta_registrations.py` ("operator torchvision::nms does not exist"). Declaring the
two operator schemas first (what the C extension would have registered) lets the import and every
classification model work; detection ops (nms itself) stay unavailable, and nothing here needs them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_SHIM: list = []  # the torch.library.Library object must outlive the import that needed it


def import_torchvision():
    """torchvision, importable with the CPU build of torch (see the module docstring); None if absent."""
    try:
        import importlib.util

        if importlib.util.find_spec("torchvision") is None:
            return None
    except ValueError:
        return None
    if not _SHIM:
        try:
            torch.ops.torchvision.nms  # the real extension is loaded: nothing to declare
        except (AttributeError, RuntimeError):
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
            _SHIM.append(lib)
    import torchvision

    return torchvision


def _torchvision(name: str, **kw) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        tv = import_torchvision()
        return getattr(tv.models, name)(weights=None, num_classes=10, **kw)

    return make


def _small_vit() -> nn.Module:
    import_torchvision()
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=64, patch_size=8, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=256,
                             num_classes=10)


def _small_swin() -> nn.Module:
    import_torchvision()
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=48, depths=[2, 2], num_heads=[3, 6], window_size=[4, 4],
                           stochastic_depth_prob=0.1, num_classes=10)


def _small_swin_v2() -> nn.Module:
    import_torchvision()
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    return SwinTransformer(patch_size=[4, 4], embed_dim=48, depths=[2, 2], num_heads=[3, 6], window_size=[4, 4],
                           stochastic_depth_prob=0.1, num_classes=10, block=SwinTransformerBlockV2,
                           downsample_layer=PatchMergingV2)


def _small_maxvit() -> nn.Module:
    import_torchvision()
    from torchvision.models.maxvit import MaxVit

    # 64x64 halves five times to 2x2: windows and grid cells of 2x2 (torchvision's maxvit_t needs 224x224)
    return MaxVit(input_size=(64, 64), stem_channels=32, partition_size=2, block_channels=[32, 64, 128, 256],
                  block_layers=[1, 1, 1, 1], head_dim=16, stochastic_depth_prob=0.1, num_classes=10)


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import_torchvision()  # timm imports torchvision
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw)

    return make


# name -> factory; every model takes (N, 3, 64, 64) and returns (N, 10)
ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet18": _torchvision("resnet18"),
    "mobilenet_v2": _torchvision("mobilenet_v2"),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
    "efficientnet_b0": _torchvision("efficientnet_b0"),
    "squeezenet1_1": _torchvision("squeezenet1_1"),
    "shufflenet_v2_x0_5": _torchvision("shufflenet_v2_x0_5"),
    "mnasnet0_5": _torchvision("mnasnet0_5"),
    "regnet_x_400mf": _torchvision("regnet_x_400mf"),
    "densenet121": _torchvision("densenet121"),
    "googlenet": _torchvision("googlenet", aux_logits=False, init_weights=True),
    "convnext_tiny": _torchvision("convnext_tiny"),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large"),
    "efficientnet_v2_s": _torchvision("efficientnet_v2_s"),
    "regnet_y_400mf": _torchvision("regnet_y_400mf"),
    "resnet50": _torchvision("resnet50"),
    "resnext50_32x4d": _torchvision("resnext50_32x4d"),
    "alexnet": _torchvision("alexnet"),
    "swin (small config)": _small_swin,
    "swin_v2 (small config)": _small_swin_v2,
    "maxvit (small config)": _small_maxvit,
    "vit (4 layers x 128 wide)": _small_vit,
    "timm resnet18": _timm("resnet18"),
    "timm deit_tiny": _timm("deit_tiny_patch16_224", img_size=64),
    "timm mobilevit_xxs": _timm("mobilevit_xxs"),
    "timm levit_128s": _timm("levit_128s", img_size=64),
    "timm efficientvit_b0": _timm("efficientvit_b0"),
    "timm efficientvit_m0": _timm("efficientvit_m0", img_size=64),
}


def build(name: str, seed: int = 0, x: torch.Tensor | None = None) -> nn.Module:
    """Model `name` with weights drawn from `seed` (a layer its constructor sets to zero drawn as
    PyTorch draws any other), in eval mode. With images `x`, BatchNorm's running statistics are
    those of `x`, computed as quantization re-estimates them (`qadmm.recalibrate.reestimate_bn`: the
    same batches, cumulative average): pass the calibration images (`Dataset.calibration`) and a
    float model re-estimated on them is the same model, so agreement with it measures the
    quantization. (A random-weight net is chaotic in its statistics: efficientnet_b0's fp32 output
    moved to 10.5 dB SQNR from re-estimating on 512 of the 576 images its statistics came from.)"""
    torch.manual_seed(seed)
    model = ZOO[name]().eval()
    for m in model.modules():  # torchvision's ViT starts its head at 0: every logit 0, agreement 100 % whatever
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not m.weight.detach().any():  # the quantization
            m.reset_parameters()
    if x is not None:
        from qadmm.recalibrate import reestimate_bn

        reestimate_bn(model, x)
    return model


# Two zoo architectures trained on Fashion-MNIST (1x28x28) and shipped in models/ (see models/README.md):
# torchvision's own classes with the stem adapted to one grey channel, as a user adapts them.

def fashion_mobilenet_v2(input_shape=(1, 28, 28), num_classes: int = 10) -> nn.Module:
    """MobileNetV2 at width 0.5, its first convolution taking 1 channel at stride 1 (28x28 is small)."""
    tv = import_torchvision()
    m = tv.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=0.5)
    first = m.features[0][0]
    m.features[0][0] = nn.Conv2d(input_shape[0], first.out_channels, 3, stride=1, padding=1, bias=False)
    return m


def fashion_vit(input_shape=(1, 28, 28), num_classes: int = 10) -> nn.Module:
    """torchvision's VisionTransformer: 4x4 patches of the 28x28 image, 4 layers, 128 wide, 4 heads."""
    import_torchvision()
    from torchvision.models.vision_transformer import VisionTransformer

    m = VisionTransformer(image_size=input_shape[-1], patch_size=4, num_layers=4, num_heads=4, hidden_dim=128,
                          mlp_dim=256, num_classes=num_classes)
    m.conv_proj = nn.Conv2d(input_shape[0], 128, kernel_size=4, stride=4)
    return m
