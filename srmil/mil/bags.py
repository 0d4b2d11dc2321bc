"""Bags: one slide's patch features, spatial edges and patch origins, read from its stores."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srmil.cohort.exclusion import EXCLUDED, SlideExcluded
from srmil.errors import InputError
from srmil.store import FeatureProvenance, read_feature_store, read_graph_store


@dataclass
class Bag:
    """One slide as a MIL bag: patch features, spatial edges, patch origins, store attributes."""

    slide_id: str
    x: torch.Tensor  # (N, D) float32
    edge_index: torch.Tensor  # (2, E) int64, source row 0, target row 1
    coords: np.ndarray  # (N, 2) int64, level-0 px
    attrs: dict[str, Any] = field(default_factory=dict)  # the feature store's attributes
    # The graph store's attributes (window, radius_cells, self_loops, ...): how edges were built.
    graph_attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def excluded(self) -> str | None:
        """Why the slide was left out (srmil.cohort.exclusion), or None."""
        return self.attrs.get(EXCLUDED) or self.graph_attrs.get(EXCLUDED)

    @property
    def provenance(self) -> FeatureProvenance:
        """What made the features (the feature store's attributes, typed)."""
        return FeatureProvenance.from_attrs(self.attrs)

    def to(self, device: torch.device | str) -> Bag:
        return Bag(self.slide_id, self.x.to(device), self.edge_index.to(device), self.coords,
                   self.attrs, self.graph_attrs)


def load_bag(features_dir: str | os.PathLike, graphs_dir: str | os.PathLike,
             slide_id: str, exclude_failed: bool = False) -> Bag:
    """Read `{features_dir}/{slide_id}.zarr` and `{graphs_dir}/{slide_id}.zarr` into a Bag.

    A slide excluded after a failure (srmil.cohort.exclusion) comes back as an empty bag whose
    `excluded` gives the reason with `exclude_failed`, and is refused without it.
    """
    features_path = Path(features_dir) / f"{slide_id}.zarr"
    graph_path = Path(graphs_dir) / f"{slide_id}.zarr"
    for path, step in ((features_path, "features"), (graph_path, "graphs")):
        if not path.is_dir():
            raise InputError(f"{path}: store of slide {slide_id!r} not found; run the {step} step")
    features, coords, attrs = read_feature_store(features_path)
    edge_index, graph_attrs = read_graph_store(graph_path)
    reason = attrs.get(EXCLUDED) or graph_attrs.get(EXCLUDED)
    if reason:
        if not exclude_failed:
            raise SlideExcluded(f"slide {slide_id!r}", reason)
        # Its graph may be a normal one (features fail after tiling): the bag is empty.
        return Bag(slide_id, torch.zeros(0, 0), torch.zeros(2, 0, dtype=torch.int64),
                   np.zeros((0, 2), dtype=np.int64), {**attrs, EXCLUDED: reason}, graph_attrs)
    n = len(features)
    # A graph built from another feature store would index the wrong patches silently.
    if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= n):
        raise InputError(f"{graph_path}: edges reference node {int(edge_index.max())} but the "
                         f"feature store has {n} patches; rerun the graphs step")
    return Bag(slide_id, torch.from_numpy(features), torch.from_numpy(edge_index), coords, attrs,
               graph_attrs)
