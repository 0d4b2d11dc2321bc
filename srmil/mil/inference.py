"""Inference: a trained fold model rebuilt from its checkpoint, and its predictions on bags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srmil.mil.bags import Bag
from srmil.mil.models import build_model
from srmil.store import load_state_dict, read_json


def load_model(pt_path: str | os.PathLike,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained model from `pt_path` and its JSON; returned in eval mode on `device`."""
    pt_path = Path(pt_path)
    meta = read_json(pt_path.with_suffix(".json"))
    model = build_model(meta["model"], in_dim=meta["in_dim"], n_classes=len(meta["classes"]),
                        hparams=meta["model_hparams"])
    state = load_state_dict(pt_path)  # torch.load(weights_only=True): nothing is unpickled
    model.load_state_dict(state)
    return model.to(device).eval(), meta


@torch.no_grad()
def predict_bags(model: torch.nn.Module, bags: list[Bag],
                 device: str | torch.device) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n, C) and per-patch attention of each bag, nothing masked."""
    model.eval()
    probs, attention = [], []
    for bag in bags:
        out = model(bag.x.to(device), bag.edge_index.to(device))
        probs.append(torch.softmax(out.logits.float(), dim=-1).cpu().numpy())
        attention.append(out.attention.float().cpu().numpy())
    if not probs:
        n_classes = int(getattr(model, "n_classes", 0))
        return np.zeros((0, n_classes), dtype=np.float32), []
    return np.stack(probs), attention
