"""The one place that reads and writes srmil's files: JSON, tile sets, feature and graph stores.

Every writer is atomic: it writes to a temporary sibling, flushes it to disk and renames it into
place, so an interrupted job (or a power cut) never leaves a half-written output that a rerun
would take as complete.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from srmil.errors import InputError

# Written as the last step of a feature/graph store; a store without it is incomplete.
COMPLETE_ATTR = "srmil_complete"


class StoreError(InputError):
    """A store that is missing, unreadable or incomplete; the message names it and the fix."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` only if the block succeeds.

    The temporary is a hidden sibling (`.{name}.XXXX.tmp{suffix}`). A process killed mid-write
    (SIGKILL, power cut) leaves it behind; the next write of the same path removes it. The
    temporary's data is fsynced before the rename and the folder after it, so after a power cut
    `path` is the old output, none, or the complete new one (never a name without its data).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _fsync_tree(path: Path) -> None:
    """Flush a file, or every file and folder of a folder (a Zarr store: a few JSON files and
    chunks of thousands of rows, so tens of files), to disk."""
    if not path.is_dir():
        _fsync_file(path)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_file(Path(root, name))
        _fsync_folder(Path(root))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    """Flush a folder's entries (a rename is durable only then). Some filesystems (SMB, some
    FUSE mounts) cannot fsync a folder: there the rename is as durable as they make it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale(path: Path, suffix: str) -> None:
    """Temporaries of earlier, killed writes of `path`. One job writes an output at a time
    (Snakemake locks it), so any left now belong to a writer that is gone."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp{suffix}"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_json_columns(
    path: str | os.PathLike, head: Mapping[str, Any], columns: Mapping[str, np.ndarray],
    chunk: int = 1 << 16,
) -> None:
    """A JSON object: `head`'s keys (indented as `write_json` does), then one flat array per
    column, each on one line.

    The columns are written `chunk` numbers at a time, so a table of millions of rows never
    exists as Python objects at once (a list of 1.7 million tile rows took 700 MiB that way)."""
    text = json.dumps(dict(head), indent=2, sort_keys=True, default=_json_default)
    lines = [text[:-2]] if head else ["{"]  # the head without its closing "\n}"
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(lines[0])
        for i, (name, values) in enumerate(columns.items()):
            f.write(("," if head or i else "") + f"\n  {json.dumps(name)}: [")
            values = np.asarray(values).ravel()
            for at in range(0, len(values), chunk):
                part = json.dumps(values[at:at + chunk].tolist())[1:-1]
                f.write(", " + part if at else part)
            f.write("]")
        f.write("\n}\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- Zarr stores: features and graphs ------------------------------------------------------


@dataclass(frozen=True)
class FeatureProvenance:
    """What made a feature store, kept as its attributes (`attrs`, `from_attrs`): the versions,
    the extractor with its backbone and weights, the tiling it embedded, how the patches were
    read and on what device. Its MODEL_KEYS part goes into every model file (`for_model`), and
    new slides' stores are checked against it before a model predicts them."""

    srmil_version: str | None = None
    torch_version: str | None = None
    timm_version: str | None = None
    extractor: str | None = None
    backbone: dict[str, Any] | None = None  # the backbone spec (name, weights source, ...)
    weights_hash: str | None = None
    feature_dim: int | None = None
    n_patches: int | None = None
    skipped: str | None = None  # why the bag is empty (tiling's reason), carried to metrics.json
    slide: str | None = None  # the file's name
    mpp: float | None = None  # µm/px of the patches (the tiling's target)
    slide_mpp: float | None = None
    patch_px: int | None = None
    stride_px: int | None = None
    patch_level0: float | None = None
    stride_level0: float | None = None
    read_level: int | None = None
    read_px: int | None = None
    read_block: int | None = None
    reader: dict[str, Any] | None = None
    transforms: dict[str, Any] | None = None
    device: str | None = None
    amp: str | None = None
    dtype: str | None = None
    source: dict[str, Any] | None = None  # an imported file: its path, format and sha256

    # What a model must be given again: the same extractor and weights, on the same tiling.
    MODEL_KEYS: ClassVar[tuple[str, ...]] = (
        "extractor", "backbone", "weights_hash", "feature_dim", "mpp", "patch_px", "stride_px",
        "patch_level0", "stride_level0", "dtype", "srmil_version",
    )  # fmt: skip
    TILE_KEYS: ClassVar[tuple[str, ...]] = ("mpp", "patch_px", "stride_px")

    def attrs(self) -> dict[str, Any]:
        """The store's attributes (`skipped` only when the bag is empty, `source` only for
        imported features)."""
        attrs = asdict(self)
        for key in ("skipped", "source"):
            if attrs[key] is None:
                del attrs[key]
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> FeatureProvenance:
        """From a store's attributes or a model's `provenance.features`; other keys (the
        completeness flag, an exclusion record's) are not provenance and are left out."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in attrs.items() if key in names})

    def for_model(self) -> dict[str, Any]:
        """The MODEL_KEYS part that is known, for a model file's `provenance.features`."""
        return {key: getattr(self, key) for key in self.MODEL_KEYS
                if getattr(self, key) is not None}




def write_feature_store(
    path: str | os.PathLike,
    features: np.ndarray,
    coords_level0: np.ndarray,
    attrs: dict[str, Any],
    dtype: str = "float16",
) -> None:
    """One Zarr v3 group per slide: `features` (N x D), `coords` (N x 2 level-0 px), attributes."""
    import zarr

    features = np.asarray(features).astype(dtype, copy=False)
    coords_level0 = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
    if len(features) != len(coords_level0):
        raise ValueError(f"{path}: {len(features)} feature rows but {len(coords_level0)} coords")
    n, d = features.shape if features.ndim == 2 else (0, int(attrs.get("feature_dim", 0)))
    features = features.reshape(n, d)
    rows = max(1, min(n, 4096))
    with atomic_path(path, ".zarr") as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        group.create_array("features", shape=(n, d), dtype=dtype, chunks=(rows, d))[...] = features
        group.create_array("coords", shape=(n, 2), dtype="int64", chunks=(rows, 2))[...] = (
            coords_level0
        )
        _finish(group, attrs)


def _finish(group: Any, attrs: dict[str, Any]) -> None:
    """Write the attributes and the completeness flag, after the arrays, in one update: zarr's
    `attrs.update` rewrites the group's metadata once per key (14 ms for a feature store's)."""
    group.update_attributes(
        {**json.loads(json.dumps(attrs, default=_json_default)), COMPLETE_ATTR: True}
    )


def read_store_attrs(path: str | os.PathLike, step: str = "features") -> dict[str, Any]:
    """The attributes of a complete feature or graph store; StoreError for a missing,
    unreadable or incomplete one (`step`, features or graphs, names the stage that writes it)."""
    return dict(_open_complete(path, step).attrs)


def _open_complete(path: str | os.PathLike, step: str):
    import zarr

    kind = {"features": "feature", "graphs": "graph"}.get(step, step)
    try:
        # Zarr v3 only, as written here: no codec of it unpickles (v2 object arrays could).
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        complete = bool(group.attrs.get(COMPLETE_ATTR))
    except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError) as err:
        raise StoreError(
            f"{path}: not a readable {kind} store ({type(err).__name__}); delete it and "
            f"rerun the {step} step"
        ) from err
    if not complete:  # a write that never finished (a store copied or written by hand)
        raise StoreError(f"{path}: incomplete {kind} store; delete it and rerun the {step} step")
    return group


