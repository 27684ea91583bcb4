"""Integer code sets and the alternating α/Q fit (thesis Algorithms 4 and 8).

A quantized weight tensor is W ≈ α·Q with Q an integer tensor drawn from a code set and α > 0 a
float32 scale, either one per tensor or one per output channel (axis 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("binary", "symmetric", "thesis")
# A channel whose values are all zero gets this scale: α must stay > 0 and finite everywhere
# (ONNX scales, the inverse in requantization), and with codes 0 the weights stay exactly 0.
ZERO_SCALE = 1e-8


@dataclass(frozen=True)
class CodeSet:
    """The integer codes a weight may take.

    - ``binary`` (bits=1): {-1, +1}
    - ``symmetric`` (bits>=2): {-(2^(N-1)-1), ..., 2^(N-1)-1}; 2 bits is ternary, 8 bits is ±127
    - ``thesis`` (bits>=1): {-(2^N-1), ..., 2^N-1}, sign plus N magnitude bits (stored in N+1 bits)
    """

    bits: int
    scheme: str = "symmetric"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}: use one of {', '.join(SCHEMES)}")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 1 to 8, got {self.bits!r}")
        if self.scheme == "binary" and self.bits != 1:
            raise ValueError(f"scheme 'binary' has 1 bit, got bits={self.bits}: use --bits 1 or --scheme symmetric")
        if self.scheme == "symmetric" and self.bits < 2:
            raise ValueError("scheme 'symmetric' needs bits >= 2 (1 bit would only hold 0): use --scheme binary for 1 bit")

    @classmethod
    def default(cls, bits: int) -> "CodeSet":
        """The scheme a user gets when naming only the bits: binary at 1 bit, symmetric otherwise."""
        return cls(bits, "binary" if bits == 1 else "symmetric")

    @property
    def qmax(self) -> int:
        if self.scheme == "binary":
            return 1
        if self.scheme == "symmetric":
            return 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1

    @property
    def storage_bits(self) -> int:
        """Bits one code needs in two's complement (binary: one sign bit)."""
        return self.bits + 1 if self.scheme == "thesis" else self.bits

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.storage_bits <= 8 else torch.int16

    @property
    def levels(self) -> list[int]:
        if self.scheme == "binary":
            return [-1, 1]
        return list(range(-self.qmax, self.qmax + 1))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code to each entry of x (same dtype as x). Binary maps 0 to +1."""
        if self.scheme == "binary":
            return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        return torch.clamp(torch.round(x), -self.qmax, self.qmax)

    def contains(self, q: torch.Tensor) -> bool:
        q = q.to(torch.int32)
        if self.scheme == "binary":
            return bool(((q == 1) | (q == -1)).all())
        return bool((q.abs() <= self.qmax).all())

    def describe(self) -> str:
        return f"{self.scheme} {self.bits}-bit (codes ±{self.qmax}{'' if self.scheme != 'binary' else ', no 0'})"


@dataclass
class Fit:
    """Result of fitting W ≈ α·Q: codes q (int8/int16), scale alpha (float32, shape () or (C,))."""

    q: torch.Tensor
    alpha: torch.Tensor
    error: float  # ||V - α·Q||², the squared error of the returned pair

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.alpha)


def dequantize(q: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """W = α·Q in float32, one rounding per entry: the same product ONNX DequantizeLinear computes."""
    a = alpha.to(torch.float32)
    if a.dim() == 1:
        a = a.reshape(-1, *([1] * (q.dim() - 1)))
    return q.to(torch.float32) * a


def _alternate(v: torch.Tensor, codes: CodeSet, alpha: torch.Tensor, max_iter: int, patience: int):
    """Alternate Q = Π(V/α) and α = <V,Q>/<Q,Q> per row of v (thesis eq. 4.15-4.17 / 5.12-5.15).

    Keeps the best pair per row, stops a row's search after `patience` non-improving rounds.
    Returns (alpha, q, err) per row.
    """
    best_a = alpha.clone()
    best_q = codes.project(v / alpha[:, None])
    best_e = ((v - best_a[:, None] * best_q) ** 2).sum(1)
    stall = torch.zeros_like(best_e, dtype=torch.long)
    q = best_q
    for _ in range(max_iter):
        qq = (q * q).sum(1)
        a = torch.where(qq > 0, (v * q).sum(1) / qq.clamp_min(1e-300), alpha)  # eq. 4.17 / 5.13
        a = torch.where(a > 0, a, alpha)  # α must stay positive; a sign flip is carried by Q
        q = codes.project(v / a[:, None])  # eq. 4.16 / 5.14: nearest code
        e = ((v - a[:, None] * q) ** 2).sum(1)
        better = e < best_e * (1 - 1e-12)
        best_a = torch.where(better, a, best_a)
        best_q = torch.where(better[:, None], q, best_q)
        best_e = torch.where(better, e, best_e)
        stall = torch.where(better, torch.zeros_like(stall), stall + 1)
        if bool((stall >= patience).all()):
            break
        alpha = a
    return best_a, best_q, best_e


def fit(
    v: torch.Tensor,
    codes: CodeSet,
    per_channel: bool = False,
    *,
    alpha0: torch.Tensor | None = None,
    max_iter: int = 30,
    patience: int = 3,
) -> Fit:
    """Fit α > 0 and codes Q to v so that ||v - α·Q||² is small (thesis Algorithm 4/8).

    Without `alpha0` several starts are tried (max-based, mean-based, and max|v|/k for small k)
    and the best pair kept, so the result is never worse than any of those starting scales and
    refitting α·Q returns the same pair. With `alpha0` (a warm start, e.g. the previous ADMM
    iteration's α) only that start is used: the fast path for repeated calls.
    """
    if not torch.isfinite(v).all():
        raise ValueError("cannot quantize a tensor with NaN or infinite values")
    shape = v.shape
    rows = v.detach().to(torch.float64).reshape(shape[0] if per_channel and v.dim() > 0 else 1, -1)
    absmax = rows.abs().amax(1)
    zero = absmax == 0
    safe_max = torch.where(zero, torch.ones_like(absmax), absmax)
    if alpha0 is not None:
        starts = [alpha0.detach().to(torch.float64).reshape(-1).expand(rows.shape[0]).clone()]
    else:
        mean_abs = rows.abs().mean(1)
        # mean-based start: exact for binary (α* = mean|v|, §5 of algorithms.md), a good guess otherwise
        mean_start = torch.where(mean_abs > 0, mean_abs * (1.0 if codes.scheme == "binary" else 2.0 / max(codes.qmax, 1)), safe_max)
        # small code sets: also max|v|/k for every k, so a tensor that already is α·Q is found again
        ks = sorted({codes.qmax, *(range(1, codes.qmax + 1) if codes.qmax <= 16 else [])})
        starts = [safe_max / k for k in ks] + [mean_start]
    # Ties (equal error up to rounding, e.g. a one-element row fits any code exactly) go to the
    # pair with the larger codes, so the choice is canonical and refitting α·Q returns the same pair.
    tol = 1e-12 * (rows**2).sum(1)
    best = None
    for a0 in starts:
        a0 = torch.where(a0 > 0, a0, safe_max / codes.qmax)
        a, q, e = _alternate(rows, codes, a0, max_iter, patience)
        if best is None:
            best = (a, q, e)
        else:
            bigger = q.abs().amax(1) > best[1].abs().amax(1)
            better = (e < best[2] - tol) | ((e <= best[2] + tol) & bigger)
            best = (torch.where(better, a, best[0]), torch.where(better[:, None], q, best[1]), torch.where(better, e, best[2]))
    a, q, e = best
    # All-zero rows: codes 0 (binary: +1 with a negligible scale) so W stays (numerically) 0.
    a = torch.where(zero, torch.full_like(a, ZERO_SCALE), a)
    q = torch.where(zero[:, None], codes.project(torch.zeros_like(q)), q)
    alpha = a.to(torch.float32)
    alpha = torch.where(alpha > 0, alpha, torch.full_like(alpha, ZERO_SCALE))
    qt = q.reshape(shape).to(codes.storage_dtype)
    alpha = alpha if (per_channel and v.dim() > 0) else alpha.reshape(())
    err = float(((v.detach().to(torch.float32) - dequantize(qt, alpha)) ** 2).sum())
    return Fit(q=qt, alpha=alpha, error=err)
