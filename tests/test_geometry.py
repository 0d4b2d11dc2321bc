"""srmil.wsi.geometry: GeoJSON, areas and overlaps, contours to rings, rasters."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from srmil.wsi.geometry import (
    contour_ring,
    covered_fractions,
    exterior_bounds,
    polygon_area,
    polygons_mask,
    read_geojson_polygons,
    write_geojson_polygons,
)


def _signed_area(ring: list[list[float]]) -> float:
    xy = np.asarray(ring, np.float64)
    return 0.5 * float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))


def _square(x0, y0, x1, y1, ccw=True):
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return ring if ccw else ring[::-1]


def test_contours_become_closed_rings_wound_as_rfc_7946_asks():
    mask = np.zeros((40, 60), np.uint8)
    mask[5:35, 5:55] = 1
    mask[10:20, 10:30] = 0  # a hole
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outer = next(i for i in range(len(contours)) if hierarchy[0][i][3] == -1)
    hole = hierarchy[0][outer][2]
    for scale in (1.0, 2.5):
        exterior = contour_ring(contours[outer], scale, outer=True)
        inner = contour_ring(contours[hole], scale, outer=False)
        for ring in (exterior, inner):
            assert ring[0] == ring[-1] and len(ring) >= 4
        assert _signed_area(exterior) > 0 > _signed_area(inner)  # exterior CCW, hole CW
        # Contour points are pixel centres: the outline runs through (x + 0.5) * scale,
        # rounded to 0.1 px.
        assert exterior_bounds([{"coordinates": [exterior]}])[0] == pytest.approx(
            np.array([5.5, 5.5, 54.5, 34.5]) * scale, abs=0.051)
        # Asked the other way round: the other winding.
        assert _signed_area(contour_ring(contours[outer], scale, outer=False)) < 0
        assert _signed_area(contour_ring(contours[hole], scale, outer=True)) > 0


def test_polygon_area_is_the_exterior_minus_its_holes():
    donut = {"type": "Polygon", "coordinates": [_square(0, 0, 10, 10),
                                                _square(2, 2, 4, 4, ccw=False)]}
    assert polygon_area(donut) == 96.0
    # Winding does not matter for the area; rings too short to enclose anything count 0.
    cw = {"type": "Polygon", "coordinates": [_square(0, 0, 10, 10, ccw=False), [[1, 1], [1, 1]]]}
    assert polygon_area(cw) == 100.0
    assert polygon_area({"type": "Polygon", "coordinates": [[[0, 0], [5, 5], [0, 0]]]}) == 0.0
    assert polygon_area({"type": "Polygon", "coordinates": []}) == 0.0


def test_geojson_round_trip(tmp_path):
    polygons = [{"type": "Polygon", "coordinates": [_square(0, 0, 10, 10)]}]
    path = tmp_path / "t.geojson"
    write_geojson_polygons(path, polygons, "Tissue", {"n_pieces": 1})
    text = path.read_text()
    assert text.endswith("}\n") and ", " not in text  # compact
    data = json.loads(text)
    assert data["properties"] == {"n_pieces": 1}
    assert data["features"][0]["properties"]["classification"] == {"name": "Tissue"}
    assert read_geojson_polygons(path) == polygons
    # A MultiPolygon (QuPath writes them for annotations of several pieces) and a bare geometry.
    multi = {"type": "MultiPolygon", "coordinates": [[_square(0, 0, 1, 1)], [_square(5, 5, 6, 6)]]}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": multi, "properties": {}},
        {"type": "Feature", "geometry": None, "properties": {}}]}))
    assert [p["coordinates"] for p in read_geojson_polygons(path)] == multi["coordinates"]
    path.write_text(json.dumps(polygons[0]))
    assert read_geojson_polygons(path) == polygons


def test_covered_fractions_agree_with_a_fine_raster():
    """Random polygons with holes over random boxes: the exact shares match a raster at 1/8 px
    to within what its edge pixels allow."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        polygons = []
        for _ in range(3):
            centre, radius = rng.uniform(20, 180, 2), rng.uniform(10, 60)
            angles = np.sort(rng.uniform(0, 2 * np.pi, 10))
            outer = centre + radius * rng.uniform(0.6, 1, (10, 1)) * np.c_[np.cos(angles),
                                                                           np.sin(angles)]
            inner = centre + 0.3 * radius * np.c_[np.cos(-angles), np.sin(-angles)]
            polygons.append({"type": "Polygon", "coordinates": [
                [*outer.tolist(), outer[0].tolist()], [*inner.tolist(), inner[0].tolist()]]})
        origins = rng.uniform(0, 180, (40, 2))
        sides = rng.uniform(5, 40, (40, 1))
        boxes = np.c_[origins, origins + sides]
        exact = covered_fractions(boxes, polygons)
        # The union on a raster: each polygon filled on its own, then combined.
        fine = np.zeros((1760, 1760), bool)
        for poly in polygons:
            fine |= polygons_mask([poly], fine.shape, 1 / 8) > 0
        for (x0, y0, x1, y1), share in zip(boxes * 8, exact, strict=True):
            cells = fine[round(y0):round(y1), round(x0):round(x1)]
            assert share == pytest.approx(cells.mean(), abs=0.03)
        assert ((exact >= 0) & (exact <= 1)).all() and (exact > 0).any() and (exact < 1).any()


def test_a_box_of_no_area_is_not_covered():
    square = {"type": "Polygon", "coordinates": [_square(0, 0, 10, 10)]}
    assert covered_fractions(np.array([[2, 2, 2, 8], [2, 2, 8, 8]]), [square]).tolist() == [0, 1]
