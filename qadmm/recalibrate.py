"""Repairing the float statistics a quantized network inherits: BatchNorm re-estimation and bias correction.

Quantizing a convolution shifts and rescales its outputs, so the BatchNorm after it normalises with a
mean and variance that no longer hold; every later layer then sees mis-scaled inputs. Both repairs
are label-free and cheap (a few forward passes over ~2k training images):

- **BatchNorm re-estimation**: reset every BatchNorm's running statistics and recompute them with the
  quantized weights (cumulative average over the calibration batches, the network in train mode for
  BatchNorm only), then back to eval.
- **Bias correction** (Nagel et al., ICCV 2019, "Data-Free Quantization", §4.2, empirical form): for a
  quantized layer with a bias and no BatchNorm right after it, add E[W x] − E[Ŵ x] = (W − Ŵ)·E[x] to
  the bias, E[x] over the layer's inputs in the quantized network, layers in forward order.
"""
from __future__ import annotations

import torch
from torch import nn

from qadmm.layer_inputs import groups, input_mean, stop_before, times_input

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 128, stop_at: nn.Module | None = None) -> int:
    """Recompute the running mean/var of every BatchNorm of `model` (in place) on inputs x.
    Returns how many BatchNorm layers were re-estimated; the model is left in eval mode.

    With `stop_at`, each forward pass stops where that module's input is ready: the BatchNorms it
    did not reach are left reset, for a caller that re-estimates them again before they are used
    (the layer walk: each step needs only what lies before the next layer, the last step everything).
    Their statistics do not depend on the old ones (train mode normalises with the batch's own). A
    model with `stream_batchnorm` (a graph inside a layer walk) may go on from where the previous call stopped."""
    bns = batchnorms(model)
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.momentum = None  # cumulative average over the batches, not an exponential one
        bn.train()
    # Equal-size batches (a short last one is dropped when there are full ones): the cumulative average
    # of the batch means is then the mean over the samples used; a batch of one has no variance.
    starts = range(0, len(x) - len(x) % batch_size if len(x) >= batch_size else 1, batch_size)
    batches = [slice(i, i + batch_size) for i in starts if len(x[i:i + batch_size]) > 1]
    stream = getattr(model, "stream_batchnorm", None)  # a layer walk's model may go on from where it stopped
    try:
        if stream is None or not stream(x, batches, stop_at):
            for bn in bns:
                bn.reset_running_stats()
            with stop_before(stop_at) as run:
                for b in batches:
                    run(model, x[b])
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        model.eval()
    return len(bns)


def followed_by_batchnorm(model: nn.Module) -> set[str]:
    """Names of the leaf modules registered right before a BatchNorm (conv → BN in the zoo and in
    most user code): their output mean is re-estimated by the BatchNorm, not corrected in the bias."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    return {leaves[i][0] for i in range(len(leaves) - 1) if isinstance(leaves[i + 1][1], BATCHNORMS)}


@torch.no_grad()
def correct_bias(model: nn.Module, float_weights: dict[str, torch.Tensor], x: torch.Tensor,
                 batch_size: int = 256) -> list[str]:
    """Nagel et al. 2019 bias correction, in place, for the layers named in `float_weights` (their
    float W; the model holds Ŵ) that have a bias and no BatchNorm after them. Returns the corrected names."""
    modules = dict(model.named_modules())
    skip = followed_by_batchnorm(model)
    done = []
    for name, w in float_weights.items():
        m = modules[name]
        if name in skip or getattr(m, "bias", None) is None:
            continue
        mean_x = input_mean(model, m, x, batch_size)  # E[x] with the quantized layers before it
        dw = (w.reshape(w.shape[0], -1) - m.weight.reshape(w.shape[0], -1)).double()
        m.bias += times_input(dw, mean_x, groups(m)).to(m.bias.dtype)  # E[Wx] − E[Ŵx]
        done.append(name)
    return done


def recalibrate(model: nn.Module, float_weights: dict[str, torch.Tensor], calib_x: torch.Tensor,
                bn: bool, bias: bool) -> dict:
    """Apply the requested repairs in place (bias correction first, then BatchNorm re-estimation,
    which sees the corrected biases) and return a record for the artifact's metadata."""
    record: dict = {"calib_samples": len(calib_x), "bn_reestimate": bn, "bias_correction": bias}
    if bias:
        record["bias_corrected"] = correct_bias(model, float_weights, calib_x)
    if bn:
        record["bn_layers"] = reestimate_bn(model, calib_x)
    return record
