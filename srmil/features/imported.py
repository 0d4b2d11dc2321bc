"""Features a slide already has, and features for other tools: CLAM's, TRIDENT's and STAMP's HDF5
files and srmil's own Zarr stores from another run, imported as this workflow's feature store and
tile set (`import_features`, `import_tiles`), and srmil's stores exported to those HDF5 layouts
(`export_store`).

The layouts, as the tools write them (read from their code; docs/features.md):
- CLAM (`extract_features_fp.py`, `h5_files/{slide}.h5`): datasets `features` (N x D float32)
  and `coords` (N x 2, level-0 px of each patch's top-left corner). The patch size is in the
  `coords` attributes of CLAM's patch files (`patch_size` at `patch_level`, `downsample`), which
  its feature files do not always carry; without it the grid step is taken as the patch size.
- TRIDENT (`features_{encoder}/{slide}.h5`): the same two datasets; `coords` carries
  `patch_size` (at the target magnification), `patch_size_level0`, `level0_magnification`,
  `target_magnification`, `overlap`, `level0_width`, `level0_height`; `features` the `encoder`.
- STAMP (KatherLab/STAMP, `{extractor}/{slide}.h5`; read at commit c54ce06, v2.5.0:
  `src/stamp/preprocessing/__init__.py` writes, `src/stamp/modeling/data.py::get_coords` reads):
  datasets `feats` (N x D float16) and `coords` (N x 2 float32, µm of each tile's top-left
  corner at level 0); root attributes `extractor`, `unit` ("um"), `tile_size_um`, `tile_size_px`,
  `feat_type` ("tile"), `stamp_version`, `code_hash`. STAMP 2.0 named the tile side `tile_size`
  (beside `unit`); STAMP 1 (v1.1.1) wrote no units: its coords are px of the 256 µm / 224 px
  tiles, which STAMP 2 still assumes for a file whose tiles step 224.
- srmil: a feature store (`{slide}.zarr`) with its provenance.

The coordinates must form one square patch grid (origins on multiples of one step, one patch per
cell): the spatial graph is built on it. Everything else is a one-line error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from srmil import __version__, store
from srmil.errors import InputError
from srmil.store import FeatureProvenance
from srmil.wsi.tiling import ReadPlan, read_tiles, write_tiles

LAYOUTS = ("clam", "trident", "stamp")
# Magnification to µm/px, as TRIDENT and CLAM's presets take it: 40x = 0.25 µm/px.
MAG_TIMES_MPP = 10.0
# Origins may be off the grid by this many level-0 px (rounding of fractional steps).
GRID_TOLERANCE = 1.0
# An HDF5 root attribute holding srmil's whole provenance, so that an exported file imports back
# with it (other tools ignore it).
PROVENANCE_ATTR = "srmil_provenance"
# STAMP 1's tiles, which STAMP 2 assumes for a file without units whose tiles step 224.
STAMP1_TILE_PX = 224
STAMP1_TILE_UM = 256.0


class FeatureFileError(InputError):
    """A feature file that cannot be imported; one line naming it and the fix."""


@dataclass(frozen=True)
class FeatureFile:
    """One slide's features as another tool (or another srmil run) left them."""

    path: Path
    format: str  # clam, trident, stamp or srmil
    features: np.ndarray  # N x D
    coords: np.ndarray  # N x 2: int64 level-0 px, or the file's unit while coord_unit_um is set
    patch_level0: float | None  # patch side in level-0 px, where the file says
    patch_px: int | None  # patch side at the target resolution
    level: int  # the pyramid level the tool read
    slide_mpp: float | None  # level-0 µm/px, where the file says
    target_mpp: float | None
    width: int | None  # level-0 px
    height: int | None
    encoder: str | None
    provenance: FeatureProvenance | None = None  # srmil's, complete
    # STAMP's coordinates are µm (STAMP 1's, px of 256/224 µm): µm per coordinate unit and the
    # tile side in µm, until `in_level0_px` converts them with the slide's µm/px.
    coord_unit_um: float | None = None
    patch_um: float | None = None
    stamp_grid: bool = False  # tiles cut by STAMP 2's tiler (`in_level0_px`)


