"""A deterministic synthetic cohort of pyramidal H&E-like slides, so a fresh clone runs end to end.

Each slide is drawn from `numpy.random.default_rng([seed, slide_index])`: one to three irregular
tissue pieces (some with lumen-like holes) on a white background, pink fibrous stroma with small
dark nuclei, and, on positive slides, a few small tumour regions of crowded, large, dark
blue-purple nuclei. Slides alternate between an Aperio-style `.svs` and a generic tiled `.tif`
(both JPEG, 256 px tiles, factor-4 pyramid) that OpenSlide reads with a µm/px. Beside them go
ground-truth masks at downsample 16, QuPath-style GeoJSON of the tumour regions and `samples.csv`.

Modules, in the order a slide is made:
- `plan`: the cohort (ids, labels, patients, paths): cheap, numpy only, imported by the
  Snakefile at every parse, so this package's `__init__` imports nothing.
- `geometry`: tissue pieces, lumen holes and tumour regions as signed-distance fields on a
  coarse grid; level-0 masks of any band of rows.
- `nuclei`: where nuclei lie and what they look like; drawing them into a haematoxylin layer.
- `stain`: H&E colour: stain amounts -> RGB through a look-up table.
- `artifacts`: pen strokes and black borders.
- `render`: the one renderer: level-0 pixels band by band, with level 1 and the masks.
- `write`: pyramidal SVS and TIFF files, masks, annotations, the sample sheet (`write_demo`).
"""
