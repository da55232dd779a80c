"""Drawing primitives of the built-in dataset: texture crops and objects (their defects: ``cvad.data.defects``).

Images are float32 arrays ``[S, S, 3]`` in [0, 1]; coverages and alphas are float32 ``[S, S]``
in [0, 1]. Every random choice comes from the ``numpy.random.Generator`` passed in, so one seed
fixes every pixel. Sizes are given as fractions of the image side ``S``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cvad.data.base import DatasetError

LIGHT = np.array([-0.45, -0.55, 0.70], dtype=np.float32) / np.linalg.norm([-0.45, -0.55, 0.70])
"""Unit vector (x right, y down, z towards the camera) of the fixed inspection light: upper left."""

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
Colour = tuple[float, float, float]  # linear RGB in [0, 1]
MASK_THRESHOLD = 0.25  # alpha below this is dropped entirely, so the mask is exactly what changed


# --------------------------------------------------------------------------- primitives


def pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of pixel centres, shaped [S, 1] and [1, S] for broadcasting."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return coords[:, None], coords[None, :]


def coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased fraction of each pixel inside a shape, from its signed distance in px (< 0 inside)."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0).astype(np.float32)


def luminance(image: np.ndarray) -> np.ndarray:
    return image @ LUMA


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise [S, S] of roughly unit amplitude, with about ``cells`` blobs across."""
    grid = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    return np.asarray(big, dtype=np.float32)


def soft_shadow(cover: np.ndarray, offset: float, blur: float) -> np.ndarray:
    """How much an object shades the surface under it: its coverage shifted down-right and blurred.

    Computed at a quarter of the resolution: a blurred shadow has no detail to lose.
    """
    from scipy import ndimage  # 0.3 s to import: not for config validation, which imports this module

    size = cover.shape[0]
    factor = 4 if size >= 64 else 1
    small = cover[factor // 2 :: factor, factor // 2 :: factor]
    small = ndimage.shift(small, (offset / factor, offset / factor), order=1, mode="constant")
    small = ndimage.gaussian_filter(small, blur / factor, mode="constant").astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), dtype=np.float32)


