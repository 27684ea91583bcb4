"""STE: quantization-aware fine-tuning with the straight-through estimator (the thesis's QNN-STE
baseline). The forward pass uses W_q = α·Π(W/α); the backward pass treats the projection as the
identity, so the float shadow weights W keep learning. α is refitted from W every step (warm-started
alternating fit, thesis Algorithm 4); the epoch whose quantized model is best on validation is kept."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from qadmm.codes import fit
from qadmm.data import Dataset
from qadmm.layers import quantizable_layers
from qadmm.spec import LayerCodes, QuantResult, QuantSpec, apply_codes
from qadmm.train import batches, evaluate, seed_everything


@dataclass
class Params:
    epochs: int = 30
    lr: float = 1e-3  # Adam on the float shadow weights (and all float parameters)
    batch_size: int = 32


def _project(model: nn.Module, names: list[str], spec: QuantSpec, alphas: dict) -> dict[str, LayerCodes]:
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        f = fit(modules[n].weight.detach(), spec.codes, spec.per_channel, alpha0=alphas.get(n), max_iter=5)
        alphas[n] = f.alpha
        out[n] = LayerCodes(f.q, f.alpha, spec.codes)
    return out


def quantize(model: nn.Module, data: Dataset, spec: QuantSpec) -> QuantResult:
    p = spec.resolve(Params)
    gen = seed_everything(spec.seed)
    model = copy.deepcopy(model)
    names = [n for n, _ in quantizable_layers(model, spec.keep_first, spec.keep_last)]
    alphas: dict[str, torch.Tensor] = {}
    # start α from the full multi-start fit, then warm-start it every step
    for n, m in quantizable_layers(model, spec.keep_first, spec.keep_last):
        alphas[n] = fit(m.weight.detach(), spec.codes, spec.per_channel).alpha
    opt = torch.optim.Adam(model.parameters(), lr=p.lr)
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    ce = nn.CrossEntropyLoss()

    def quantized_copy() -> tuple[nn.Module, dict[str, LayerCodes]]:
        layers = _project(model, names, spec, alphas)
        return apply_codes(copy.deepcopy(model), layers), layers

    best_model, best_layers = quantized_copy()
    best = evaluate(best_model, data.x_val, data.y_val)
    history = [{"epoch": 0, "val_acc": best[0], "val_loss": best[1]}]
    for epoch in tqdm(range(1, p.epochs + 1), desc="ste", disable=not spec.progress, leave=False):
        model.train()
        for idx in batches(len(x), p.batch_size, gen):
            layers = _project(model, names, spec, alphas)
            params = dict(model.named_parameters())
            for n, lc in layers.items():
                w = params[f"{n}.weight"]
                params[f"{n}.weight"] = w + (lc.weight() - w).detach()  # straight-through: d(W_q)/dW := I
            opt.zero_grad()
            ce(functional_call(model, (params, dict(model.named_buffers())), (x[idx],)), y[idx]).backward()
            opt.step()
        qm, layers = quantized_copy()
        val = evaluate(qm, data.x_val, data.y_val)
        history.append({"epoch": epoch, "val_acc": val[0], "val_loss": val[1]})
        if val[0] > best[0] or (val[0] == best[0] and val[1] < best[1]):
            best, best_model, best_layers = val, qm, layers
    return QuantResult(best_model.eval(), best_layers, "ste", asdict(p), history)
