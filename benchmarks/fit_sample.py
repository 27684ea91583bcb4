"""The α/Q fit of a large layer on a sample against the search on every weight, side by side.

From `qadmm.codes.SAMPLED_FIT` weights a layer's scale search runs on an evenly strided sample of
each row and refines only the sample's best α on every weight. This compares that fit with the
search on every weight (the same function with the threshold out of reach) on every layer of that
size in the given zoo models (benchmarks/zoo_models.py, seeded weights), per channel and per tensor:
the squared error's ratio (sampled over full: mean, min, max over the layers) and the time ratio,
both on one thread, in one run.

    python benchmarks/fit_sample.py
    python benchmarks/fit_sample.py --models resnet18,convnext_tiny --bits 8,4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import qadmm.codes as C  # noqa: E402
from zoo_models import build  # noqa: E402


def timed_fit(w: torch.Tensor, codes: C.CodeSet, per_channel: bool, threshold: int) -> tuple[float, float]:
    """(squared error, seconds) of the fit with the sampling threshold set to `threshold`."""
    before, C.SAMPLED_FIT = C.SAMPLED_FIT, threshold
    try:
        t = time.perf_counter()
        f = C.fit(w, codes, per_channel)
        return f.error, time.perf_counter() - t
    finally:
        C.SAMPLED_FIT = before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,mobilenet_v2", help="names of zoo_models.ZOO")
    ap.add_argument("--bits", default="8,4,2", help="symmetric code sets to fit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    layers = [(f"{name}:{n}", p.detach()) for name in args.models.split(",") for n, p in build(name).named_parameters()
              if n.endswith("weight") and p.dim() >= 2 and p.numel() >= C.SAMPLED_FIT]
    print(f"{len(layers)} layers of >= {C.SAMPLED_FIT} weights in {args.models}")
    print("| bits | per | layers | error ratio mean | min | max | time full / sampled |")
    print("|---|---|---|---|---|---|---|")
    for bits in (int(b) for b in args.bits.split(",")):
        for per_channel in (True, False):
            ratios, t_full, t_sampled = [], 0.0, 0.0
            for _, w in layers:
                e_s, s_s = timed_fit(w, C.CodeSet.default(bits), per_channel, C.SAMPLED_FIT)
                e_f, s_f = timed_fit(w, C.CodeSet.default(bits), per_channel, 2**62)
                ratios.append(e_s / max(e_f, 1e-30))
                t_full, t_sampled = t_full + s_f, t_sampled + s_s
            r = torch.tensor(ratios, dtype=torch.float64)
            print(f"| {bits} | {'channel' if per_channel else 'tensor'} | {len(layers)} | {r.mean():.4f} | {r.min():.4f} | "
                  f"{r.max():.4f} | {t_full / t_sampled:.2f} |", flush=True)


if __name__ == "__main__":
    main()
