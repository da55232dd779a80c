"""Defects of the built-in dataset, drawn with exact masks.

A defect is drawn as a *target* appearance plus an *alpha*; ``apply_defect`` blends them in
only where the alpha passes a threshold and returns that region as the mask, so pixels outside
the mask are bit-identical to the clean image by construction. Every random choice comes from the
``numpy.random.Generator`` passed in; sizes are fractions of the image side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cvad.data.synthetic import (
    LIGHT,
    MASK_THRESHOLD,
    ObjectScene,
    blob_alpha,
    dome_shading,
    luminance,
    pixel_centres,
    stroke_alpha,
)


@dataclass(frozen=True)
class Surface:
    """Where a defect may go: ``centres`` marks allowed centre pixels; ``clip`` (objects only)
    is the object's coverage, which confines surface defects to the object."""

    centres: np.ndarray  # bool [S, S]
    clip: np.ndarray | None = None


@dataclass(frozen=True)
class DefectPaint:
    """A defect before blending: its full appearance and how strongly each pixel takes it."""

    target: np.ndarray  # [S, S, 3]
    alpha: np.ndarray  # [S, S]


def apply_defect(image: np.ndarray, paint: DefectPaint, contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``paint`` into ``image``; returns the defective image and its bool mask.

    ``contrast`` in (0, 1] scales how far defect pixels move towards the full defect appearance.
    Alpha under ``MASK_THRESHOLD`` is dropped, so every pixel outside the mask keeps its exact
    value and the mask is the set of pixels the defect painted.
    """
    mask = paint.alpha >= MASK_THRESHOLD
    weight = (contrast * paint.alpha)[..., None]
    blended = image + weight * (paint.target - image)
    return np.where(mask[..., None], blended, image).astype(np.float32), mask


def _pick_centre(rng: np.random.Generator, surface: Surface) -> np.ndarray:
    """A (row, col) centre among the allowed pixels, with sub-pixel jitter."""
    flat = np.flatnonzero(surface.centres)
    index = int(flat[rng.integers(flat.size)])
    size = surface.centres.shape[1]
    return np.array(divmod(index, size), dtype=np.float32) + rng.uniform(0.2, 0.8, 2).astype(np.float32)


def _confine(alpha: np.ndarray, surface: Surface) -> np.ndarray:
    return alpha if surface.clip is None else alpha * surface.clip


def _contrasting_grey(image: np.ndarray, alpha: np.ndarray) -> float:
    """A bright mark on dark surfaces and a dark one on bright surfaces, so it stays visible."""
    weights = alpha.sum() or 1.0
    mean = float((luminance(image) * alpha).sum() / weights)
    return 0.08 if mean > 0.55 else 0.97


def draw_scratch(rng: np.random.Generator, image: np.ndarray, surface: Surface, scale: float) -> DefectPaint:
    """A thin slightly curved line, brighter (or darker) than the surface around it."""
    size = image.shape[0]
    centre = _pick_centre(rng, surface)
    length = rng.uniform(0.16, 0.30) * size * scale
    direction = rng.uniform(0, 2 * math.pi)
    unit = np.array([math.sin(direction), math.cos(direction)], dtype=np.float32)
    normal = np.array([unit[1], -unit[0]], dtype=np.float32)
    bend = rng.uniform(-0.2, 0.2) * length
    t = np.linspace(0.0, 1.0, 24, dtype=np.float32)[:, None]
    start, end = centre - unit * length / 2, centre + unit * length / 2
    control = centre + normal * bend
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    width = max(rng.uniform(0.008, 0.013) * size * scale, 1.2)
    widths = width * (0.45 + 0.55 * np.sin(np.pi * t[:, 0]))
    alpha = _confine(stroke_alpha(size, points, widths), surface)
    grey = _contrasting_grey(image, alpha)
    target = np.full_like(image, grey) * 0.85 + image * 0.15
    return DefectPaint(target.astype(np.float32), alpha)


def draw_crack(rng: np.random.Generator, image: np.ndarray, surface: Surface, scale: float) -> DefectPaint:
    """A dark jagged random-walk fissure with one or two side branches, tapering to its ends."""
    size = image.shape[0]
    width = max(rng.uniform(0.012, 0.020) * size * scale, 1.5)
    step = 0.012 * size
    alpha = np.zeros((size, size), dtype=np.float32)

    def walk(start: np.ndarray, heading: float, length: float, start_width: float) -> np.ndarray:
        steps = max(int(length / step), 3)
        headings = heading + np.cumsum(rng.normal(0.0, 0.22, steps))
        moves = np.stack([np.sin(headings), np.cos(headings)], axis=1) * step
        points = np.concatenate([start[None], start + np.cumsum(moves, axis=0)]).astype(np.float32)
        widths = np.linspace(start_width, 0.35 * start_width, points.shape[0], dtype=np.float32)
        np.maximum(alpha, stroke_alpha(size, points, widths), out=alpha)
        return points

    length = rng.uniform(0.16, 0.30) * size * scale
    heading = rng.uniform(0, 2 * math.pi)
    centre = _pick_centre(rng, surface)
    first = walk(centre, heading, length / 2, width)
    walk(centre, heading + math.pi, length / 2, width)
    for _ in range(int(rng.integers(1, 3))):
        joint = first[int(rng.integers(1, max(first.shape[0] - 1, 2)))]
        walk(joint, heading + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2), length * rng.uniform(0.2, 0.35), 0.7 * width)
    alpha = _confine(alpha, surface)
    return DefectPaint((image * 0.08 + 0.02).astype(np.float32), alpha)


def draw_hole(rng: np.random.Generator, image: np.ndarray, surface: Surface, scale: float) -> DefectPaint:
    """A round pit: a dark disk whose inner wall catches the light on the side away from it."""
    size = image.shape[0]
    radius = max(rng.uniform(0.028, 0.045) * size * scale, 1.5)
    centre = _pick_centre(rng, surface)
    rows, cols = pixel_centres(size)
    alpha = _confine(blob_alpha(rng, size, centre, radius, wobble=0.08), surface)
    # The wall facing the light is the far one: brighter away from the light direction.
    facing = -((cols - centre[1]) * LIGHT[0] + (rows - centre[0]) * LIGHT[1]) / radius
    wall = 0.05 + 0.22 * np.clip(facing, 0.0, 1.0) ** 2
    target = image * 0.1 + wall[..., None]
    return DefectPaint(target.astype(np.float32), alpha)


STAIN_COLOURS = np.array(
    [[0.30, 0.20, 0.10], [0.62, 0.34, 0.10], [0.20, 0.32, 0.62], [0.10, 0.45, 0.25], [0.85, 0.80, 0.30]],
    dtype=np.float32,
)  # oil, rust, blue ink, green residue, yellow glue


def draw_stain(rng: np.random.Generator, image: np.ndarray, surface: Surface, scale: float) -> DefectPaint:
    """A blotch of foreign colour that keeps the surface's own texture, densest at its centre."""
    size = image.shape[0]
    radius = max(rng.uniform(0.045, 0.075) * size * scale, 2.0)
    centre = _pick_centre(rng, surface)
    shape = blob_alpha(rng, size, centre, radius, wobble=0.35)
    rows, cols = pixel_centres(size)
    core = np.clip(1 - np.hypot(rows - centre[0], cols - centre[1]) / (1.3 * radius), 0.0, 1.0)
    alpha = _confine(shape * (0.75 + 0.25 * core), surface)
    region = alpha > 0
    local = image[region].mean(axis=0) if region.any() else image.reshape(-1, 3).mean(axis=0)
    # Among the two colours farthest from the surface, pick one at random.
    far = np.argsort(-np.abs(STAIN_COLOURS - local).sum(axis=1))[:2]
    colour = STAIN_COLOURS[int(rng.choice(far))]
    relief = luminance(image) / max(float(luminance(local[None])[0]), 1e-3)
    target = colour[None, None, :] * (0.55 + 0.45 * relief[..., None])
    return DefectPaint(np.clip(target, 0.0, 1.0).astype(np.float32), alpha)


def _edge_point(rng: np.random.Generator, scene: ObjectScene) -> np.ndarray:
    """A (row, col) point on the object's outline (outer or inner), with sub-pixel jitter."""
    edge = (scene.cover > 0.05) & (scene.cover < 0.95)
    return _pick_centre(rng, Surface(edge))


def draw_missing_part(rng: np.random.Generator, scene: ObjectScene, scale: float) -> DefectPaint:
    """A chunk bitten out of the object's outline: there the empty background shows instead."""
    size = scene.cover.shape[0]
    radius = rng.uniform(0.05, 0.08) * size * scale
    bite = blob_alpha(rng, size, _edge_point(rng, scene), radius, wobble=0.3)
    return DefectPaint(scene.background, bite * scene.cover)


def draw_extra_part(rng: np.random.Generator, scene: ObjectScene, scale: float) -> DefectPaint:
    """A lump of the object's own material stuck to its outline (only its part over the background counts)."""
    size = scene.cover.shape[0]
    radius = rng.uniform(0.04, 0.065) * size * scale
    anchor = _edge_point(rng, scene)
    row, col = np.clip(np.round(anchor).astype(int), 0, size - 1)
    material = scene.material[row, col]
    lump = blob_alpha(rng, size, anchor, radius, wobble=0.3)
    shading = 0.55 + 0.6 * dome_shading(size, anchor, radius)
    target = np.clip(material[None, None, :] * shading[..., None], 0.0, 1.0).astype(np.float32)
    return DefectPaint(target, lump * (1 - scene.cover))
