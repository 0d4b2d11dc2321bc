"""Polygons in level-0 px: GeoJSON in and out, areas and overlaps, contours to rings, rasters.

Polygons travel between stages as GeoJSON Polygon dicts, `{"type": "Polygon", "coordinates":
[exterior, *holes]}`, every ring a closed list of [x, y] in level-0 px: what the tissue GeoJSON
holds and what QuPath reads and writes. Segmentation, tiling, the attention diagnostics and the
heatmaps all take them from here.

- Areas and overlaps are shapely's (`polygon_area`, `covered_fractions`).
- Contours traced by OpenCV become rings here (`contour_ring`); their orientation is decided on
  the integer contour by OpenCV's signed area, which is exact. (GEOS's `is_ccw` looks at the
  top-most vertex only and can disagree with the net area on a self-touching ring, which
  traced tissue outlines sometimes are.)
- Rasters are OpenCV's: `polygons_mask` fills polygons, with holes, at 1/16 px precision
  (`fixed_point_rings` gives the rings in OpenCV's fixed-point form for drawing too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely

from srmil import store

Polygon = dict[str, Any]  # a GeoJSON Polygon: {"type": "Polygon", "coordinates": [...]}

# Vertices are given to OpenCV in fixed point, with this many fractional bits (1/16 px).
SHIFT = 4
# Polygons are rasterised this many times finer, then averaged (see polygons_mask).
RASTER_SUPERSAMPLE = 4
RASTER_MAX_SIDE = 16384


# --- GeoJSON ----------------------------------------------------------------------------------


def read_geojson_polygons(path: str | os.PathLike) -> list[Polygon]:
    """All Polygon / MultiPolygon geometries of a GeoJSON file, as Polygon dicts."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    features = data.get("features", [data]) if isinstance(data, dict) else data
    polygons = []
    for feature in features:
        geom = feature.get("geometry", feature) or {}
        if geom.get("type") == "Polygon":
            polygons.append(geom)
        elif geom.get("type") == "MultiPolygon":
            polygons.extend({"type": "Polygon", "coordinates": c} for c in geom["coordinates"])
    return polygons


def write_geojson_polygons(
    path: str | os.PathLike, polygons: list[Polygon], classification: str,
    properties: dict[str, Any],
) -> None:
    """A FeatureCollection of `polygons` as QuPath annotations of class `classification`, with
    `properties` on the collection; compact JSON (outlines have many vertices, and QuPath does
    not need indentation), keys sorted, written atomically."""
    features = [
        {
            "type": "Feature",
            "geometry": poly,
            "properties": {"objectType": "annotation", "classification": {"name": classification}},
        }
        for poly in polygons
    ]
    collection = {"type": "FeatureCollection", "features": features, "properties": properties}
    store.write_text(path, json.dumps(collection, sort_keys=True, separators=(",", ":")) + "\n")


# --- shapely: areas and overlaps --------------------------------------------------------------


def to_shapely(poly: Polygon) -> shapely.Polygon:
    """The shapely Polygon of a Polygon dict (x, y only). A ring of fewer than three points
    encloses nothing: such an exterior gives an empty polygon, such a hole is left out."""
    rings = [_points(r) for r in poly["coordinates"]]
    if not rings or len(rings[0]) < 3:
        return shapely.Polygon()
    return shapely.Polygon(rings[0], [r for r in rings[1:] if len(r) >= 3])


def _points(ring: list[list[float]]) -> np.ndarray:
    """A ring's (x, y) points, N x 2, without its closing point."""
    xy = np.array([p[:2] for p in ring], np.float64).reshape(-1, 2)
    return xy[:-1] if len(xy) > 1 and (xy[0] == xy[-1]).all() else xy


def polygon_area(poly: Polygon) -> float:
    """Area in level-0 px² (exterior minus holes)."""
    return float(shapely.area(to_shapely(poly)))