def stroke_alpha(size: int, points: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a polyline ``points`` [N, 2] (row, col) with per-point widths in px."""
    alpha = np.zeros((size, size), dtype=np.float32)
    for (a, b), (wa, wb) in zip(zip(points[:-1], points[1:]), zip(widths[:-1], widths[1:])):
        reach = max(wa, wb) / 2 + 1.5
        r0 = max(int(math.floor(min(a[0], b[0]) - reach)), 0)
        r1 = min(int(math.ceil(max(a[0], b[0]) + reach)), size)
        c0 = max(int(math.floor(min(a[1], b[1]) - reach)), 0)
        c1 = min(int(math.ceil(max(a[1], b[1]) + reach)), size)
        if r0 >= r1 or c0 >= c1:
            continue
        rows = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
        cols = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
        seg = b - a
        length2 = float(seg @ seg) or 1e-6
        t = np.clip(((rows - a[0]) * seg[0] + (cols - a[1]) * seg[1]) / length2, 0.0, 1.0)
        dist = np.hypot(rows - a[0] - t * seg[0], cols - a[1] - t * seg[1])
        width = wa + t * (wb - wa)
        np.maximum(alpha[r0:r1, c0:c1], np.clip(width / 2 - dist + 0.5, 0.0, 1.0), out=alpha[r0:r1, c0:c1])
    return alpha


def blob_alpha(
    rng: np.random.Generator, size: int, centre: np.ndarray, radius: float, wobble: float = 0.3
) -> np.ndarray:
    """Coverage of an irregular roundish blob: a disk whose radius wobbles with a few harmonics."""
    rows, cols = pixel_centres(size)
    dy, dx = rows - centre[0], cols - centre[1]
    theta = np.arctan2(dy, dx)
    harmonics = np.arange(2, 6)
    amplitude = rng.uniform(0.0, wobble, harmonics.size) / harmonics * 2
    phase = rng.uniform(0.0, 2 * math.pi, harmonics.size)
    edge = radius * (1 + sum(a * np.cos(k * theta + p) for a, k, p in zip(amplitude, harmonics, phase)))
    return coverage(np.hypot(dy, dx) - edge)


def dome_shading(size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """Lambert shading [S, S] of a hemisphere of ``radius`` px lit by ``LIGHT`` (flat beyond it)."""
    rows, cols = pixel_centres(size)
    nx, ny = (cols - centre[1]) / radius, (rows - centre[0]) / radius
    scale = np.maximum(np.hypot(nx, ny), 1.0)
    nx, ny = nx / scale, ny / scale
    nz = np.sqrt(np.clip(1 - nx**2 - ny**2, 0.0, 1.0))
    return np.clip(nx * LIGHT[0] + ny * LIGHT[1] + nz * LIGHT[2], 0.0, 1.0).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- textures


def read_gimp_pattern(path: Path) -> np.ndarray:
    """Pixels of a GIMP ``.pat`` file: uint8 [H, W] (grey) or [H, W, 3] (RGB); alpha is dropped.

    Format: big-endian u32 header_size, version (1), width, height, bytes_per_pixel, the magic
    ``GPAT``, a NUL-terminated name, then the raw pixel rows.
    """
    data = path.read_bytes()
    if len(data) < 24:
        raise DatasetError(f"{path} is too short to be a GIMP pattern ({len(data)} bytes)")
    header_size, version, width, height, depth = struct.unpack(">5I", data[:20])
    if data[20:24] != b"GPAT" or version != 1 or depth not in (1, 2, 3, 4) or header_size < 24:
        raise DatasetError(
            f"{path} is not a version-1 GIMP pattern (magic {data[20:24]!r}, version {version}, "
            f"{depth} bytes per pixel)"
        )
    if len(data) < header_size + width * height * depth or width == 0 or height == 0:
        raise DatasetError(f"{path} is truncated: a {width}x{height}x{depth} pattern needs more bytes")
    pixels = np.frombuffer(data, np.uint8, count=width * height * depth, offset=header_size)
    pixels = pixels.reshape(height, width, depth)
    return pixels[..., 0].copy() if depth <= 2 else pixels[..., :3].copy()


def texture_patch(
    rng: np.random.Generator,
    source: np.ndarray,
    size: int,
    crop_side: tuple[int, int],
    rotate90: bool,
) -> np.ndarray:
    """A random square crop of ``source`` (uint8 grey or RGB), randomly flipped (and turned by
    multiples of 90 degrees if ``rotate90``), resized to ``size``; float [S, S, 3]."""
    height, width = source.shape[:2]
    side = int(rng.integers(crop_side[0], min(crop_side[1], height, width) + 1))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    patch = source[top : top + side, left : left + side]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    if rotate90:
        patch = np.rot90(patch, int(rng.integers(4)))
    resized = Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


def tint(image: np.ndarray, gain: Colour) -> np.ndarray:
    """Colour a grey image per channel, so that categories from grey photos differ in colour too."""
    return np.clip(image * np.asarray(gain, dtype=np.float32), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class ObjectScene:
    """One object on its background, kept as layers so that parts can be removed or added."""

    background: np.ndarray  # [S, S, 3] the empty scene, the object's shadow included
    material: np.ndarray  # [S, S, 3] the object's shaded surface, meaningful where coverage > 0
    cover: np.ndarray  # [S, S] fraction of each pixel the object covers

    def image(self) -> np.ndarray:
        alpha = self.cover[..., None]
        return (self.background * (1 - alpha) + self.material * alpha).astype(np.float32)


def _plain_background(rng: np.random.Generator, size: int, colour: Colour, grain: float) -> np.ndarray:
    """A matte surface: a flat colour with faint smooth mottling and fine grain."""
    mottle = 0.6 * smooth_noise(rng, size, 4) + 0.4 * smooth_noise(rng, size, 24)
    base = np.asarray(colour, dtype=np.float32)[None, None, :]
    return np.clip(base * (1 + grain * mottle[..., None]), 0.0, 1.0).astype(np.float32)


def _shaded_background(rng: np.random.Generator, cover: np.ndarray, colour: Colour, grain: float) -> np.ndarray:
    size = cover.shape[0]
    shadow = soft_shadow(cover, offset=0.02 * size, blur=0.02 * size)
    return _plain_background(rng, size, colour, grain) * (1 - 0.45 * shadow[..., None])


def draw_hex_nut(rng: np.random.Generator, size: int) -> ObjectScene:
    """A machined hexagon nut seen from above: chamfered corners, threaded through-hole,
    concentric turning marks; any rotation, small shifts, on a dark matte plate."""
    rows, cols = pixel_centres(size)
    centre = (size / 2 + rng.uniform(-0.07, 0.07, 2) * size).astype(np.float32)
    angle = rng.uniform(0, math.pi / 3)
    inradius, hole = 0.25 * size, 0.105 * size
    dy, dx = rows - centre[0], cols - centre[1]
    radius = np.hypot(dy, dx)
    hex_distance = np.full((size, size), -np.inf, dtype=np.float32)
    for k in range(3):  # opposite facets share a normal: |projection| covers both
        normal = angle + k * math.pi / 3
        np.maximum(hex_distance, np.abs(dx * math.cos(normal) + dy * math.sin(normal)), out=hex_distance)
    cover = coverage(hex_distance - inradius) * coverage(hole - radius)

    lit = 1 + 0.18 * (dx * LIGHT[0] + dy * LIGHT[1]) / inradius  # flat face, light from one side
    shade = 0.62 * lit + 0.018 * np.sin(radius * (2 * math.pi / (0.012 * size)))
    chamfer = np.clip((radius - 0.95 * inradius) / (0.03 * size), 0.0, 1.0)  # corners outside the turned circle
    azimuth_light = -(dx * LIGHT[0] + dy * LIGHT[1]) / np.maximum(radius, 1e-3)
    shade = shade * (1 - 0.35 * chamfer) + chamfer * 0.12 * azimuth_light
    bevel = np.clip(1 - (radius - hole) / (0.035 * size), 0.0, 1.0)  # conical entry of the bore
    thread = 0.5 + 0.5 * np.sin(radius * (2 * math.pi / (0.008 * size)))
    shade = shade * (1 - bevel) + bevel * (0.30 + 0.22 * azimuth_light + 0.08 * thread)
    shade = shade + 0.015 * smooth_noise(rng, size, 32)
    steel = np.array([0.93, 0.95, 1.0], dtype=np.float32)
    material = np.clip(shade[..., None] * steel, 0.0, 1.0).astype(np.float32)
    background = _shaded_background(rng, cover, (0.16, 0.16, 0.18), grain=0.08)
    return ObjectScene(background, material, cover)


def draw_capsule(rng: np.random.Generator, size: int) -> ObjectScene:
    """A two-colour gelatin capsule (red cap, ivory body) lying roughly horizontal, with a glossy
    highlight and the seam between the halves, on a light matte tray."""
    rows, cols = pixel_centres(size)
    centre = (size / 2 + rng.uniform(-0.07, 0.07, 2) * size).astype(np.float32)
    angle = rng.uniform(-0.35, 0.35)
    axis = np.array([math.cos(angle), math.sin(angle)], dtype=np.float32)  # (x, y)
    half_length, radius = 0.21 * size, 0.085 * size
    dy, dx = rows - centre[0], cols - centre[1]
    along = dx * axis[0] + dy * axis[1]
    across = -dx * axis[1] + dy * axis[0]
    clamped = np.clip(along, -half_length, half_length)
    # The cap is slightly wider than the body where it slides over it.
    wall = radius * (1 + 0.04 * (along < 0.02 * size))
    offset_along = along - clamped
    distance = np.hypot(offset_along, across)
    cover = coverage(distance - wall)

    nx = (offset_along * axis[0] - across * axis[1]) / wall
    ny = (offset_along * axis[1] + across * axis[0]) / wall
    scale = np.maximum(np.hypot(nx, ny), 1.0)
    nx, ny = nx / scale, ny / scale
    nz = np.sqrt(np.clip(1 - nx**2 - ny**2, 0.0, 1.0))
    diffuse = np.clip(nx * LIGHT[0] + ny * LIGHT[1] + nz * LIGHT[2], 0.0, 1.0)
    half_vector = LIGHT + np.array([0, 0, 1], dtype=np.float32)
    half_vector /= np.linalg.norm(half_vector)
    specular = np.clip(nx * half_vector[0] + ny * half_vector[1] + nz * half_vector[2], 0.0, 1.0) ** 40

    cap = np.array([0.78, 0.20, 0.14], dtype=np.float32)
    body = np.array([0.95, 0.90, 0.78], dtype=np.float32)
    body_share = np.clip(along / (0.004 * size) + 0.5, 0.0, 1.0)[..., None]
    colour = cap * (1 - body_share) + body * body_share
    seam = 1 - 0.25 * np.exp(-(((along - 0.02 * size) / (0.006 * size)) ** 2))
    shade = (0.38 + 0.62 * diffuse) * seam
    material = colour * shade[..., None] + 0.55 * specular[..., None]
    material = np.clip(material, 0.0, 1.0).astype(np.float32)
    background = _shaded_background(rng, cover, (0.80, 0.80, 0.77), grain=0.03)
    return ObjectScene(background, material, cover)


def draw_screw(rng: np.random.Generator, size: int) -> ObjectScene:
    """A threaded machine screw lying on its side, pointing any direction, on a grey plate."""
    rows, cols = pixel_centres(size)
    centre = (size / 2 + rng.uniform(-0.06, 0.06, 2) * size).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    axis = np.array([math.cos(angle), math.sin(angle)], dtype=np.float32)
    dy, dx = rows - centre[0], cols - centre[1]
    along = dx * axis[0] + dy * axis[1]
    across = -dx * axis[1] + dy * axis[0]
    head_start, head_end, tip_start, tip_end = -0.30 * size, -0.22 * size, 0.20 * size, 0.30 * size
    shank = 0.038 * size
    profile = np.where(along < tip_start, shank, shank * np.clip((tip_end - along) / (tip_end - tip_start), 0.08, 1.0))
    shaft_distance = np.maximum(np.abs(across) - profile, np.maximum(head_end - along, along - tip_end))
    head_half = 0.075 * size
    head_distance = np.maximum(np.abs(across) - head_half, np.maximum(head_start - along, along - head_end))
    cover = coverage(np.minimum(shaft_distance, head_distance))

    on_head = along < head_end
    half_width = np.where(on_head, head_half, np.maximum(profile, 1e-3))
    normal_across = np.clip(across / half_width, -1.0, 1.0)
    nz = np.sqrt(1 - normal_across**2)
    nx, ny = -normal_across * axis[1], normal_across * axis[0]
    diffuse = np.clip(nx * LIGHT[0] + ny * LIGHT[1] + nz * LIGHT[2], 0.0, 1.0)
    pitch = 0.026 * size
    thread = 0.5 + 0.5 * np.sin(2 * math.pi * (along / pitch + 0.35 * normal_across))
    threaded = (along > head_end + 0.03 * size).astype(np.float32)
    shade = (0.30 + 0.60 * diffuse) * (1 - 0.45 * threaded * thread)
    slot = on_head & (np.abs(along - (head_start + head_end) / 2) < 0.008 * size)
    shade = np.where(slot, shade * 0.35, shade) + 0.12 * np.exp(-(((along - head_end) / (0.006 * size)) ** 2))
    steel = np.array([0.92, 0.92, 0.90], dtype=np.float32)
    material = np.clip(shade[..., None] * steel, 0.0, 1.0).astype(np.float32)
    background = _shaded_background(rng, cover, (0.62, 0.63, 0.62), grain=0.05)
    return ObjectScene(background, material, cover)
