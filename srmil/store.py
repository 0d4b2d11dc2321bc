"""The one place that reads and writes srmil's files: JSON, tile sets, feature and graph stores.

Every writer is atomic: it writes to a temporary sibling and renames it into place, so an
interrupted job never leaves a half-written output that a rerun would take as complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Written as the last step of a feature/graph store; a store without it is incomplete.
COMPLETE_ATTR = "srmil_complete"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


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


# --- tile sets: coordinates plus the read plan, small enough for plain JSON -----------------


def write_tiles(
    path: str | os.PathLike,
    coords_level0: np.ndarray,
    tissue_fraction: np.ndarray,
    plan: dict[str, Any],
) -> None:
    """Tile origins (N x 2, x/y in level-0 px), their tissue fraction, and how to read them."""
    coords_level0 = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
    write_json(
        path,
        {
            "plan": plan,
            "coords_level0": coords_level0.tolist(),
            "tissue_fraction": np.round(np.asarray(tissue_fraction, dtype=float), 4).tolist(),
        },
    )


def read_tiles(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Return (coords_level0 N x 2 int64, tissue_fraction N float, plan)."""
    data = read_json(path)
    coords = np.asarray(data["coords_level0"], dtype=np.int64).reshape(-1, 2)
    fraction = np.asarray(data["tissue_fraction"], dtype=np.float64)
    return coords, fraction, data["plan"]


# --- Zarr stores: features and graphs ------------------------------------------------------


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
        group.attrs.update(json.loads(json.dumps(attrs, default=_json_default)))
        group.attrs[COMPLETE_ATTR] = True


def read_feature_store(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Return (features N x D float32, coords N x 2 int64, attrs); refuse incomplete stores."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    if not attrs.get(COMPLETE_ATTR):
        raise ValueError(f"{path}: incomplete feature store; delete it and rerun the features step")
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
        group.attrs.update(json.loads(json.dumps(attrs, default=_json_default)))
        group.attrs[COMPLETE_ATTR] = True


def read_graph_store(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    if not attrs.get(COMPLETE_ATTR):
        raise ValueError(f"{path}: incomplete graph store; delete it and rerun the graphs step")
    return np.asarray(group["edge_index"][...], dtype=np.int64), attrs