def polygon_union(polygons: list[Polygon]) -> shapely.Geometry:
    """The area the polygons cover together: holes left out, overlaps counted once. Invalid
    outlines (self-crossing, as hand-drawn annotations can be) are repaired first, keeping the
    area each ring encloses (`make_valid`, method "structure")."""
    shapes = [to_shapely(p) for p in polygons]
    shapes = [s for s in shapes if not s.is_empty]
    if not shapes:
        return shapely.Polygon()
    valid = shapely.make_valid(np.array(shapes), method="structure", keep_collapsed=False)
    return shapely.union_all(valid)


def covered_fractions(boxes: np.ndarray, polygons: list[Polygon]) -> np.ndarray:
    """Exact share of each box (N x 4: x0, y0, x1, y1 in level-0 px) that the polygons cover
    (their union: holes left out, overlaps counted once); 0 for a box of no area."""
    return region_fractions(boxes, polygon_union(polygons))


def region_fractions(boxes: np.ndarray, region: shapely.Geometry) -> np.ndarray:
    """Exact share of each box (N x 4, level-0 px) inside `region` (a shapely geometry)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    fractions = np.zeros(len(boxes))
    if len(boxes) == 0 or region.is_empty:
        return fractions
    parts = shapely.get_parts(region)  # polygons whose interiors do not overlap
    shapely.prepare(parts)
    squares = shapely.box(*boxes.T)
    box_area = shapely.area(squares)
    # Only the (box, part) pairs that touch; a box well inside a part is covered in full.
    box_i, part_i = shapely.STRtree(parts).query(squares, predicate="intersects")
    inside = shapely.contains_properly(parts[part_i], squares[box_i])
    area = box_area[box_i]
    edge = ~inside
    area[edge] = shapely.area(shapely.intersection(squares[box_i[edge]], parts[part_i[edge]]))
    covered = np.bincount(box_i, weights=area, minlength=len(boxes))
    np.divide(covered, box_area, out=fractions, where=box_area > 0)
    return np.minimum(fractions, 1.0)


def read_regions(path: str | os.PathLike, width: int, height: int,
                 what: str = "regions of interest") -> list[Polygon]:
    """The polygons of a GeoJSON of regions drawn on a slide (QuPath's export, level-0 px), as
    a one-line InputError when the file is unreadable, holds no polygon, or lies wholly outside
    the slide (`width` x `height` level-0 px: the usual sign of another slide's or another
    unit's coordinates)."""
    from srmil.errors import InputError

    try:
        polygons = read_geojson_polygons(path)
        region = polygon_union(polygons)
    except (OSError, ValueError, TypeError, KeyError, AttributeError,
            shapely.errors.ShapelyError) as err:
        raise InputError(f"{path}: not a readable GeoJSON of {what} ({type(err).__name__}: "
                         f"{err}); export the regions from QuPath as GeoJSON again") from None
    if region.is_empty:
        raise InputError(f"{path}: no polygon among the {what}; draw them as polygons or "
                         "rectangles, or leave the sheet's cell empty")
    if region.intersection(shapely.box(0, 0, width, height)).area == 0:
        x0, y0, x1, y1 = (round(v) for v in region.bounds)
        raise InputError(f"{path}: the {what} ({x0}, {y0})-({x1}, {y1}) lie outside the slide "
                         f"(0, 0)-({width}, {height}); export them in this slide's level-0 "
                         "pixels")
    return polygons


def exterior_bounds(polygons: list[Polygon]) -> np.ndarray:
    """(x0, y0, x1, y1) of each polygon's exterior in level-0 px, N x 4 (polygons without an
    exterior left out)."""
    boxes = [
        np.r_[xy.min(0), xy.max(0)]
        for xy in (np.asarray(p["coordinates"][0], np.float64).reshape(-1, 2) for p in polygons
                   if p["coordinates"] and len(p["coordinates"][0]))
    ]
    return np.array(boxes, np.float64).reshape(-1, 4)


# --- OpenCV: contours to rings, polygons to rasters -------------------------------------------


def contour_ring(
    contour: np.ndarray, scale: float, outer: bool, epsilon: float = 0.7, decimals: int = 1
) -> list[list[float]]:
    """A closed ring in level-0 px from an OpenCV contour (points at pixel centres, `scale`
    level-0 px per contour px), simplified to within `epsilon` contour px (Douglas-Peucker;
    the contour itself when that leaves fewer than three points), rounded to `decimals`, and
    wound as RFC 7946 asks: exteriors (`outer`) counter-clockwise, holes clockwise (in x/y as
    written)."""
    pts = cv2.approxPolyDP(contour, epsilon, True).reshape(-1, 2)
    if len(pts) < 3:
        pts = contour.reshape(-1, 2)
    # Signed area of the integer points: exact, and of the same sign as the ring's (a shift
    # and a positive scale).
    xy = (pts.astype(np.float64) + 0.5) * scale
    if (cv2.contourArea(pts, oriented=True) > 0) != outer:
        xy = xy[::-1]
    ring = np.round(xy, decimals).tolist()
    return ring + [ring[0]]


def fixed_point_rings(poly: Polygon, downsample: float) -> list[np.ndarray]:
    """The polygon's rings in px of an image at `downsample` (pixel centres at integers), in
    OpenCV's fixed point (int32, SHIFT fractional bits): for fillPoly and polylines."""
    return [
        np.round((np.asarray(r, np.float64) / downsample - 0.5) * (1 << SHIFT)).astype(np.int32)
        for r in poly["coordinates"]
    ]


def polygons_mask(
    polygons: list[Polygon],
    shape: tuple[int, int],
    downsample: float,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Rasterise level-0 polygons (with holes) to a uint8 0/1 mask of `shape` at `downsample`;
    vertices keep 1/16 px precision.

    With `window` (y0, y1, x0, x1 in mask px), only that part of the mask is made: the same
    pixels as the whole mask's when no polygon crosses the window's edges inside the mask
    (e.g. polygons_window), in the window's memory."""
    # fillPoly also sets every pixel an edge touches (about half a pixel too much all round):
    # draw `factor` times finer and keep the pixels that are at least half covered.
    factor = max(1, min(RASTER_SUPERSAMPLE, RASTER_MAX_SIDE // max(1, *shape)))
    y0, y1, x0, x1 = window or (0, shape[0], 0, shape[1])
    if y1 <= y0 or x1 <= x0:
        return np.zeros((max(0, y1 - y0), max(0, x1 - x0)), np.uint8)
    fine = np.zeros(((y1 - y0) * factor, (x1 - x0) * factor), np.uint8)
    # A whole number of fine px in fixed point: the same raster, shifted.
    shift = np.array([x0, y0], np.int32) * factor * (1 << SHIFT)
    for poly in polygons:
        rings = [r - shift for r in fixed_point_rings(poly, downsample / factor)]
        cv2.fillPoly(fine, rings[:1], 1, cv2.LINE_8, SHIFT)
        if len(rings) > 1:
            cv2.fillPoly(fine, rings[1:], 0, cv2.LINE_8, SHIFT)
    if factor == 1:
        return fine
    fine *= 255
    coarse = cv2.resize(fine, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    del fine
    return np.greater_equal(coarse, 128).view(np.uint8)


def polygons_window(
    polygons: list[Polygon], shape: tuple[int, int], downsample: float
) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the part of a `shape` mask at `downsample` that polygons_mask can set,
    i.e. the polygons' bounding box with 2 px to spare (edge pixels), within the mask."""
    bounds = exterior_bounds(polygons)
    if not len(bounds):
        return (0, 0, 0, 0)
    bounds = bounds / downsample
    x0, y0 = np.floor(bounds[:, :2].min(0)) - 2
    x1, y1 = np.ceil(bounds[:, 2:].max(0)) + 2
    ys = np.clip([y0, y1], 0, shape[0]).astype(int)
    xs = np.clip([x0, x1], 0, shape[1]).astype(int)
    return int(ys[0]), int(ys[1]), int(xs[0]), int(xs[1])
