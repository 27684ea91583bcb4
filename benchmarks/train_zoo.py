"""Train a zoo architecture (benchmarks/zoo_models.py: fashion_mobilenet_v2, fashion_vit) on Fashion-MNIST,
as a user trains their own model in plain PyTorch, and save its state_dict (safetensors) with a card.

    OMP_NUM_THREADS=1 python benchmarks/train_zoo.py --factory fashion_vit --epochs 15 -o models/fashion-vit.safetensors

Recipe: AdamW (lr 2e-3, weight decay 0.05), one warm-up epoch then cosine, batch 128, random ±2 px
shifts, label smoothing 0.1; the epoch with the best validation accuracy (10% of the training
images, seed 0) is kept. Inputs are the raw pixels scaled to [0, 1].
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo_models  # noqa: E402
from qadmm.data import load_dataset  # noqa: E402


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    return torch.roll(x, (dy, dx), (2, 3))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.as_tensor(x[i:i + 512])).argmax(1) for i in range(0, len(x), 512)])
    return float((pred.numpy() == y).mean() * 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factory", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    data = load_dataset("fashion-mnist", seed=a.seed)
    x, y = data.x_train / 255.0, data.y_train
    model = getattr(zoo_models, a.factory)(data.input_shape, 10)
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=0.05)
    steps = a.epochs * math.ceil(len(x) / 128)
    warm = math.ceil(len(x) / 128)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(a.seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    best, best_state, history, t0 = -1.0, None, [], time.perf_counter()
    for epoch in range(a.epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            xb = shift(torch.as_tensor(x[idx.numpy()]), g)
            opt.zero_grad()
            loss = loss_fn(model(xb), torch.as_tensor(y[idx.numpy()]))
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy(model, data.x_val / 255.0, data.y_val)
        history.append({"epoch": epoch + 1, "val_acc": val, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(history[-1]), flush=True)
        if val > best:
            best, best_state = val, {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test = accuracy(model, data.x_test / 255.0, data.y_test)
    card = {"factory": f"benchmarks/zoo_models.py:{a.factory}", "data": "fashion-mnist, raw pixels / 255 (x in [0, 1])",
            "val_acc": best, "test_acc": test, "epochs": a.epochs, "seed": a.seed, "seconds": round(time.perf_counter() - t0, 1),
            "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
            "command": "python benchmarks/train_zoo.py " + " ".join(sys.argv[1:]), "history": history}
    save_file(best_state, a.output, metadata={"card": json.dumps(card)})
    Path(a.output).with_suffix(".json").write_text(json.dumps(card, indent=2))
    print(json.dumps({k: v for k, v in card.items() if k != "history"}))


if __name__ == "__main__":
    main()