def read_feature_file(path: str | os.PathLike) -> FeatureFile:
    """A CLAM, TRIDENT or STAMP HDF5 file, or an srmil feature store, checked for its datasets
    and their shapes (not yet for the grid: `grid_step`). A STAMP file's coordinates stay in µm
    until `in_level0_px`, unless srmil wrote it (its provenance records the slide's µm/px)."""
    path = Path(path)
    if path.is_dir():
        return _read_store(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found; fix its path in the sample "
                               "sheet's features column")
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "feats" in f and "features" not in f:
                return _read_stamp(path, f)
            return _read_clam_or_trident(path, f)
    except OSError as err:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({err}); export the features "
                               "again or fix the path") from None


def _read_clam_or_trident(path: Path, f: Any) -> FeatureFile:
    missing = [name for name in ("features", "coords") if name not in f]
    if missing:
        hint = ("; CLAM's pt_files/ hold no coordinates, use its h5_files/"
                if "coords" in missing else "")
        raise FeatureFileError(f"{path}: no {' and no '.join(missing)} dataset; a feature file "
                               f"holds features (N x D) and coords (N x 2), or STAMP's feats "
                               f"and coords{hint}")
    features, coords = _check_arrays(path, f["features"][()], f["coords"][()])
    attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
    encoder = f["features"].attrs.get("encoder")
    encoder = _plain(encoder) if encoder is not None else None
    provenance = f.attrs.get(PROVENANCE_ATTR)
    if provenance is not None:  # written by export_store: srmil's own provenance comes back
        fmt = "trident" if "patch_size_level0" in attrs else "clam"
        return replace(_from_provenance(path, fmt, features, coords, _provenance(provenance)),
                       width=_integer(attrs.get("level0_width")),
                       height=_integer(attrs.get("level0_height")))
    if "patch_size_level0" in attrs:
        level0_mag = _number(attrs.get("level0_magnification"))
        target_mag = _number(attrs.get("target_magnification"))
        return FeatureFile(
            path, "trident", features, coords,
            patch_level0=float(attrs["patch_size_level0"]),
            patch_px=int(attrs["patch_size"]) if "patch_size" in attrs else None,
            level=0,
            slide_mpp=MAG_TIMES_MPP / level0_mag if level0_mag else None,
            target_mpp=MAG_TIMES_MPP / target_mag if target_mag else None,
            width=_integer(attrs.get("level0_width")),
            height=_integer(attrs.get("level0_height")),
            encoder=encoder,
        )  # fmt: skip
    downsample = attrs.get("downsample")
    size = attrs.get("patch_size")
    level0 = (float(size) * float(np.ravel(downsample)[0])
              if size is not None and downsample is not None else None)
    return FeatureFile(path, "clam", features, coords, patch_level0=level0,
                       patch_px=int(size) if size is not None else None,
                       level=int(attrs.get("patch_level", 0)), slide_mpp=None, target_mpp=None,
                       width=None, height=None, encoder=encoder)


