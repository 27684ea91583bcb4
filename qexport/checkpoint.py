"""Float checkpoints: safetensors state_dict + JSON metadata (and a readable card beside it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qadmm.errors import BadFile, OutputConflict, UserError
from qexport.artifact import model_from_meta
from qexport.fileio import atomic_path, read_header, read_safetensors

FORMAT = "qexport-checkpoint"


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write `path` (safetensors) and `path` with suffix .json (the card), both atomically. A
    model that is not from the zoo has its traced graph recorded, so loading imports nothing."""
    from qadmm.zoo import NAMES
    from qexport.graph import trace

    path, card = Path(path), card_path(path)
    if card == path:
        raise OutputConflict(f"checkpoint {path} would be overwritten by its own .json card: give the checkpoint a "
                             ".safetensors name")
    check_finite(model.state_dict(), "the model to save")
    arch = meta.get("architecture", {})
    if arch.get("model") not in NAMES and "graph" not in meta:
        meta = {**meta, "graph": trace(model, tuple(arch["input_shape"])).to_json()}
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "version": "1", "qexport": json.dumps(meta, sort_keys=True)})
    with atomic_path(card) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return card


def card_path(path: str | Path) -> Path:
    """The readable .json card written beside a checkpoint."""
    return Path(path).with_suffix(".json")


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A qexport float checkpoint: the model rebuilt from its metadata (nothing imported), its
    weights checked (shapes against the model, every value finite) and loaded."""
    header = read_header(path)
    if header.get("format") != FORMAT:
        raise BadFile(f"{path} is not a qexport float checkpoint (make one with `qexport train`, or pass "
                      "--model package.module:factory with your own --checkpoint)")
    try:
        meta = json.loads(header["qexport"])
    except (KeyError, json.JSONDecodeError):
        raise BadFile(f"{path}: metadata is missing or not JSON; the file is corrupted") from None
    _, state = read_safetensors(path)
    return model_from_meta(meta, str(path), state), meta


def check_finite(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise BadFile(f"{where}: {', '.join(bad[:4])} hold NaN or infinite values; the training that produced it "
                      "diverged (retrain with a lower learning rate) or the file is corrupted")
    return state


def load_user_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A user's own state_dict: safetensors, or a torch file read with weights_only=True (no code
    runs); every float value must be finite."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return check_finite(read_safetensors(path)[1], str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # weights_only refuses anything that is not plain tensors/containers
        raise BadFile(f"cannot read {path} as a state_dict of plain tensors: it is corrupted, or holds pickled "
                      "objects qexport will not run; save model.state_dict() with torch.save or safetensors") from None
    if not isinstance(state, dict):
        raise BadFile(f"{path} holds a {type(state).__name__}, not a state_dict: save model.state_dict()")
    return state
