"""Patch geometry, the three magnification views, and normalisation (numpy only).

This is the one implementation of preprocessing: the runtime uses it, and
training imports it and only adds random crop positions and augmentation, so
there is no train/serve skew.

Geometry is physical: a spot's patch is `patch_um` micrometres on a side,
sampled at the model's `mpp` (micrometres per pixel), so it is `patch_px`
pixels. View `i` is a square crop of side `crop_fractions[i] * patch_px`
(centred at inference), resized to `input_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_FRACTIONS = (1.0, 0.5, 0.25)
# The one default resolution: the her2st images' true resolution, at which the
# reference protocol cut its 224 px patches. The images carry none of their own;
# the runtime's spot-lattice fit (`geometry.fit_lattice`, 200 µm pitch) gives
# 0.6857-0.6892 µm/px over the 30 sections B1-H3, median 0.6875 (HEST-1k
# estimates 0.689-0.698). So the default patch is 224 px x 0.6875 = 154.0 µm.
# The model's mpp unless a config says otherwise.
DEFAULT_MPP = 0.6875
DEFAULT_PATCH_UM = round(224 * DEFAULT_MPP, 2)


@dataclass(frozen=True)
class ViewSpec:
    """How one spot becomes model input: patch size, sampling, views, normalisation."""

    patch_um: float = DEFAULT_PATCH_UM
    mpp: float = DEFAULT_MPP
    input_size: int = 112
    crop_fractions: tuple[float, ...] = DEFAULT_CROP_FRACTIONS
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def patch_px(self) -> int:
        """Side of the patch in pixels at the model's mpp."""
        return int(round(self.patch_um / self.mpp))

    @property
    def n_views(self) -> int:
        return len(self.crop_fractions)

    def crop_px(self, view: int) -> int:
        """Side in patch pixels of view `view`'s crop."""
        return max(1, int(round(self.patch_px * self.crop_fractions[view])))

    def centre_offsets(self) -> list[tuple[int, int]]:
        """Top-left (row, col) of each view's centred crop inside the patch."""
        out = []
        for v in range(self.n_views):
            o = (self.patch_px - self.crop_px(v)) // 2
            out.append((o, o))
        return out

    def random_offsets(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        """Top-left of each view's crop at a uniformly random position (training)."""
        out = []
        for v in range(self.n_views):
            room = self.patch_px - self.crop_px(v)
            out.append((int(rng.integers(0, room + 1)), int(rng.integers(0, room + 1))))
        return out


@lru_cache(maxsize=64)
def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix of an antialiased linear (triangle) resize.

    Pixel centres are aligned (half-pixel convention); when shrinking, the
    filter widens by the scale factor, as PIL's antialiased bilinear does.
    Rows sum to one, so edges are renormalised rather than padded.
    """
    scale = n_in / n_out
    support = max(1.0, scale)
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    j = np.arange(n_in, dtype=np.float64)
    w = np.clip(1.0 - np.abs(j[None, :] - centres[:, None]) / support, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


def resize(image: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to (height, width, C) uint8, deterministically."""
    width = height if width is None else width
    h, w, _ = image.shape
    if (h, w) == (height, width):
        return image
    wy = resize_weights(h, height)
    wx = resize_weights(w, width)
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    out = wy @ chw @ wx.T
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def make_views(
    patch: np.ndarray,
    spec: ViewSpec,
    offsets: list[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Turn one (patch_px, patch_px, 3) uint8 patch into (n_views, S, S, 3) uint8 views.

    `offsets` gives each view's crop top-left (row, col); None means centred
    (inference). Training passes `spec.random_offsets(rng)`.
    """
    p = spec.patch_px
    if patch.shape != (p, p, 3) or patch.dtype != np.uint8:
        raise ValueError(f"patch must be ({p}, {p}, 3) uint8, got {patch.shape} {patch.dtype}")
    offsets = spec.centre_offsets() if offsets is None else offsets
    s = spec.input_size
    views = np.empty((spec.n_views, s, s, 3), dtype=np.uint8)
    for v, (r, c) in enumerate(offsets):
        k = spec.crop_px(v)
        views[v] = resize(patch[r : r + k, c : c + k], s)
    return views


def normalise(views: np.ndarray, spec: ViewSpec) -> np.ndarray:
    """uint8 (..., S, S, 3) views -> float32 (..., 3, S, S), ImageNet-normalised.

    The exported encoder does this inside its graph; this numpy version is the
    reference for tests and for torch training.
    """
    x = views.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def patch_region(x: float, y: float, slide_mpp: float, spec: ViewSpec) -> tuple[int, int, int]:
    """The square region of the slide (level-0 pixels) covered by the patch of a spot at (x, y).

    Returns (left, top, side). The side is the patch's physical size at the
    slide's own resolution; the caller resamples it to `spec.patch_px`.
    """
    side = max(1, int(round(spec.patch_um / slide_mpp)))
    left = int(np.floor(x - side / 2.0 + 0.5))
    top = int(np.floor(y - side / 2.0 + 0.5))
    return left, top, side