def _read_stamp(path: Path, f: Any) -> FeatureFile:
    """STAMP's `feats` and `coords` (µm), with its root attributes (the module's docstring)."""
    if "coords" not in f:
        raise FeatureFileError(f"{path}: a STAMP file (feats) without a coords dataset; srmil "
                               "needs each tile's position: extract it with stamp preprocess, "
                               "which writes coords")
    features, coords = _check_arrays(path, f["feats"][()], f["coords"][()], unit="µm")
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    unit_um, tile_um, tile_px = _stamp_units(path, attrs, coords)
    found = FeatureFile(path, "stamp", features, coords, patch_level0=None, patch_px=tile_px,
                        level=0, slide_mpp=None,
                        target_mpp=tile_um / tile_px if tile_px else None, width=None,
                        height=None, encoder=attrs.get("extractor") or None,
                        coord_unit_um=unit_um, patch_um=tile_um,
                        stamp_grid=unit_um == 1.0 and PROVENANCE_ATTR not in attrs)
    if PROVENANCE_ATTR not in attrs:
        return found
    # Written by export_store from level-0 px and the slide µm/px it records: back to those px.
    prov = _provenance(attrs[PROVENANCE_ATTR])
    if not prov.slide_mpp:
        raise FeatureFileError(f"{path}: its srmil provenance records no slide µm/px; export the "
                               "store again")
    px = in_level0_px(found, prov.slide_mpp)
    return _from_provenance(path, "stamp", px.features, px.coords, prov)


def _stamp_units(path: Path, attrs: dict[str, Any],
                 coords: np.ndarray) -> tuple[float, float, int | None]:
    """(µm per coordinate unit, tile side in µm, tile side in px) of a STAMP file, read as
    STAMP's own reader (`get_coords`) reads them."""
    unit = attrs.get("unit")
    if unit not in (None, "um"):
        raise FeatureFileError(f"{path}: STAMP coordinates in unit {unit!r}, which srmil does not "
                               "know; write coords in µm with the attribute unit='um', or "
                               "extract again with stamp preprocess")
    tile_um = _number(attrs.get("tile_size_um"))  # STAMP 2.1 and later
    if tile_um is None and unit == "um":
        tile_um = _number(attrs.get("tile_size"))  # STAMP 2.0
    if tile_um is not None:
        return 1.0, tile_um, _integer(attrs.get("tile_size_px"))
    if unit == "um":
        raise FeatureFileError(f"{path}: STAMP coordinates in µm but no tile size; add the tile "
                               "side in µm as the attribute tile_size_um, or extract again with "
                               "stamp preprocess")
    step = _number(attrs.get("tile_size")) or _smallest_gap(coords)
    if step is None or round(step) != STAMP1_TILE_PX:
        said = f"step {step:g}" if step is not None else "give no step"
        raise FeatureFileError(f"{path}: a STAMP file without a unit attribute whose tiles {said},"
                               f" not STAMP 1's {STAMP1_TILE_PX} px: the coordinates' unit is "
                               "unknown; extract again with stamp preprocess (2.1 or later "
                               "writes unit and tile_size_um)")
    return STAMP1_TILE_UM / STAMP1_TILE_PX, STAMP1_TILE_UM, STAMP1_TILE_PX


def _smallest_gap(coords: np.ndarray) -> float | None:
    """The smallest step between distinct values of either axis (STAMP's `get_stride`)."""
    gaps = [np.diff(np.unique(axis)).min() for axis in coords.T if len(np.unique(axis)) > 1]
    return float(min(gaps)) if gaps else None


def in_level0_px(found: FeatureFile, slide_mpp: float) -> FeatureFile:
    """`found` with its coordinates and patch side in level-0 px: STAMP's µm divided by the
    slide's µm/px (other layouts are already in px)."""
    if found.coord_unit_um is None:
        return found
    px = found.coords * (found.coord_unit_um / slide_mpp)
    patch_level0 = found.patch_um / slide_mpp if found.patch_um else None
    if found.stamp_grid and patch_level0:
        # STAMP 2 (`tiling._supertiles`) reads every tile as ceil(tile µm / slide µm/px) level-0
        # px on a grid of that step from the origin, but records a tile's origin as its
        # supertile's plus k tile µm, short of the grid by up to k px where the division is not
        # whole (10x slides): the pixels lie on the grid, so the origins go back onto it.
        step = float(np.ceil(found.patch_um / slide_mpp))
        px, patch_level0 = np.rint(px / step) * step, step
    return replace(found, coords=np.rint(px).astype(np.int64), patch_level0=patch_level0,
                   coord_unit_um=None, stamp_grid=False)


