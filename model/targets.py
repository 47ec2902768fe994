"""Auxiliary target maps made from the patch itself, with no extra annotation.

A patch is centred on its mitotic figure, and mitotic chromatin is the darkest hematoxylin in it. So:

1. Colour deconvolution (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 23(4), 2001) gives the
   hematoxylin optical density; a Gaussian smooths it.
2. Otsu's threshold on the non-padding pixels, kept within ``[min_threshold, max_threshold]``, gives the
   all-nuclei mask. Zero-padded borders (patches cut at a slide edge) are excluded from the statistics.
3. The figure mask is the union of nuclei components that overlap a central disc. A component larger
   than ``max_area`` (a vesicular neighbour nucleus swallowed with the figure) is clipped to a disc of
   ``clip_radius``. When nothing qualifies (blank or pale patch), a small central disc is used instead
   and the patch is flagged, so the training loss can down-weight it.
4. HV maps (HoVer-Net, Graham et al., Med. Image Anal. 2019): for each figure pixel its horizontal and
   vertical offset from the figure's centre of mass, scaled to [-1, 1]; 0 outside the figure.

Distances are in pixels at the challenge's ~0.25 um/px.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

# Rows: hematoxylin, eosin, DAB optical-density directions in RGB (Ruifrok & Johnston 2001).
RUIFROK_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RUIFROK_HED = RUIFROK_HED / np.linalg.norm(RUIFROK_HED, axis=1, keepdims=True)
HED_FROM_OD = np.linalg.inv(RUIFROK_HED)


@dataclass(frozen=True)
class TargetConfig:
    disc_radius: int = 10  # px; the figure must overlap this central disc
    sigma: float = 1.0  # px; Gaussian smoothing of the hematoxylin density
    min_threshold: float = 0.15  # hematoxylin OD bounds for the Otsu threshold
    max_threshold: float = 1.2
    min_component: int = 12  # px; smaller nuclei components are noise
    max_area: int = 2500  # px; larger figure components are clipped
    clip_radius: int = 24  # px
    fallback_radius: int = 8  # px; the figure mask when nothing qualifies
    padding_level: int = 8  # pixels with every channel at or below this are padding

    def digest(self) -> str:
        """Return a short hash of the settings, used to invalidate cached targets."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Return the optical density ``(H, W, 3)`` of a uint8 RGB patch."""
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def hematoxylin_density(rgb: np.ndarray) -> np.ndarray:
    """Return the hematoxylin optical density ``(H, W)`` by Ruifrok-Johnston colour deconvolution."""
    return np.maximum(optical_density(rgb) @ HED_FROM_OD[:, 0].astype(np.float32), 0.0)


def padding_mask(rgb: np.ndarray, level: int = 8) -> np.ndarray:
    """Return True where a pixel is zero padding (every channel at or below ``level``)."""
    return rgb.max(axis=2) <= level


def central_disc(shape: tuple[int, int], radius: float, center: tuple[float, float] | None = None) -> np.ndarray:
    height, width = shape
    cy, cx = center if center is not None else ((height - 1) / 2, (width - 1) / 2)
    yy, xx = np.ogrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def hv_maps(mask: np.ndarray) -> np.ndarray:
    """Return ``(2, H, W)`` float32 maps: horizontal and vertical offset to the mask's centre of mass.

    Each is divided by its largest absolute value within the mask, so it lies in [-1, 1], and is 0
    outside the mask.
    """
    maps = np.zeros((2,) + mask.shape, np.float32)
    if not mask.any():
        return maps
    ys, xs = np.nonzero(mask)
    for channel, offsets in ((0, xs - xs.mean()), (1, ys - ys.mean())):
        scale = np.abs(offsets).max()
        maps[channel, ys, xs] = offsets / scale if scale > 0 else 0.0
    return maps


def make_targets(rgb: np.ndarray, config: TargetConfig = TargetConfig()) -> dict[str, np.ndarray]:
    """Return the figure mask, the nuclei mask (both ``(H, W)`` uint8) and a fallback flag."""
    shape = rgb.shape[:2]
    valid = ~padding_mask(rgb, config.padding_level)
    density = ndimage.gaussian_filter(hematoxylin_density(rgb), config.sigma)

    nuclei = np.zeros(shape, bool)
    values = density[valid]
    if values.size > 16 and values.max() - values.min() > 1e-3:
        threshold = float(np.clip(threshold_otsu(values), config.min_threshold, config.max_threshold))
        nuclei = (density > threshold) & valid
        labels, count = ndimage.label(nuclei)
        sizes = ndimage.sum_labels(nuclei, labels, index=np.arange(1, count + 1))
        nuclei = np.isin(labels, 1 + np.flatnonzero(sizes >= config.min_component))

    figure = np.zeros(shape, bool)
    labels, count = ndimage.label(nuclei)
    disc = central_disc(shape, config.disc_radius)
    for label in np.unique(labels[disc & nuclei]):
        component = labels == label
        if component.sum() > config.max_area:
            component &= central_disc(shape, config.clip_radius)
        figure |= component

    fallback = not figure.any()
    if fallback:
        figure = central_disc(shape, config.fallback_radius) & valid
        if not figure.any():
            figure = central_disc(shape, config.fallback_radius)
    return {"figure_mask": figure.astype(np.uint8), "nuclei": nuclei.astype(np.uint8), "fallback": np.bool_(fallback)}
