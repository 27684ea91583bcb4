"""onnxruntime's integer arithmetic on x86 (toolchains.md §3), in PyTorch: the reference that
`qexport verify` compares integer graphs with, and what each op kind's `integer` uses.

QuantizeLinear = round_half_even(clamp(x / s, -zp, 255 - zp)) + zp (divide, not multiply by 1/s);
QLinearConv/QGemm: int32 acc = Σ(x_q - x_zp)·w_q + b_q, then fp32(acc)·m with m = (x_s·w_s)/y_s
computed in fp32 in that order, clamp, round half to even, add y_zp. QLinearAdd (by this CPU's kernel)
and QLinearGlobalAveragePool are emulated in fp32 the way MLAS computes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from qexport.ops.emit import IntLayer
from qexport.cpu import cpu_flags


@dataclass(frozen=True)
class QParams:
    """uint8 quantization of one activation value: scale and zero point."""

    scale: np.float32
    zero_point: np.uint8


def to_uint8(x: torch.Tensor, p: QParams) -> torch.Tensor:
    """ORT QuantizeLinear to uint8: x / s in fp32, clamp to [-zp, 255-zp], round half even, + zp.
    NaN becomes code 0 and ±inf saturates, as in onnxruntime (a float island's 0/0 must not become
    an arbitrary integer here)."""
    zp = float(p.zero_point)
    v = torch.nan_to_num(x.to(torch.float32) / torch.tensor(p.scale, dtype=torch.float32), nan=-zp)
    return torch.round(torch.clamp(v, -zp, 255.0 - zp)).to(torch.int64) + int(p.zero_point)


def from_uint8(q: torch.Tensor, p: QParams) -> torch.Tensor:
    return (q - int(p.zero_point)).to(torch.float32) * torch.tensor(p.scale, dtype=torch.float32)


def requantize(acc: torch.Tensor, m: np.ndarray, p: QParams, channel_dim: int) -> torch.Tensor:
    """fp32(acc) · m (per channel), clamp, round half even, + y_zp: MlasRequantizeOutput."""
    mt = torch.as_tensor(np.asarray(m, np.float32))
    if mt.dim() == 1:
        mt = mt.reshape(-1, *([1] * (acc.dim() - channel_dim - 1)))
    zp = float(p.zero_point)
    f = acc.to(torch.int32).to(torch.float32) * mt
    return torch.round(torch.clamp(f, -zp, 255.0 - zp)).to(torch.int64) + int(p.zero_point)


def qlinear(il: IntLayer, xq: torch.Tensor, px: QParams, py: QParams,
            acc_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """QLinearConv / QGemm: `acc_fn(x - x_zp, w)` is the layer's integer accumulation (conv or
    matmul), done in float64 where every value is an exact integer (|acc| << 2^53)."""
    cout = il.q.shape[0]
    w = torch.as_tensor(il.q.astype(np.float64))
    acc = acc_fn((xq - int(px.zero_point)).to(torch.float64), w)
    acc = acc.round().to(torch.int64) + torch.as_tensor(il.bias, dtype=torch.int64).reshape(-1, *([1] * (acc.dim() - 2)))
    scale = (np.float32(px.scale) * np.broadcast_to(il.w_scale, (cout,)).astype(np.float32)) / np.float32(py.scale)  # m = (x_s·w_s)/y_s
    return requantize(acc, scale.astype(np.float32), py, 1)


def fma32(x: torch.Tensor, y: float, z: torch.Tensor | float) -> torch.Tensor:
    """fp32 fused multiply-add x·y + z with one rounding, for x an 8-bit integer: the product is
    exact in float64, the sum is rounded to float64 then fp32 (a double rounding that differs from
    one only at an exact float64 tie, never seen in the probe of `qadd`)."""
    return (x.to(torch.float64) * float(np.float32(y)) + z).to(torch.float32)


def qadd(a: torch.Tensor, pa: QParams, b: torch.Tensor, pb: QParams, pc: QParams, avx2: bool | None = None) -> torch.Tensor:
    """MLAS QLinearAdd on x86, the kernel onnxruntime picks for this CPU (`avx2`: default this one's
    flags). ra = sa/sc, rb = sb/sc in fp32. AVX2 (qladd_avx2.cpp, built with FMA):
    k = zc − fma(ra, za, rb·zb), c = fma(a, ra, fma(b, rb, k)); SSE2 (qladd.cpp):
    k = zc − (ra·za + rb·zb), c = (k + a·ra) + b·rb; then round half even and clamp. The AVX2 form
    matches onnxruntime on all 65,536 (a, b) pairs for 300 random scales and zero points; the
    plain fp32 sum it replaced differed in ~1 value in 10^6 (a ResNet-20 verify failed by 2 steps)."""
    if avx2 is None:
        avx2 = {"avx2", "fma"} <= cpu_flags()
    ra, rb, k = qadd_constants(pa, pb, pc, avx2)
    if avx2:
        f = fma32(a, ra, fma32(b, rb, float(k)))
    else:
        f = (float(k) + a.to(torch.float32) * float(ra)) + b.to(torch.float32) * float(rb)  # each step in fp32
    return torch.clamp(torch.round(f), 0, 255)


def qadd_constants(pa: QParams, pb: QParams, pc: QParams, avx2: bool = True) -> tuple[np.float32, np.float32, np.float32]:
    """(ra, rb, k) of MLAS QLinearAdd (see `qadd`): ra = sa/sc, rb = sb/sc and the zero-point term k in fp32."""
    f32 = np.float32
    ra, rb = f32(f32(pa.scale) / f32(pc.scale)), f32(f32(pb.scale) / f32(pc.scale))
    za, zb, zc = f32(int(pa.zero_point)), f32(int(pb.zero_point)), f32(int(pc.zero_point))
    if avx2:
        return ra, rb, f32(zc - f32(np.float64(ra) * za + np.float64(f32(rb * zb))))
    return ra, rb, f32(zc - f32(f32(ra * za) + f32(rb * zb)))


def qgap(x: torch.Tensor, px: QParams, py: QParams) -> torch.Tensor:
    """MLAS QLinearGlobalAveragePool: (Σx - n·zx) · (sx / (sy·n)) in fp32, round, + zy, clamp."""
    dims = tuple(range(2, x.dim()))
    n = int(np.prod([x.shape[d] for d in dims]))
    acc = x.sum(dim=dims, keepdim=True) - n * int(px.zero_point)
    s = torch.tensor(qgap_scale(px, py, n), dtype=torch.float32)
    return torch.clamp(torch.round(acc.to(torch.float32) * s) + int(py.zero_point), 0, 255)


def qgap_scale(px: QParams, py: QParams, n: int) -> np.float32:
    """sx / (sy·n) in fp32, the multiplier of QLinearGlobalAveragePool over n values."""
    return np.float32(np.float32(px.scale) / (np.float32(py.scale) * np.float32(n)))


