"""Train one cross-validation fold: one bag per step, cosine schedule, reference model selection.

The selected model is the one with the best validation accuracy among the epochs after
`select_after * epochs` (ties: higher validation AUC, then the earlier epoch). It is written as a
plain state dict beside a JSON (config, classes, split, provenance), a CSV of the epochs and the
training slides' attention statistics per epoch (.attention.json, see srmil.mil.attention).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from srmil import __version__
from srmil.device import resolve_device as device_for
from srmil.device import torch_threads
from srmil.errors import InputError
from srmil.mil.attention import AttentionRecorder
from srmil.mil.bags import Bag, load_bag
from srmil.mil.catalog import MODEL_NAMES
from srmil.mil.inference import predict_bags
from srmil.mil.metrics import classification_metrics
from srmil.mil.models import build_model, default_hparams
from srmil.mil.optim import build_optimizer
from srmil.mil.provenance import graph_params
from srmil.settings import TrainSettings, train_settings
from srmil.store import save_tensors, write_json, write_text

log = logging.getLogger(__name__)

def first_selectable_epoch(epochs: int, select_after: float) -> int:
    """First 1-based epoch that model selection considers (61 of 100 for select_after=0.6)."""
    # The small epsilon keeps 0.6 * 100 = 60.000000000000007 from becoming 61 + 1.
    return min(epochs, math.floor(select_after * epochs + 1e-9) + 1)


def select_epoch(epoch_log: pd.DataFrame | Sequence[dict[str, Any]], epochs: int,
                 select_after: float) -> int | None:
    """The reference rule on a table with `epoch`, `val_acc`, `val_auc`: the best validation
    accuracy among epochs >= first_selectable_epoch, ties by higher AUC, then the earlier epoch.

    Missing AUCs rank below any AUC. Without validation metrics (no validation slides) the last
    eligible epoch is selected. Returns None while no epoch is eligible.
    """
    table = pd.DataFrame(epoch_log)
    if table.empty:
        return None
    eligible = table[table["epoch"] >= first_selectable_epoch(epochs, select_after)]
    if eligible.empty:
        return None
    acc = pd.to_numeric(eligible["val_acc"], errors="coerce")
    if acc.isna().all():
        return int(eligible["epoch"].max())
    ranked = pd.DataFrame({
        "acc": acc.fillna(-np.inf),
        "auc": pd.to_numeric(eligible["val_auc"], errors="coerce").fillna(-np.inf),
        "epoch": eligible["epoch"],
    }).sort_values(["acc", "auc", "epoch"], ascending=[False, False, True], kind="stable")
    return int(ranked["epoch"].iloc[0])


# The devices config.yaml may name (its schema has the same pattern).


def resolve_device(device: str = "auto") -> torch.device:
    """The device `train.device` names (srmil.device.resolve_device)."""
    return device_for(device, "train.device")


def train_fold(model_name: str, splits: dict, fold: int, samples: pd.DataFrame,
               features_dir: str | os.PathLike, graphs_dir: str | os.PathLike,
               out_path: str | os.PathLike, model_hparams: dict[str, Any] | None = None,
               train_hparams: dict[str, Any] | None = None, seed: int = 0, device: str = "auto",
               threads: int | None = None, exclude_failed: bool = False) -> dict[str, Any]:
    """Train `model_name` on fold `fold` of `splits`; write `out_path` (.pt), .json and .csv.

    With `exclude_failed`, slides excluded after a failure (srmil.cohort.exclusion) are left out and
    listed; without it, they are refused. Returns the metadata written to the JSON.
    """
    started = time.perf_counter()
    _check_model_name(model_name)
    config = train_settings(model_name, train_hparams)
    hparams = {**default_hparams(model_name), **(model_hparams or {})}
    classes = list(splits["classes"])
    membership = splits["folds"][fold]
    labels = _label_indices(samples, classes, membership)
    dev = resolve_device(device)

    with _deterministic(seed, threads, dev):
        train_bags, skipped_train, excluded = _load_bags(membership["train"], features_dir,
                                                         graphs_dir, dev, exclude_failed)
        val_bags, skipped_val, excluded_val = _load_bags(membership["val"], features_dir,
                                                         graphs_dir, dev, exclude_failed)
        excluded.update(excluded_val)
        _check_classes_left(train_bags, labels, classes, fold, excluded)
        in_dim = _check_same_features(train_bags + val_bags)
        graph = _check_same_graphs(train_bags + val_bags)
        model = build_model(model_name, in_dim=in_dim, n_classes=len(classes),
                            hparams=hparams).to(dev)
        if config.standardize_features:
            model.scaler.fit([bag.x for bag in train_bags])
        # Attention diagnostics (paper Fig. 3) on the training slides, every epoch.
        recorder = AttentionRecorder.for_bags(train_bags, samples)
        epoch_log, best_state = _fit(model, config, train_bags, val_bags, labels, len(classes),
                                     dev, seed, desc=f"{model_name} fold {fold}",
                                     recorder=recorder)

    selected = epoch_log.loc[epoch_log["selected"] == 1].iloc[0]
    meta = {
        "model": model_name,
        "model_hparams": hparams,
        "train_config": config.model_dump(mode="json"),
        "classes": classes,
        "in_dim": in_dim,
        "fold": fold,
        "split": {part: list(membership[part]) for part in ("train", "val", "test")},
        "skipped_empty": sorted(skipped_train + skipped_val),
        "excluded": excluded,  # slide id -> why it failed (exclude_failed_slides)
        "selected_epoch": int(selected["epoch"]),
        "selected_val": {k: _finite_or_none(selected[k]) for k in ("val_loss", "val_acc",
                                                                   "val_auc")},
        "epochs_run": len(epoch_log),
        "seed": seed,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "provenance": _provenance(train_bags[0], graph),
        "time_s": round(time.perf_counter() - started, 3),
    }
    out_path = Path(out_path)
    save_tensors(out_path, best_state)
    write_text(out_path.with_suffix(".csv"), epoch_log.to_csv(index=False))
    write_json(out_path.with_suffix(".json"), meta)
    write_json(out_path.with_suffix(".attention.json"), recorder.to_json())
    return meta


# --- the loop --------------------------------------------------------------------------------


def _fit(model: torch.nn.Module, config: TrainSettings, train_bags: list[Bag], val_bags: list[Bag],
         labels: dict[str, int], n_classes: int, device: torch.device, seed: int,
         desc: str, recorder: AttentionRecorder | None = None
         ) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Train for `config.epochs` (or until early stopping); return the per-epoch log with its
    `selected` column and the selected epoch's state dict (on the CPU)."""
    y_train = [labels[b.slide_id] for b in train_bags]
    y_val = np.array([labels[b.slide_id] for b in val_bags], dtype=np.int64)
    optimizer, scheduler = _optimiser(model, config)
    shuffle = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    best_epoch, best_state = None, None
    bar = tqdm(range(1, config.epochs + 1), desc=desc, unit="epoch")
    for epoch in bar:
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row.update(_train_epoch(model, optimizer, train_bags, y_train, shuffle))
        scheduler.step()
        row["train_acc"] = _accuracy(model, train_bags, y_train, device, recorder, epoch)
        row.update(_validate(model, val_bags, y_val, n_classes, device))
        rows.append(row)
        # The rule is re-applied to the table so far; snapshot when it picks this epoch.
        if select_epoch(rows, config.epochs, config.select_after) == epoch:
            best_epoch, best_state = epoch, _cpu_state_dict(model)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_acc']:.3f}")
        if _should_stop(epoch, best_epoch, config, has_val=len(val_bags) > 0):
            log.info("%s: early stop after epoch %d (selected %d)", desc, epoch, best_epoch)
            break
    bar.close()
    epoch_log = pd.DataFrame(rows)
    epoch_log["selected"] = (epoch_log["epoch"] == best_epoch).astype(int)
    return epoch_log, best_state