def _read_store(path: Path) -> FeatureFile:
    features, coords, attrs = store.read_feature_store(path)
    if attrs.get("excluded"):
        raise FeatureFileError(f"{path}: the store records an excluded slide "
                               f"({attrs['excluded']}); point the sheet at a complete store")
    features, coords = _check_arrays(path, features, coords)
    return _from_provenance(path, "srmil", features, coords, FeatureProvenance.from_attrs(attrs))


def _from_provenance(path: Path, fmt: str, features: np.ndarray, coords: np.ndarray,
                     prov: FeatureProvenance) -> FeatureFile:
    return FeatureFile(path, fmt, features, coords, patch_level0=prov.patch_level0,
                       patch_px=prov.patch_px, level=int(prov.read_level or 0),
                       slide_mpp=prov.slide_mpp, target_mpp=prov.mpp, width=None, height=None,
                       encoder=prov.extractor, provenance=prov)


def _provenance(text: Any) -> FeatureProvenance:
    return FeatureProvenance.from_attrs(json.loads(text))


def _check_arrays(path: Path, features: Any, coords: Any,
                  unit: str = "level-0 px") -> tuple[np.ndarray, np.ndarray]:
    """Features (N x D floats) and coordinates (N x 2, finite, not negative); coordinates in
    level-0 px are rounded to whole px, others (STAMP's µm) kept as floats."""
    features, coords = np.asarray(features), np.asarray(coords)
    if coords.ndim == 3 and coords.shape[0] == 1:  # some tools keep a batch axis
        coords = coords[0]
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise FeatureFileError(f"{path}: features of shape {features.shape} and type "
                               f"{features.dtype}; expected N x D floats, one row per patch")
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(features):
        raise FeatureFileError(f"{path}: coords of shape {coords.shape} for {len(features)} "
                               f"feature rows; expected N x 2 (x, y of each patch, {unit})")
    if not np.isfinite(features).all():
        raise FeatureFileError(f"{path}: features hold NaN or infinite values; extract them "
                               "again")
    if not np.isfinite(coords).all() or (coords < 0).any():
        raise FeatureFileError(f"{path}: negative or non-finite coordinates; expected {unit} "
                               "of each patch's top-left corner")
    if unit != "level-0 px":
        return features, coords.astype(np.float64)
    return features, np.rint(coords).astype(np.int64)


def grid_step(coords: np.ndarray, patch_level0: float | None,
              path: str | os.PathLike = "the feature file") -> float:
    """The grid step (level-0 px) the patch origins lie on; a FeatureFileError when they do not
    form one square grid with one patch per cell (unaligned or overlapping patches)."""
    steps = []
    for values in coords.T:
        step = _axis_step(values)
        if step is None:
            continue
        offsets = (values - values.min()) / step
        off_grid = float(np.abs(offsets - np.rint(offsets)).max() * step)
        if off_grid > GRID_TOLERANCE:
            raise FeatureFileError(
                f"{path}: patch origins are not on one grid (a step of {step:g} px leaves some "
                f"{off_grid:.1f} px off it): unaligned patches; tile the slide on one grid or "
                "let srmil tile it")
        steps.append(step)
    if not steps:  # one row and one column: a single patch
        return float(patch_level0 or 1.0)
    if len(steps) == 2 and abs(steps[0] - steps[1]) > GRID_TOLERANCE:
        raise FeatureFileError(f"{path}: patch origins step {steps[0]:g} px in x but "
                               f"{steps[1]:g} px in y; srmil's graph needs a square grid")
    step = float(np.mean(steps))
    offsets = (coords - coords.min(axis=0)) / step
    cells = np.rint(offsets).astype(np.int64)
    _, counts = np.unique(cells, axis=0, return_counts=True)
    if (counts > 1).any():
        raise FeatureFileError(f"{path}: {int((counts > 1).sum())} grid cell(s) hold more than "
                               f"one patch (step {step:g} px): overlapping patches; keep one "
                               "patch per grid position")
    if patch_level0 is not None and step < patch_level0 / 2:
        raise FeatureFileError(f"{path}: patches of {patch_level0:g} px on a {step:g} px step "
                               "overlap by more than half: overlapping patches; tile the slide "
                               "without overlap or let srmil tile it")
    return step


