"""Integer code sets and the alternating α/Q fit (thesis Algorithms 4 and 8).

A quantized weight tensor is W ≈ α·Q with Q an integer tensor drawn from a code set and α > 0 a
float32 scale, either one per tensor or one per output channel (axis 0).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
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

    def project(self, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Nearest code to each entry of x (same dtype, and a NumPy array for one: GPTQ's column loop runs
        in NumPy, whose calls cost a tenth of torch's on a few hundred values). Binary maps 0 to +1;
        ties round to even in both."""
        if isinstance(x, np.ndarray):
            if self.scheme == "binary":
                return np.where(x >= 0, 1.0, -1.0).astype(x.dtype)
            return np.clip(np.rint(x), -self.qmax, self.qmax)
        if self.scheme == "binary":
            return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        return torch.clamp(torch.round(x), -self.qmax, self.qmax)

    def project_(self, x: torch.Tensor) -> torch.Tensor:
        """`project` in place (x is overwritten with its nearest codes and returned)."""
        if self.scheme == "binary":
            return x.copy_(torch.where(x >= 0, 1.0, -1.0))
        return x.round_().clamp_(-self.qmax, self.qmax)

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


# The alternation runs on blocks of rows of about this many float64 entries (4 MiB), every pass of
# an iteration on one block before the next: the block stays in cache and no temporary is allocated.
# Rows are independent, so the result is the same as on the whole matrix at once.
ROW_BLOCK = 2**19


