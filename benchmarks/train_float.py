"""Train a zoo model to a strong float baseline for the shipped checkpoints in models/.

`qexport train` (Adam, no augmentation) is the quick path; the CNN checkpoints in models/ come from this
longer recipe instead: SGD with Nesterov momentum, one warm-up epoch then cosine decay, weight decay,
random shifts (±pad pixels) and horizontal flips. The best epoch on the validation split is kept and the
checkpoint is rewritten after every epoch that improves it, so an interrupted run still leaves one.

    OMP_NUM_THREADS=1 python benchmarks/train_float.py --model resnet20 --data fashion-mnist --epochs 15 \
        -o models/fashion-resnet20.safetensors
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qadmm.data import load_dataset  # noqa: E402
from qadmm.train import accuracy, evaluate, seed_everything  # noqa: E402
from qadmm.zoo import build_model  # noqa: E402
from qexport.checkpoint import save_checkpoint  # noqa: E402
from qexport.fileio import versions  # noqa: E402
from qexport.workflow import preprocessing  # noqa: E402


def augment(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to `pad` pixels (zero fill, as a padded random crop) and random horizontal flip."""
    n, _, h, w = x.shape
    xp = nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    out = xp.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--pad", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()

    data = load_dataset(a.data, a.data_dir, seed=a.seed)
    gen = seed_everything(a.seed)
    model = build_model(a.model, data.input_shape, data.num_classes, data.mean, data.std)
    if len(data.input_shape) == 3:  # ~25% faster convolutions on CPU; the saved state_dict is unchanged
        model = model.to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=a.lr, momentum=0.9, nesterov=True)
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    steps_per_epoch = math.ceil(len(x) / a.batch_size)
    total = a.epochs * steps_per_epoch

    def lr_at(step: int) -> float:  # one warm-up epoch, then cosine to 0
        if step < steps_per_epoch:
            return a.lr * (step + 1) / steps_per_epoch
        return 0.5 * a.lr * (1 + math.cos(math.pi * (step - steps_per_epoch) / max(total - steps_per_epoch, 1)))

    ce = nn.CrossEntropyLoss()
    best = (-1.0, 0.0)
    t0 = time.time()
    step = 0
    history = []
    for epoch in range(1, a.epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        run_loss = 0.0
        for i in range(0, len(x), a.batch_size):
            idx = perm[i:i + a.batch_size]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            xb = augment(x[idx], a.pad, gen) if a.pad > 0 else x[idx]
            if xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            loss = ce(model(xb), y[idx])
            loss.backward()
            opt.step()
            run_loss += float(loss) * len(idx)
            step += 1
        val_acc, val_loss = evaluate(model, data.x_val, data.y_val)
        history.append({"epoch": epoch, "loss": run_loss / len(x), "val_acc": val_acc, "val_loss": val_loss,
                        "seconds": round(time.time() - t0, 1)})
        print(f"epoch {epoch}/{a.epochs}  loss {run_loss / len(x):.4f}  val {val_acc:.2f}%  ({time.time() - t0:.0f} s)", flush=True)
        if (val_acc, -val_loss) > best:
            best = (val_acc, -val_loss)
            test_acc = accuracy(model, data.x_test, data.y_test)
            info = {"recipe": "benchmarks/train_float.py", "epochs": a.epochs, "best_epoch": epoch, "optimizer": "sgd nesterov 0.9",
                    "lr": a.lr, "schedule": "1 warm-up epoch, cosine", "batch_size": a.batch_size,
                    "weight_decay": a.weight_decay, "augment": f"shift ±{a.pad} px, horizontal flip", "seed": a.seed,
                    "val_acc": val_acc, "test_acc": test_acc, "seconds": round(time.time() - t0, 1),
                    "threads": torch.get_num_threads(), "history": history}
            meta = {"architecture": {"model": a.model, "input_shape": list(data.input_shape), "num_classes": data.num_classes},
                    "preprocessing": preprocessing(data), "dataset": data.describe(), "training": info,
                    "versions": versions(), "command": "python " + " ".join(sys.argv)}
            save_checkpoint(a.output, model, meta)
            print(f"  saved {a.output}: test {test_acc:.2f}%", flush=True)


if __name__ == "__main__":
    main()
