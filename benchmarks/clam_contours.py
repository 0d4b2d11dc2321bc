"""Run CLAM's tissue segmentation on one slide and print its contours as JSON (level-0 px).

Runs under CLAM's own Python with CLAM's checkout on sys.path (see segment_tile.py); it calls
CLAM's public `WholeSlideImage.segmentTissue` with the settings `create_patches_fp.py` uses when
given no preset (seg_level = the level for downsample 64, sthresh 8, mthresh 7, close 4, no
Otsu, a_t 100, a_h 16, max_n_holes 8), so the mask is the one behind CLAM's patches.
"""

import json
import sys

from wsi_core.WholeSlideImage import WholeSlideImage  # CLAM, found through PYTHONPATH


def main(slide_path: str) -> None:
    wsi = WholeSlideImage(slide_path)
    handle = wsi.getOpenSlide()
    seg_level = 0 if len(wsi.level_dim) == 1 else handle.get_best_level_for_downsample(64)
    wsi.segmentTissue(
        seg_level=seg_level,
        sthresh=8,
        mthresh=7,
        close=4,
        use_otsu=False,
        filter_params={"a_t": 100, "a_h": 16, "max_n_holes": 8},
        keep_ids=[],
        exclude_ids=[],
    )
    pieces = [
        {
            "outer": contour.reshape(-1, 2).tolist(),
            "holes": [hole.reshape(-1, 2).tolist() for hole in holes],
        }
        for contour, holes in zip(wsi.contours_tissue, wsi.holes_tissue, strict=True)
    ]
    json.dump({"seg_level": int(seg_level), "pieces": pieces}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
