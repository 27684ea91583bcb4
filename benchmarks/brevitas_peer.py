"""Brevitas post-training quantization as a benchmark peer (benchmark-only: `pip install -e .[bench]`).

`brevitas_ptq` follows Brevitas's ImageNet PTQ recipe (brevitas_examples/imagenet_classification/ptq:
`preprocess_for_quantize` -> `layerwise_quantize` -> init forward -> GPFQ or GPTQ -> bias correction),
restricted to what our own methods do, so the two can be compared like for like:

- weights only: every Conv2d and Linear (first and last included) becomes a QuantConv2d/QuantLinear with
  `input_quant=None, bias_quant=None`; activations, biases and the Normalize layer stay float.
- weight quantizer: `Int8WeightPerChannelFloat.let(bit_width=bits)`, i.e. symmetric, one float scale per
  output channel from Brevitas's default statistic (max |w| of the channel), frozen after the first
  forward (`ParameterFromStatsFromParameterScaling`, as the recipe sets). `narrow_range=True` (that
  quantizer's own default; the recipe's CLI turns it off) gives the codes {-(2^(b-1)-1) .. 2^(b-1)-1},
  our symmetric level set (2 bits is ternary). At 1 bit the same quantizer with `quant_type=BINARY` and
  the `AVE` statistic: sign(w) * mean|w| per output channel, our binary {-1, +1} scheme.
- BatchNorm is folded into the conv before it (`merge_bn=True`, the recipe's default). With a positive
  per-output-channel scale and a symmetric grid this gives the same grid as quantizing the unfolded
  conv, but the returned model has no BatchNorm left (no BN re-estimation possible) and every conv has
  a float bias. Graph equalization (the recipe's CLI runs 20 iterations) is off, as in our methods.
- algo: "nearest" = round to nearest on that grid; "gptq" = `gptq_mode` (GPTQ); "gpfq" = `gpfq_mode`
  with `GPFQ` (GPFQ), both with the recipe's defaults (no act_order, original weights kept so float
  references stay exact). `bias_correction` then runs `bias_correction_mode` over the calibration set.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

try:
    import brevitas.nn as qnn
    from brevitas.core.scaling.standalone import ParameterFromStatsFromParameterScaling
    from brevitas.graph.calibrate import bias_correction_mode
    from brevitas.graph.gpfq import GPFQ, gpfq_mode
    from brevitas.graph.gptq import gptq_mode
    from brevitas.graph.quantize import layerwise_quantize, preprocess_for_quantize
    from brevitas.inject.enum import QuantType, StatsOp
    from brevitas.quant.scaled_int import Int8WeightPerChannelFloat, Int8WeightPerChannelFloatMSE
except ImportError as e:  # pragma: no cover
    raise ImportError(f"benchmarks/brevitas_peer.py needs Brevitas: pip install -e '.[bench]' ({e})") from None

ALGOS = ("nearest", "gptq", "gpfq")
BITS = (1, 2, 3, 4, 8)
BATCH = 128


def _weight_quant(bits: int, scale: str):
    if scale == "mse" and bits > 1:  # the recipe's --weight-quant-calibration-type mse: scale by MSE search
        return Int8WeightPerChannelFloatMSE.let(bit_width=bits, narrow_range=True)
    quant = Int8WeightPerChannelFloat.let(
        bit_width=bits, narrow_range=True, scaling_impl=ParameterFromStatsFromParameterScaling)
    if bits == 1:
        quant = quant.let(quant_type=QuantType.BINARY, scaling_stats_op=StatsOp.AVE)
    return quant


def _gpxq(mode, batches) -> None:
    # The recipe's apply_gptq / apply_gpfq loop: one layer per pass over the calibration set.
    with mode as algo:
        for _ in range(algo.num_layers):
            for xb in batches:
                algo.model(xb)
            algo.update()


def brevitas_ptq(model: nn.Module, calib_x: torch.Tensor, bits: int, algo: str,
                 bias_correction: bool = True, scale: str = "mse") -> nn.Module:
    """A weight-only, per-output-channel, symmetric `bits`-bit copy of the float `model` made by
    Brevitas (BatchNorm folded; see the module docstring), refined by `algo` in ("nearest", "gptq",
    "gpfq") and optionally bias-corrected over `calib_x`. `scale`: "mse" (Brevitas's MSE scale search,
    `Int8WeightPerChannelFloatMSE`; much better at 2-3 bits) or "max" (max|w|/qmax); binary always uses mean|w|. The caller's model is not modified; the
    result is an eval-mode torch.fx GraphModule taking the same inputs."""
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    param = next(model.parameters())
    batches = calib_x.to(device=param.device, dtype=param.dtype).split(BATCH)
    kwargs = dict(weight_quant=_weight_quant(bits, scale), input_quant=None, bias_quant=None,
                  return_quant_tensor=False, dtype=param.dtype, device=param.device)
    # torch.no_grad rather than inference_mode: Brevitas creates parameters (scales, corrected
    # biases) during these passes, and inference tensors could not be used by autograd later.
    with torch.no_grad():
        qmodel = preprocess_for_quantize(copy.deepcopy(model).eval(), merge_bn=True, equalize_iters=0)
        qmodel = layerwise_quantize(
            qmodel, compute_layer_map={nn.Conv2d: (qnn.QuantConv2d, kwargs), nn.Linear: (qnn.QuantLinear, kwargs)})
        qmodel.eval()
        qmodel(batches[0])  # initialises the per-channel scales from the (folded) float weights
        if algo == "gptq":
            _gpxq(gptq_mode(qmodel, use_quant_activations=False, create_weight_orig=True, act_order=False), batches)
        elif algo == "gpfq":
            _gpxq(gpfq_mode(qmodel, create_weight_orig=True, act_order=False, algorithm_impl=GPFQ), batches)
        if bias_correction:
            with bias_correction_mode(qmodel):
                for xb in batches:
                    qmodel(xb)
    return qmodel.eval()
