"""What a slide carries besides tissue: pen strokes and black borders, planned from their own
random stream (so tissue stays as without them) and drawn band by band onto the pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from srmil.demo.geometry import Blob
from srmil.demo.stain import BACKGROUND_RGB

# Marker inks seen on slides (RGB seen through the ink on white glass).
PEN_INKS = {"blue": (22, 60, 170), "green": (30, 130, 60), "black": (28, 28, 34)}
ARTIFACT_STREAM = 0xA27  # artifacts draw from their own stream: tissue stays as without them


@dataclass(frozen=True)
class Artifacts:
    """What a slide carries besides tissue: pen strokes (blue, green or black marker ink) and a
    black border (the dark frame some scanners leave). Neither counts as tissue."""

    pen_strokes: int = 0
    black_border: bool = False


@dataclass(frozen=True)
class PenStroke:
    points: np.ndarray  # (n, 2) level-0 px along the stroke
    width_px: float
    rgb: tuple[int, int, int]
    density: float  # 1 = as dark as the ink gets


@dataclass(frozen=True)
class BlackBorder:
    """Per side (left, right, top, bottom): the border's width in px at both ends of that side
    (0 = none), so the inner edge may slant."""

    widths: tuple[tuple[float, float], ...]
    level: int  # mean grey value of the border


def plan_artifacts(rng: np.random.Generator, pieces: tuple[Blob, ...], width_px: int,
                   height_px: int, mpp: float,
                   artifacts: Artifacts) -> tuple[list[PenStroke], BlackBorder | None]:
    """Pen strokes (circles drawn around a tissue piece, or a short scribble) and a border."""
    strokes = []
    short = min(width_px, height_px)
    for k in range(artifacts.pen_strokes):
        ink = list(PEN_INKS)[int(rng.integers(len(PEN_INKS)))]
        width = min(rng.uniform(60.0, 200.0) / mpp, 0.03 * short)
        if k % 2 == 0 and pieces:  # the usual mark: a loop around a region of interest
            piece = pieces[int(rng.integers(len(pieces)))]
            t0 = rng.uniform(0, 2 * np.pi)
            t = t0 + np.linspace(0, rng.uniform(1.1, 1.8) * np.pi, 120)
            grow = rng.uniform(1.05, 1.35)
            c, s_ = math.cos(piece.angle), math.sin(piece.angle)
            u, v = grow * piece.reach() * np.cos(t), grow * piece.reach() * np.sin(t) * 0.8
            pts = np.stack([piece.cx + u * c - v * s_, piece.cy + u * s_ + v * c], 1)
        else:  # a scribble near a corner
            x0 = rng.uniform(0.04, 0.2) * width_px
            y0 = rng.uniform(0.04, 0.2) * height_px
            if rng.random() < 0.5:
                x0 = width_px - x0
            steps = rng.normal(0, 0.04 * short, size=(6, 2))
            pts = np.array([x0, y0]) + np.cumsum(steps, 0)
        pts[:, 0] = np.clip(pts[:, 0], 0, width_px - 1)
        pts[:, 1] = np.clip(pts[:, 1], 0, height_px - 1)
        strokes.append(PenStroke(pts, float(width), PEN_INKS[ink], float(rng.uniform(0.8, 1.0))))
    border = None
    if artifacts.black_border:
        sides = rng.permutation(4)[: int(rng.integers(1, 3))]
        widths = [(0.0, 0.0)] * 4
        for side in sides.tolist():
            extent = width_px if side < 2 else height_px
            widths[side] = tuple(float(w) for w in rng.uniform(0.006, 0.02, 2) * extent)
        border = BlackBorder(tuple(widths), int(rng.integers(14, 34)))
    return strokes, border


def apply_artifacts(rgb: np.ndarray, y0: int, height_px: int, strokes: list[PenStroke],
                    border: BlackBorder | None, rng: np.random.Generator) -> np.ndarray:
    """Draw ink and border onto rows y0.. of a slide (in place); return where they cover it
    (bool), which is not tissue."""
    h, w = rgb.shape[:2]
    covered = np.zeros((h, w), bool)
    for stroke in strokes:
        reach = stroke.width_px / 2 + 2
        top = max(0, math.floor(stroke.points[:, 1].min() - reach) - y0)
        bottom = min(h, math.ceil(stroke.points[:, 1].max() + reach) - y0)
        left = max(0, math.floor(stroke.points[:, 0].min() - reach))
        right = min(w, math.ceil(stroke.points[:, 0].max() + reach))
        if top >= bottom or left >= right:
            continue
        alpha = np.zeros((bottom - top, right - left), np.uint8)
        pts = np.rint((stroke.points - (left, y0 + top)) * 16).astype(np.int32)
        cv2.polylines(alpha, [pts], False, 255, max(1, round(stroke.width_px)), cv2.LINE_AA, 4)
        region = rgb[top:bottom, left:right]
        log_t = np.log(np.asarray(stroke.rgb, np.float32) / np.asarray(BACKGROUND_RGB, np.float32))
        a = alpha.astype(np.float32) * (stroke.density / 255.0)
        region[...] = np.clip(region * np.exp(a[..., None] * log_t), 0, 255).astype(np.uint8)
        covered[top:bottom, left:right] |= alpha >= 128
    if border is not None:
        y = np.arange(y0, y0 + h, dtype=np.float32)[:, None] / max(1, height_px - 1)
        x = np.arange(w, dtype=np.float32)[None, :] / max(1, w - 1)
        (l0, l1), (r0, r1), (t0, t1), (b0, b1) = border.widths
        xs, ys = x * (w - 1), y * (height_px - 1)
        dark = ((xs < l0 + (l1 - l0) * y) | (xs >= w - (r0 + (r1 - r0) * y))
                | (ys < t0 + (t1 - t0) * x) | (ys >= height_px - (b0 + (b1 - b0) * x)))
        if dark.any():
            n = int(dark.sum())
            noise = rng.integers(-6, 7, size=(n, 1), dtype=np.int16)
            rgb[dark] = np.clip(border.level + noise + np.array([0, 0, 4]), 0, 255)
            covered |= dark
    return covered