def _axis_step(values: np.ndarray) -> float | None:
    """The step of one axis: its span over the whole number of smallest gaps it holds."""
    unique = np.unique(values)
    if len(unique) < 2:
        return None
    gaps = np.diff(unique)
    n_steps = max(1, round(float(unique[-1] - unique[0]) / float(gaps.min())))
    return float(unique[-1] - unique[0]) / n_steps


def import_tiles(source: str | os.PathLike, out_tiles: str | os.PathLike,
                 slide_path: str | os.PathLike | None = None,
                 mpp: float | None = None) -> ReadPlan:
    """Write the coordinates of `source` (a feature file or store) as the slide's tile set,
    which the graph and the heatmaps then use as they use srmil's own."""
    found, plan = read_imported(source, slide_path, mpp)
    write_tiles(out_tiles, found.coords, np.ones(len(found.coords)), plan)
    return plan


def import_features(source: str | os.PathLike, out_store: str | os.PathLike, extractor: str,
                    slide_path: str | os.PathLike | None = None,
                    mpp: float | None = None) -> FeatureProvenance:
    """Write the features of `source` as this workflow's feature store of `extractor`, with
    their provenance: srmil's own where the file has it (the extractor and weights it was made
    with), else the file's format, encoder and sha256."""
    found, plan = read_imported(source, slide_path, mpp)
    source_info = {"path": str(found.path), "format": found.format,
                   "sha256": _digest(found.path)}
    if found.provenance is not None:
        provenance = replace(found.provenance, extractor=extractor, skipped=plan.skipped,
                             source=source_info)
    else:
        dim = int(found.features.shape[1])
        provenance = FeatureProvenance(
            srmil_version=__version__, extractor=extractor,
            backbone={"imported": found.format, "encoder": found.encoder},
            # No weights to hash: files of one format and encoder with one width count as one
            # extractor, so a cohort cannot mix them with other features unnoticed.
            weights_hash=hashlib.sha256(
                f"imported:{found.format}:{found.encoder}:{dim}".encode()).hexdigest(),
            feature_dim=dim, n_patches=len(found.coords), skipped=plan.skipped,
            slide=Path(slide_path).name if slide_path else None, mpp=plan.target_mpp,
            slide_mpp=plan.slide_mpp, patch_px=plan.patch_px, stride_px=plan.stride_px,
            patch_level0=plan.patch_level0, stride_level0=plan.stride_level0,
            read_level=plan.level, read_px=plan.read_px, dtype=found.features.dtype.name,
            source=source_info,
        )  # fmt: skip
    # The file's own precision: a float32 file stays float32.
    store.write_feature_store(out_store, found.features, found.coords, provenance.attrs(),
                              dtype=found.features.dtype.name)
    return provenance


def read_imported(source: str | os.PathLike, slide_path: str | os.PathLike | None = None,
                  mpp: float | None = None) -> tuple[FeatureFile, ReadPlan]:
    """The feature file `source` with its patches in level-0 px (STAMP's µm divided by the
    slide's µm/px), and the read plan it stands for: its grid (checked), patch size and
    resolution, and the slide's size (from the slide file where given, else the patches')."""
    found = read_feature_file(source)
    width, height, slide_mpp, mpp_source = _slide_facts(found, slide_path, mpp)
    found = in_level0_px(found, slide_mpp)
    if width is None or height is None:  # the extent of the patches
        size = found.patch_level0 or 0
        far = found.coords.max(axis=0) + size if len(found.coords) else np.zeros(2)
        width, height = int(np.ceil(far[0])), int(np.ceil(far[1]))
    return found, _plan(found, width, height, slide_mpp, mpp_source)


