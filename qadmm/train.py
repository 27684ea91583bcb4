"""Float training with early stopping, and evaluation; shared by `qexport train` and the back-ends."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qadmm.data import Dataset
from qadmm.errors import BadValue


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits for x in evaluation mode, batched (float32)."""
    model.eval()
    xt, dev = torch.as_tensor(x, dtype=torch.float32), device_of(model)
    return torch.cat([model(xt[i : i + batch_size].to(dev)).cpu() for i in range(0, len(xt), batch_size)]) if len(xt) else torch.empty(0)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent."""
    return top1(predict(model, x, batch_size), y)


def top1(logits: torch.Tensor, y: np.ndarray) -> float:
    """Top-1 accuracy in percent of logits already computed (`predict`) against labels y."""
    return float((logits.argmax(1).numpy() == y).mean() * 100)


def agreement(reference: torch.Tensor, other: torch.Tensor, classifier: bool) -> dict:
    """How close `other` is to `reference` (outputs on the same inputs): SQNR in dB (signal power
    over error power), the mean cosine similarity per sample, and for class scores the top-1
    agreement in percent."""
    r, o = reference.double().flatten(1), other.double().flatten(1)
    err = float(((r - o) ** 2).sum())
    sqnr = float("inf") if err == 0 else 10 * np.log10(max(float((r ** 2).sum()), 1e-300) / err)
    cos = nn.functional.cosine_similarity(r, o, dim=1, eps=1e-30)
    out = {"sqnr_db": round(float(sqnr), 3) if np.isfinite(sqnr) else None, "cosine": round(float(cos.mean()), 6)}
    if classifier:
        out["top1_agreement"] = round(float((r.argmax(1) == o.argmax(1)).double().mean() * 100), 3)
    return out


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> tuple[float, float]:
    """(top-1 accuracy in percent, mean cross-entropy)."""
    logits = predict(model, x, batch_size)
    yt = torch.as_tensor(y)
    return float((logits.argmax(1) == yt).float().mean() * 100), float(nn.functional.cross_entropy(logits, yt))


@dataclass
class TrainConfig:
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    patience: int = 10  # epochs without validation improvement before stopping
    seed: int = 0


@dataclass
class TrainResult:
    best_val: float
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)


def batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def check_loss(loss: torch.Tensor, what: str = "training") -> None:
    """Stop a diverging run with an error instead of letting it write NaN weights."""
    if not torch.isfinite(loss.detach()).all():
        raise BadValue(f"{what} diverged: the loss became {float(loss.detach())} (lower the learning rate, "
                       "e.g. --lr or --param lr=..., or check the data for extreme values)")


def train_epoch(forward, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                gen: torch.Generator, loss_extra=None, after_step=None, before_step=None) -> float:
    """One pass of minibatch `opt` on cross-entropy (+ `loss_extra()`); returns the mean task+extra loss.
    `before_step()` may rewrite the gradients (e.g. AskewSGD's direction rule); `after_step()` runs
    after every optimiser step (e.g. a projection)."""
    ce = nn.CrossEntropyLoss()
    total = 0.0
    for idx in batches(len(x), batch_size, gen):
        opt.zero_grad()
        loss = ce(forward(x[idx]), y[idx])
        if loss_extra is not None:
            loss = loss + loss_extra()
        check_loss(loss)
        loss.backward()
        if before_step is not None:
            before_step()
        opt.step()
        total += loss.item() * len(idx)
        if after_step is not None:
            after_step()
    return total / len(x)


def train_epochs(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    params: list[torch.nn.Parameter] | None = None,
    loss_extra=None,
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Adam on cross-entropy (+ `loss_extra()` if given) over `params` (default: all), keeping the
    weights with the best validation accuracy (early stopping with `cfg.patience`)."""
    gen = seed_everything(cfg.seed)
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    x = torch.as_tensor(data.x_train).to(device_of(model))
    y = torch.as_tensor(data.y_train).to(device_of(model))
    # Model selection on (validation accuracy, then validation loss): small validation sets saturate
    # at 100% early, and the loss still tells which of those weights generalise better.
    best_val, best_loss = evaluate(model, data.x_val, data.y_val)
    best_epoch, best_state = 0, copy.deepcopy(model.state_dict())
    history: list[dict] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, disable=not progress, leave=False)
    epoch = 0
    for epoch in bar:
        model.train()
        loss = train_epoch(model, opt, x, y, cfg.batch_size, gen, loss_extra)
        sched.step()
        val, val_loss = evaluate(model, data.x_val, data.y_val)
        history.append({"epoch": epoch, "loss": loss, "val_acc": val, "val_loss": val_loss})
        bar.set_postfix(loss=f"{loss:.4f}", val=f"{val:.2f}%")
        if val > best_val or (val == best_val and val_loss < best_loss):
            best_val, best_loss, best_epoch, best_state = val, val_loss, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    return TrainResult(best_val, best_epoch, epoch, history)
