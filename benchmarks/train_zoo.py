"""Train a zoo architecture (benchmarks/zoo_models.py: fashion_mobilenet_v2, fashion_vit) on Fashion-MNIST,
as a user trains their own model in plain PyTorch, and save its state_dict (safetensors) with a card.

    OMP_NUM_THREADS=1 python benchmarks/train_zoo.py --factory fashion_vit --epochs 15 -o models/fashion-vit.safetensors

Recipe: AdamW (lr 2e-3, weight decay 0.05), one warm-up epoch then cosine, batch 128, random ±2 px
shifts, label smoothing 0.1; the epoch with the best validation accuracy (10% of the training
images, seed 0) is kept. Inputs are the raw pixels scaled to [0, 1]. The file stores the weights as
float16 (half the size; BatchNorm's running statistics stay float32), and the card's test accuracy
is that of the model loaded from it. `--half` rewrites a float32 checkpoint so, its accuracy measured again:

    python benchmarks/train_zoo.py --half models/fashion-vit.safetensors -o models/fashion-vit.safetensors
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file
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


def halved(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as float16; BatchNorm's running statistics (small variances) and integers as they are."""
    return {k: v.half() if v.is_floating_point() and not k.endswith(("running_mean", "running_var")) else v
            for k, v in state.items()}


def save(state: dict[str, torch.Tensor], card: dict, output: str) -> None:
    save_file(state, output, metadata={"card": json.dumps(card)})
    Path(output).with_suffix(".json").write_text(json.dumps(card, indent=2))
    print(json.dumps({k: v for k, v in card.items() if k != "history"}))


def half(path: str, output: str) -> None:
    """Rewrite a float32 checkpoint with float16 weights; the card gets the test accuracy of the result."""
    with safe_open(path, "pt") as f:
        card = json.loads(f.metadata()["card"])
    state = halved(load_file(path))
    data = load_dataset("fashion-mnist", seed=card["seed"])
    model = getattr(zoo_models, card["factory"].split(":")[1])(data.input_shape, 10)
    model.load_state_dict(state)
    card.update({"test_acc_float32": card["test_acc"], "test_acc": accuracy(model, data.x_test / 255.0, data.y_test),
                 "weights": "float16", "halved_by": "python benchmarks/train_zoo.py " + " ".join(sys.argv[1:])})
    save(state, card, output)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factory")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--half", metavar="CHECKPOINT", help="rewrite this float32 checkpoint with float16 weights")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    if a.half:
        return half(a.half, a.output)
    if not a.factory:
        ap.error("--factory is required (or --half CHECKPOINT)")
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
    best_state = halved(best_state)
    model.load_state_dict(best_state)  # the model the file holds
    test = accuracy(model, data.x_test / 255.0, data.y_test)
    card = {"factory": f"benchmarks/zoo_models.py:{a.factory}", "data": "fashion-mnist, raw pixels / 255 (x in [0, 1])",
            "val_acc": best, "test_acc": test, "epochs": a.epochs, "seed": a.seed, "seconds": round(time.perf_counter() - t0, 1),
            "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__, "weights": "float16",
            "command": "python benchmarks/train_zoo.py " + " ".join(sys.argv[1:]), "history": history}
    save(best_state, card, a.output)


if __name__ == "__main__":
    main()