def _plan(found: FeatureFile, width: int, height: int, slide_mpp: float,
          mpp_source: str) -> ReadPlan:
    if found.provenance is not None and found.provenance.stride_level0:
        step = float(found.provenance.stride_level0)
        grid_step(found.coords, found.patch_level0, found.path)  # still one patch per cell
    else:
        step = grid_step(found.coords, found.patch_level0, found.path)
    patch_level0 = float(found.patch_level0 or step)
    patch_px = int(found.patch_px or round(patch_level0))
    # The file's target resolution holds for the slide µm/px it was made with; another one (the
    # sheet's, the slide file's) scales it.
    same_slide = found.slide_mpp is not None and abs(found.slide_mpp - slide_mpp) < 1e-9
    target_mpp = (found.target_mpp if found.target_mpp and same_slide
                  else slide_mpp * patch_level0 / patch_px)
    return ReadPlan(
        target_mpp=float(target_mpp), patch_px=patch_px,
        stride_px=int(round(step * patch_px / patch_level0)), slide_mpp=float(slide_mpp),
        mpp_source=mpp_source, patch_level0=patch_level0, stride_level0=step,
        level=found.level, level_downsample=patch_level0 / patch_px, read_px=patch_px,
        slide_width=int(width), slide_height=int(height), min_tissue_fraction=0.0,
        params={"imported": str(found.path), "format": found.format},
        n_tiles=len(found.coords),
        skipped=None if len(found.coords) else f"no patches in {found.path.name}",
    )  # fmt: skip


def _slide_facts(found: FeatureFile, slide_path: str | os.PathLike | None,
                 mpp: float | None) -> tuple[int | None, int | None, float, str]:
    """(width, height, level-0 µm/px, where the µm/px came from) of the slide; its size is
    None where neither the slide file nor the feature file gives it."""
    width, height, slide_mpp, source = found.width, found.height, found.slide_mpp, "feature file"
    if slide_path:
        from srmil.wsi.slide import open_slide, slide_info

        with open_slide(slide_path) as slide:
            info = slide_info(slide, slide_path, mpp, slide_mpp)
        width, height, slide_mpp, source = info.width, info.height, info.mpp, info.mpp_source
    elif mpp is not None and np.isfinite(mpp):
        slide_mpp, source = float(mpp), "sample sheet"
    if slide_mpp is None:
        why = " of the slide (its coordinates are in µm)" if found.coord_unit_um else ""
        raise FeatureFileError(f"{found.path}: a {found.format.upper()} feature file records no "
                               f"µm/px{why}; give the slide file in the sheet's path "
                               "column or its µm/px in an mpp column")
    return width, height, float(slide_mpp), source