# --- one epoch -------------------------------------------------------------------------------


def _train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, bags: list[Bag],
                 labels: list[int], shuffle: torch.Generator) -> dict[str, float]:
    """One optimisation step per bag in a seeded random order; loss parts averaged per epoch."""
    model.train()
    totals: dict[str, float] = {}
    for i in torch.randperm(len(bags), generator=shuffle).tolist():
        optimizer.zero_grad(set_to_none=True)
        loss, parts = model.training_loss(bags[i].x, bags[i].edge_index, labels[i])
        loss.backward()
        if hasattr(model, "clip_gradients"):  # DTFD-MIL's per-module clipping
            model.clip_gradients()
        optimizer.step()
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return {f"train_{name}": total / len(bags) for name, total in totals.items()}


def _accuracy(model: torch.nn.Module, bags: list[Bag], labels: list[int],
              device: torch.device, recorder: AttentionRecorder | None = None,
              epoch: int = 0) -> float:
    # Evaluated unmasked, in eval mode: the accuracy the model would have at inference.
    probs, attention = predict_bags(model, bags, device)
    if recorder is not None:
        recorder.add(epoch, attention)
    return float(np.mean(probs.argmax(axis=1) == np.asarray(labels)))


def _validate(model: torch.nn.Module, bags: list[Bag], labels: np.ndarray, n_classes: int,
              device: torch.device) -> dict[str, float]:
    if not bags:
        return {"val_loss": math.nan, "val_acc": math.nan, "val_auc": math.nan}
    probs, _ = predict_bags(model, bags, device)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)
    metrics = classification_metrics(labels, probs, n_classes)
    auc = metrics["auc"]
    return {"val_loss": float(-np.log(picked).mean()), "val_acc": metrics["accuracy"],
            "val_auc": math.nan if auc is None else auc}


def _should_stop(epoch: int, best_epoch: int | None, config: TrainSettings, has_val: bool) -> bool:
    patience = config.early_stopping_patience
    if patience is None or best_epoch is None or not has_val:
        return False
    return epoch - best_epoch >= patience


# --- helpers ---------------------------------------------------------------------------------


def _check_model_name(model_name: str) -> None:
    if model_name not in MODEL_NAMES:
        raise InputError(f"unknown model {model_name!r}; choose one of {', '.join(MODEL_NAMES)}")


