"""The tile set file: plain JSON, written column by column in chunks, read back exactly."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import toy_plan

from srmil import store
from srmil.errors import InputError
from srmil.wsi.tiling import read_tiles, write_tiles


def test_columns_are_written_in_chunks_as_plain_json(tmp_path: Path) -> None:
    x, fraction = np.arange(7) * 224, np.linspace(0, 1, 7)
    path = tmp_path / "t.json"
    store.write_json_columns(path, {"plan": {"b": 1, "a": [2]}}, {"x": x, "f": fraction},
                             chunk=3)
    assert json.loads(path.read_text()) == {"plan": {"a": [2], "b": 1}, "x": x.tolist(),
                                            "f": fraction.tolist()}
    lines = path.read_text().splitlines()
    assert lines[-3].startswith('  "x": [0, 224, ') and lines[-2].startswith('  "f": [0.0, ')

    store.write_json_columns(path, {}, {"x": np.zeros(0, int)})  # no head, no rows
    assert json.loads(path.read_text()) == {"x": []}


def test_tile_set_round_trip(tmp_path: Path) -> None:
    coords = np.array([[0, 448], [224, 448], [4032, 2240]], np.int64)
    fraction = np.array([0.5, 0.123456, 1.0])
    path = tmp_path / "s.json"
    write_tiles(path, coords, fraction, toy_plan())
    got, got_fraction, plan = read_tiles(path)
    assert np.array_equal(got, coords) and got.dtype == np.int64
    assert np.array_equal(got_fraction, [0.5, 0.1235, 1.0])  # 4 decimals
    assert plan == toy_plan(n_tiles=3)  # n_tiles is the number of origins written
    data = json.loads(path.read_text())
    assert data["x"] == [0, 224, 4032] and data["y"] == [448, 448, 2240]

    write_tiles(path, np.zeros((0, 2)), np.zeros(0), toy_plan())
    got, got_fraction, plan = read_tiles(path)
    assert got.shape == (0, 2) and got_fraction.shape == (0,) and plan.n_tiles == 0


def test_tile_sets_of_rows_are_still_read(tmp_path: Path) -> None:
    """Tile sets written before the columns (rows of [x, y]) need no rerun of tiling."""
    path = tmp_path / "old.json"
    store.write_json(path, {"plan": asdict(toy_plan(n_tiles=2)),
                            "coords_level0": [[0, 0], [224, 0]], "tissue_fraction": [1.0, 0.5]})
    coords, fraction, plan = read_tiles(path)
    assert coords.tolist() == [[0, 0], [224, 0]] and fraction.tolist() == [1.0, 0.5]


@pytest.mark.parametrize("change", [
    {"y": [0]},  # columns of different lengths
    {"tissue_fraction": [1.0]},
    {"plan": {**asdict(toy_plan()), "n_tiles": 5}},
    {"x": None},
])
def test_damaged_tile_sets_get_one_line(tmp_path: Path, change: dict) -> None:
    path = tmp_path / "s.json"
    write_tiles(path, [[0, 0], [224, 0]], [1.0, 1.0], toy_plan())
    data = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    with pytest.raises(InputError, match=r"s\.json: not a tile set .*; rerun the tile step") as err:
        read_tiles(path)
    assert "\n" not in str(err.value)