def export_store(store_path: str | os.PathLike, out_dir: str | os.PathLike, layout: str,
                 tiles_path: str | os.PathLike | None = None) -> list[Path]:
    """Write one srmil feature store in CLAM's layout (`h5_files/{slide}.h5` and
    `pt_files/{slide}.pt`), TRIDENT's or STAMP's (`{slide}.h5`); returns the files written. The
    slide's tile set (`tiles_path`), where given, supplies its size for TRIDENT's attributes."""
    if layout not in LAYOUTS:
        raise InputError(f"layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    features, coords, attrs = store.read_feature_store(store_path)
    prov = FeatureProvenance.from_attrs(attrs)
    if attrs.get("excluded") or prov.patch_level0 is None or not prov.slide_mpp:
        raise InputError(f"{store_path}: not a feature store of an extracted slide; rerun the "
                         "features step")
    name = Path(store_path).name.removesuffix(".zarr")
    out = Path(out_dir)
    if layout == "stamp":
        with store.atomic_path(out / f"{name}.h5", ".h5") as tmp:
            _write_stamp(tmp, features, coords, prov, attrs)
        return [out / f"{name}.h5"]
    coords_attrs: dict[str, Any]
    if layout == "clam":  # CLAM's patch attributes at level 0: its readers need no pyramid
        h5_path = out / "h5_files" / f"{name}.h5"
        coords_attrs = {"patch_size": int(round(prov.patch_level0)), "patch_level": 0,
                        "downsample": [1.0, 1.0], "name": name}
    else:
        h5_path = out / f"{name}.h5"
        coords_attrs = {
            "patch_size": int(prov.patch_px), "patch_size_level0": int(round(prov.patch_level0)),
            "level0_magnification": MAG_TIMES_MPP / float(prov.slide_mpp),
            "target_magnification": MAG_TIMES_MPP / float(prov.mpp),
            "overlap": int(prov.patch_px - prov.stride_px), "name": name,
            "savetodir": str(out),
        }
        if tiles_path is not None:
            plan = read_tiles(tiles_path)[2]
            coords_attrs.update(level0_width=plan.slide_width, level0_height=plan.slide_height)
    features = features.astype(np.float32)
    with store.atomic_path(h5_path, ".h5") as tmp:
        _write_h5(tmp, features, coords, coords_attrs, prov, attrs)
    written = [h5_path]
    if layout == "clam":
        import torch

        # CLAM trains on these: one tensor per slide, torch.load-ed with weights_only.
        store.save_tensors(out / "pt_files" / f"{name}.pt", torch.from_numpy(features))
        written.append(out / "pt_files" / f"{name}.pt")
    return written


def _write_h5(path: Path, features: np.ndarray, coords: np.ndarray, coords_attrs: dict[str, Any],
              prov: FeatureProvenance, attrs: dict[str, Any]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f["features"].attrs["encoder"] = prov.extractor or ""
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for key, value in coords_attrs.items():
            f["coords"].attrs[key] = value
        f.attrs[PROVENANCE_ATTR] = _provenance_json(attrs)


def _write_stamp(path: Path, features: np.ndarray, coords: np.ndarray, prov: FeatureProvenance,
                 attrs: dict[str, Any]) -> None:
    """STAMP 2.1's layout, as `stamp preprocess` writes it and `get_coords` reads it, but for
    `stamp_version` (STAMP refuses a file that names a newer STAMP than itself; srmil is none)
    and `code_hash` (STAMP's own code)."""
    import h5py

    slide_mpp = float(prov.slide_mpp)
    with h5py.File(path, "w") as f:
        # The store's precision (srmil's and STAMP's default float16; STAMP reads any float).
        f.create_dataset("feats", data=features.astype(prov.dtype or "float32"))
        # µm of each patch's top-left corner at level 0, float32 as STAMP writes them; level-0 px
        # come back exactly (float32 keeps 150 000 px at 0.25 µm/px to 0.01 px).
        f.create_dataset("coords", data=(np.asarray(coords) * slide_mpp).astype(np.float32))
        f.attrs["extractor"] = prov.extractor or ""
        f.attrs["unit"] = "um"
        f.attrs["tile_size_um"] = float(prov.patch_level0) * slide_mpp
        f.attrs["tile_size_px"] = int(prov.patch_px)
        f.attrs["feat_type"] = "tile"
        f.attrs[PROVENANCE_ATTR] = _provenance_json(attrs)


def _provenance_json(attrs: dict[str, Any]) -> str:
    """A store's attributes as the JSON an exported file carries (import reads it back)."""
    return json.dumps({k: v for k, v in attrs.items() if k != store.COMPLETE_ATTR},
                      sort_keys=True)


def _digest(path: Path) -> str:
    """sha256 of a file, or of a store's files in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes to str, numpy scalars to numbers)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None
