"""Patch features: backbones, patch readers (OpenSlide, JPEG tiles, GPU decoding), extraction."""
