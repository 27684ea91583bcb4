"""Float checkpoints: safetensors state_dict + JSON metadata (and a readable card beside it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qadmm.errors import UserError
from qexport.artifact import model_from_meta, read_header
from qexport.fileio import atomic_path

FORMAT = "qexport-checkpoint"


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write `path` (safetensors) and `path` with suffix .json (the card), both atomically. A
    model that is not from the zoo has its traced graph recorded, so loading imports nothing."""
    from qadmm.zoo import NAMES
    from qexport.graph import trace

    path = Path(path)
    arch = meta.get("architecture", {})
    if arch.get("model") not in NAMES and "graph" not in meta:
        meta = {**meta, "graph": trace(model, tuple(arch["input_shape"])).to_json()}
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "version": "1", "qexport": json.dumps(meta, sort_keys=True)})
    card = path.with_suffix(".json")
    with atomic_path(card) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return card


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A qexport float checkpoint: rebuilds the model from its metadata, loads the weights."""
    header = read_header(path)
    if header.get("format") != FORMAT:
        raise UserError(f"{path} is not a qexport float checkpoint (make one with `qexport train`, or pass "
                        "--model package.module:factory with your own --checkpoint)")
    meta = json.loads(header["qexport"])
    model = model_from_meta(meta, str(path))
    from qexport.workflow import unwrap_state

    model.load_state_dict(unwrap_state(load_file(str(path)), model, str(path)))
    return model, meta


def load_user_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A user's own state_dict: safetensors, or a torch file read with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that is not plain tensors/containers
        raise UserError(f"cannot read {path} as a state_dict with weights_only=True ({e}); save it with safetensors") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state
