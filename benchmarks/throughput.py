"""Training throughput of a zoo model on this CPU: images/s of forward + backward + Adam step by batch
size and thread count (what LQ's and STE's `batch_size` for CNNs was chosen from; docs/lq.md).

    python benchmarks/throughput.py --model resnet20 --shape 1,28,28 --batches 32,128,256 --threads 1,2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qadmm.zoo import build_model  # noqa: E402


def images_per_second(model: torch.nn.Module, shape: tuple[int, ...], batch: int, seconds: float) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    model.train()
    done, t0, warm = 0, 0.0, 2
    while True:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        warm -= 1
        if warm == 0:
            t0 = time.perf_counter()
        elif warm < 0:
            done += batch
            if time.perf_counter() - t0 > seconds:
                return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--shape", default="1,28,28")
    ap.add_argument("--batches", default="32,128,256")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    model = build_model(a.model, shape, 10, np.zeros(1, np.float32), np.ones(1, np.float32))
    print(f"| {a.model} | " + " | ".join(f"batch {b}" for b in a.batches.split(",")) + " |")
    print("|---|" + "---|" * len(a.batches.split(",")))
    for t in map(int, a.threads.split(",")):
        torch.set_num_threads(t)
        cells = [f"{images_per_second(model, shape, b, a.seconds):.0f} img/s" for b in map(int, a.batches.split(","))]
        print(f"| {t} thread{'s' if t > 1 else ''} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