def _alternate(v: torch.Tensor, codes: CodeSet, alpha: torch.Tensor, max_iter: int, patience: int):
    """Alternate Q = Π(V/α) and α = <V,Q>/<Q,Q> per row of v (thesis eq. 4.15-4.17 / 5.12-5.15).

    Keeps the best α per row; stops when every row has had `patience` non-improving rounds in a row.
    Returns (alpha, q, err) per row: q = Π(V/α) is recomputed once at the end from the best α, the
    same division and rounding that made it during the rounds, rather than copied every round.
    """
    n_rows, n = v.shape
    step = max(1, ROW_BLOCK // max(n, 1))
    blocks = [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]
    alpha = alpha.clone()
    best_a = alpha.clone()
    q = codes.project(v / alpha[:, None])
    best_e = ((v - best_a[:, None] * q) ** 2).sum(1)
    stall = torch.zeros_like(best_e, dtype=torch.long)
    buf = torch.empty(min(step, n_rows), n, dtype=v.dtype)
    for _ in range(max_iter):
        for s in blocks:
            vb, qb, al, t = v[s], q[s], alpha[s], buf[: s.stop - s.start]
            qq = torch.mul(qb, qb, out=t).sum(1)
            vq = torch.mul(vb, qb, out=t).sum(1)
            a = torch.where(qq > 0, vq / qq.clamp_min(1e-300), al)  # eq. 4.17 / 5.13
            a = torch.where(a > 0, a, al)  # α must stay positive; a sign flip is carried by Q
            codes.project_(torch.div(vb, a[:, None], out=qb))  # eq. 4.16 / 5.14: nearest code
            e = torch.sub(vb, torch.mul(qb, a[:, None], out=t), out=t).square_().sum(1)
            better = e < best_e[s] * (1 - 1e-12)
            best_a[s] = torch.where(better, a, best_a[s])
            best_e[s] = torch.where(better, e, best_e[s])
            stall[s] = torch.where(better, torch.zeros_like(stall[s]), stall[s] + 1)
            alpha[s] = a
        if bool((stall >= patience).all()):
            break
    for s in blocks:  # the best α's codes, as the round that found it made them
        codes.project_(torch.div(v[s], best_a[s, None], out=q[s]))
    return best_a, q, best_e


# Large code sets (qmax > SMALL_SET) screen every grid max|v|/k on a sample of at most this many
# (row, k, sample) triples in all (but 64 samples a row at least), so the screen costs less than
# one alternation on a big layer.
SMALL_SET = 16
SCREEN_BUDGET = 2**24
SCREEN_KEEP = 3


def _screen(rows: torch.Tensor, codes: CodeSet, absmax: torch.Tensor, tol: torch.Tensor) -> list[torch.Tensor]:
    """The most promising grids max|v|/k, k = 1..qmax, per row: SCREEN_KEEP values of k.

    Each k is scored by one projection and the closed-form scale (eq. 4.16, 4.17) on an evenly
    strided sample of the row (no randomness). Scores within `tol` of a row's best are ties and
    rank by k, smallest first: when the row is exactly α·Q with max|Q| = M, every multiple of M
    fits exactly, and M, the coarsest, is the one the fit must return.
    """
    n_rows, n = rows.shape
    take = min(n, max(64, SCREEN_BUDGET // (n_rows * codes.qmax)))
    x = rows[:, torch.linspace(0, n - 1, take).round().long()] if take < n else rows
    xx = (x * x).sum(1)
    score = torch.empty(n_rows, codes.qmax, dtype=rows.dtype)
    for k in range(1, codes.qmax + 1):  # one (rows, sample) slab at a time: fast, small
        q = codes.project(x * (k / absmax)[:, None])
        xq, qq = (x * q).sum(1), (q * q).sum(1)
        score[:, k - 1] = xx - torch.where(qq > 0, xq * xq / qq.clamp_min(1e-300), torch.zeros_like(qq))
    # the sample's tolerance scales with its share of the row's energy
    tied = score <= score.amin(1, keepdim=True) + (tol * xx / (rows * rows).sum(1).clamp_min(1e-300))[:, None]
    ks = torch.arange(1, codes.qmax + 1, dtype=rows.dtype)
    key = torch.where(tied, (ks - codes.qmax - 1) / (codes.qmax + 1), score)  # ties first (in (-1, 0)), by k
    best = key.topk(min(SCREEN_KEEP, codes.qmax), dim=1, largest=False).indices
    return [ks[best[:, j]] for j in range(best.shape[1])]


def _coarsest(q: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide each row's codes by their greatest common divisor g and multiply α by g: the same
    weights α·Q, on the coarsest grid that holds them, so the pair a fit returns is unique."""
    g = torch.ones(len(q), dtype=torch.long)
    rest = (q.abs() != 1).all(1).nonzero().squeeze(1)  # a row holding a code ±1 is already coarsest
    if len(rest):
        h = q[rest].abs().long()
        while h.shape[1] > 1:
            if h.shape[1] % 2:
                h = torch.cat([h, torch.zeros_like(h[:, :1])], 1)
            h = torch.gcd(h[:, 0::2], h[:, 1::2])
        g[rest] = h[:, 0].clamp_min(1)
    return q / g[:, None].to(q.dtype), a * g.to(a.dtype)


@contextmanager
def one_thread():
    """torch on one thread inside the block (it yields the number of threads before). The fit's row
    sums are then added in the same order on every machine (with 2 threads 12 of 74 zoo layers got
    other codes than with 1), and the thousands of small operations of the alternation no longer
    wait at OpenMP barriers for a thread that another job on the machine holds
    (benchmarks/calib_speed.py: 4x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


# A fit of at least this many weights runs its starts side by side, one start per thread (each
# start on one thread, so its codes are the same as run alone; the starts are compared in order).
PARALLEL_STARTS = 2**16
# A tensor of at least this many weights (binary codes excepted) chooses its start on a sample of
# this size (per row: SAMPLED_FIT // rows columns, 64 at least, when that is fewer than the row
# has) and refines it on the whole rows for REFINE_ROUNDS rounds, in REFINE_PIECES pieces of rows:
# the search then costs about the same however large the layer (resnet18's and mobilenet_v2's
# large layers: 0.4 % more squared error per channel on average than the search on every weight,
# at 8 and 4 bits, in under half the time; docs/speed.md).
SAMPLED_FIT = 2**18
REFINE_ROUNDS = 10
REFINE_PIECES = 8


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

    Without `alpha0` several starts are tried and the best pair kept: the mean-based start and
    the grids max|v|/k (every k for small code sets; for large ones the few k that score best on
    a strided sample of the row, see `_screen`). So the result is never worse than the max-based
    start max|v|/qmax, and a tensor that is already α·Q (float32) comes back as the same pair:
    refitting the result returns it, codes equal (ties in error go to the coarsest grid, and a
    returned row's codes have no common divisor). A non-binary tensor of SAMPLED_FIT weights or more compares
    those starts on a strided sample of its columns and refines only the winner, beside the
    max-based start, on every weight (the search's cost then stops growing with the layer; within
    1 % of the full search's error, see `tests/test_codes.py`). With `alpha0` (a warm start, e.g. the previous
    ADMM iteration's α) only that start is used: the fast path for repeated calls. Runs on one
    thread (`one_thread`): the same codes on every machine.
    """
    with one_thread() as threads:
        return _fit(v, codes, per_channel, alpha0, max_iter, patience, threads)


def _fit(v: torch.Tensor, codes: CodeSet, per_channel: bool, alpha0: torch.Tensor | None, max_iter: int, patience: int,
         workers: int = 1) -> Fit:
    if not torch.isfinite(v).all():
        raise ValueError("cannot quantize a tensor with NaN or infinite values")
    shape = v.shape
    rows = v.detach().to(torch.float64).reshape(shape[0] if per_channel and v.dim() > 0 else 1, -1)
    absmax = rows.abs().amax(1)
    zero = absmax == 0
    safe_max = torch.where(zero, torch.ones_like(absmax), absmax)
    # Ties: equal error up to rounding (an exact grid and its multiples, a one-element row)
    tol = 1e-12 * (rows**2).sum(1)
    n_rows, n = rows.shape
    take = max(64, SAMPLED_FIT // n_rows)
    parts = 1  # pieces of rows each start is split into, one task each
    if alpha0 is not None:
        starts = [(alpha0.detach().to(torch.float64).reshape(-1).expand(n_rows).clone(), max_iter)]
    elif rows.numel() >= SAMPLED_FIT and take < n and codes.scheme != "binary":  # binary's mean start is exact
        # a large tensor: every start is compared on an evenly strided sample of each row's columns
        # (SAMPLED_FIT weights in all), and the sample's best α is refined on the whole row beside
        # the max-based start (so the result is never worse than that start). The refinement runs
        # on a fixed number of pieces of rows, each stopping on its own: the tasks balance between
        # the threads when another job holds a core, and the codes do not depend on the threads.
        sample = _fit(rows[:, torch.linspace(0, n - 1, take).round().long()], codes, True, None, max_iter, patience, workers)
        found = torch.where(sample.alpha > ZERO_SCALE, sample.alpha.double(), safe_max / codes.qmax)
        starts = [(safe_max / codes.qmax, REFINE_ROUNDS), (found, REFINE_ROUNDS)]
        parts = min(n_rows, REFINE_PIECES)
    else:
        mean_abs = rows.abs().mean(1)
        # mean-based start: exact for binary (α* = mean|v|, §5 of algorithms.md), a good guess otherwise
        mean_start = torch.where(mean_abs > 0, mean_abs * (1.0 if codes.scheme == "binary" else 2.0 / max(codes.qmax, 1)), safe_max)
        if codes.qmax <= SMALL_SET:
            ks = [torch.full_like(safe_max, k) for k in range(1, codes.qmax + 1)]
        else:
            ks = [torch.full_like(safe_max, codes.qmax), *_screen(rows, codes, safe_max, tol)]
        starts = [(a0, max_iter) for a0 in [safe_max / k for k in ks] + [mean_start]]
    pieces = [slice(i * n_rows // parts, (i + 1) * n_rows // parts) for i in range(parts)]
    tasks = [(a0, rounds, s) for a0, rounds in starts for s in pieces]

    def run(task: tuple[torch.Tensor, int, slice]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a0, rounds, s = task
        return _alternate(rows[s], codes, torch.where(a0[s] > 0, a0[s], safe_max[s] / codes.qmax), rounds, patience)

    if workers > 1 and len(tasks) > 1 and rows.numel() >= PARALLEL_STARTS:
        with ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            done = list(pool.map(run, tasks))
    else:
        done = [run(task) for task in tasks]
    # one result per start, its pieces joined (a start in one piece is taken as it is: no copy)
    results = done if parts == 1 else [tuple(torch.cat(x) for x in zip(*done[i:i + parts])) for i in range(0, len(done), parts)]
    best = None
    for a, q, e in results:  # in the order of the starts, whichever finished first
        if best is None:
            best = (a, q, e)
        else:
            coarser = q.abs().amax(1) < best[1].abs().amax(1)
            better = (e < best[2] - tol) | ((e <= best[2] + tol) & coarser)
            best = (torch.where(better, a, best[0]), torch.where(better[:, None], q, best[1]), torch.where(better, e, best[2]))
    q, a = _coarsest(best[1], best[0])
    # All-zero rows: codes 0 (binary: +1 with a negligible scale) so W stays (numerically) 0.
    a = torch.where(zero, torch.full_like(a, ZERO_SCALE), a)
    q = torch.where(zero[:, None], codes.project(torch.zeros_like(q)), q)
    alpha = a.to(torch.float32)
    alpha = torch.where(alpha > 0, alpha, torch.full_like(alpha, ZERO_SCALE))
    qt = q.reshape(shape).to(codes.storage_dtype)
    alpha = alpha if (per_channel and v.dim() > 0) else alpha.reshape(())
    err = float(((v.detach().to(torch.float32) - dequantize(qt, alpha)) ** 2).sum())
    return Fit(q=qt, alpha=alpha, error=err)
