"""Whole-slide images: open a slide, find its tissue, tile it at a target µm/px."""