def _check_classes_left(train_bags: list[Bag], labels: dict[str, int], classes: list[str],
                        fold: int, excluded: dict[str, str]) -> None:
    """Every class keeps a training slide with patches, after empty and excluded slides."""
    present = {labels[b.slide_id] for b in train_bags}
    missing = [c for i, c in enumerate(classes) if i not in present]
    if not missing:
        return
    why = (f" ({len(excluded)} slide(s) of the fold excluded: {', '.join(sorted(excluded))})"
           if excluded else "")
    raise InputError(f"fold {fold}: no training slide of class {', '.join(missing)} has "
                     f"patches{why}; fix the failed slides, or add slides of that class")


def _label_indices(samples: pd.DataFrame, classes: list[str],
                   membership: dict[str, list[str]]) -> dict[str, int]:
    """Class index of every slide of the fold; the split and the sheet must agree."""
    index = {label: i for i, label in enumerate(classes)}
    label_of = dict(zip(samples["slide_id"], samples["label"].astype(str), strict=True))
    for part in ("train", "val"):
        for slide_id in membership[part]:
            if label_of.get(slide_id) not in index:
                raise InputError(f"slide {slide_id!r} of the split's {part} set has no label among "
                                 f"{', '.join(classes)} in the sample sheet; remake the splits")
    return {sid: index[label] for sid, label in label_of.items() if label in index}


def _load_bags(slide_ids: Sequence[str], features_dir: str | os.PathLike,
               graphs_dir: str | os.PathLike, device: torch.device, exclude_failed: bool = False,
               ) -> tuple[list[Bag], list[str], dict[str, str]]:
    """Load every bag once (they are small) onto `device`. Returns the bags with patches, the
    ids of those without (skipped) and, with `exclude_failed`, the excluded ones' reasons."""
    bags, skipped, excluded = [], [], {}
    for slide_id in slide_ids:
        bag = load_bag(features_dir, graphs_dir, slide_id, exclude_failed)
        if bag.excluded:
            log.warning("slide %s excluded: %s", slide_id, bag.excluded)
            excluded[slide_id] = bag.excluded
            continue
        if len(bag) == 0:
            log.warning("slide %s has no patches; skipped", slide_id)
            skipped.append(slide_id)
            continue
        bags.append(bag.to(device))
    return bags, skipped, excluded


def _check_same_features(bags: list[Bag]) -> int:
    """The feature size shared by all bags; bags from different backbones are an error."""
    first = bags[0]
    for bag in bags[1:]:
        if (bag.x.shape[1] != first.x.shape[1]
                or bag.provenance.weights_hash != first.provenance.weights_hash):
            raise InputError(f"slides {first.slide_id} and {bag.slide_id} have features from "
                             f"different backbones ({_backbone(first)}; {_backbone(bag)}); "
                             "extract or import every slide's features with one backbone")
    return int(first.x.shape[1])


def _backbone(bag: Bag) -> str:
    """A bag's backbone in words, for an error message."""
    spec = bag.provenance.backbone
    if isinstance(spec, dict) and "imported" in spec:
        return f"imported {spec['imported']} file, encoder {spec.get('encoder') or 'not named'}"
    name = spec.get("model") if isinstance(spec, dict) else spec
    return f"{name}, weights {str(bag.provenance.weights_hash)[:12]}"


def _check_same_graphs(bags: list[Bag]) -> dict[str, Any]:
    """The graph parameters shared by all bags: a model is trained on one kind of graph."""
    first = graph_params(bags[0].graph_attrs)
    for bag in bags[1:]:
        params = graph_params(bag.graph_attrs)
        if params != first:
            raise InputError(f"slides {bags[0].slide_id} and {bag.slide_id} have graphs built "
                             f"with different parameters ({first} vs {params}); rerun the graphs "
                             "step with one graph.window")
    return first


def _optimiser(model: torch.nn.Module, config: TrainSettings):
    optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay,
                                config.betas)
    if config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs,
                                                               eta_min=config.min_lr)
    elif config.scheduler == "step":
        milestone = math.floor(config.step_at * config.epochs + 1e-9)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [milestone],
                                                         gamma=config.step_gamma)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)
    return optimizer, scheduler


def _cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _provenance(bag: Bag, graph: dict[str, Any]) -> dict[str, Any]:
    """Versions, the feature store's extractor and tiling, and the graph's parameters: what
    `srmil predict` must reproduce on new slides."""
    import torch_geometric

    return {
        "srmil_version": __version__,
        "torch_version": torch.__version__,
        "torch_geometric_version": torch_geometric.__version__,
        "features": bag.provenance.for_model(),
        "graph": graph,
    }


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@contextlib.contextmanager
def _deterministic(seed: int, threads: int | None, device: torch.device) -> Iterator[None]:
    """Seed every generator and force deterministic kernels; restore the global flags after."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cuda":
        # cuBLAS is only reproducible with a fixed workspace; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # warn_only: scatter kernels in GAT layers have no deterministic CUDA version.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch_threads(threads):
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