def read_feature_store(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Return (features N x D float32, coords N x 2 int64, attrs); refuse incomplete stores."""
    group = _open_complete(path, "features")
    attrs = dict(group.attrs)
    return (
        np.asarray(group["features"][...], dtype=np.float32),
        np.asarray(group["coords"][...], dtype=np.int64),
        attrs,
    )


def write_graph_store(
    path: str | os.PathLike, edge_index: np.ndarray, attrs: dict[str, Any]
) -> None:
    """Edge index (2 x E, int64, source row 0, target row 1) and the graph's parameters."""
    import zarr

    edge_index = np.asarray(edge_index, dtype=np.int64).reshape(2, -1)
    e = edge_index.shape[1]
    with atomic_path(path, ".zarr") as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        group.create_array(
            "edge_index", shape=(2, e), dtype="int64", chunks=(2, max(1, min(e, 1 << 20)))
        )[...] = edge_index
        _finish(group, attrs)


def read_graph_store(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    group = _open_complete(path, "graphs")
    attrs = dict(group.attrs)
    return np.asarray(group["edge_index"][...], dtype=np.int64), attrs


# --- checkpoints: plain state dicts, never unpickled objects ---------------------------------

FOLD_FILE = re.compile(r"^fold_(\d+)\.pt$")


def fold_checkpoints(models_dir: str | os.PathLike) -> list[Path]:
    """A model's `fold_{k}.pt` files in `models_dir`, in fold order; StoreError when there are
    none."""
    paths = sorted((p for p in Path(models_dir).glob("fold_*.pt") if FOLD_FILE.match(p.name)),
                   key=lambda p: int(FOLD_FILE.match(p.name).group(1)))
    if not paths:
        raise StoreError(f"{models_dir}: no fold_*.pt models; train them first or fix "
                         "predict.model / predict.extractor (or predict.models_dir) in "
                         "config.yaml")
    return paths



def save_tensors(path: str | os.PathLike, tensors: Any) -> None:
    """Write a plain tensor checkpoint (a state dict, or one tensor), atomically. Equal tensors
    give equal bytes: torch.save names the archive's folder after the file it writes to, so it
    writes to memory under one name, not to the (randomly named) temporary."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's tensors, loaded with `weights_only=True` (only tensors and plain
    containers are rebuilt, never arbitrary pickled objects, so a file from elsewhere cannot
    run code); StoreError naming the file when it is missing or holds anything else."""
    import pickle  # only for the exception type torch raises; nothing is unpickled with it

    import torch

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: checkpoint not found; run the train step")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        text = str(err).strip()
        if "Weights only load failed" in text:
            reason = "it holds Python objects besides tensors, which srmil never unpickles"
        else:
            reason = (text.splitlines()[0] if text else type(err).__name__)[:200]
        raise StoreError(
            f"{path}: not a plain tensor checkpoint ({reason}); srmil loads only state dicts "
            "saved with torch.save(model.state_dict(), path)"
        ) from err
    if not isinstance(state, dict):
        raise StoreError(f"{path}: holds no state dict; save model.state_dict()")
    return state
