"""Training augmentation and the dihedral views used for test-time augmentation.

Geometric changes (dihedral views, small scale and shift about the centre) are applied to the patch and
its target masks together, so the figure stays centred and the masks stay aligned. Photometric changes
touch the patch only: HED stain jitter (Tellez et al., IEEE TMI 2018: scale and shift the hematoxylin
and eosin densities), brightness, contrast, saturation, blur and noise. Zero padding stays zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.targets import HED_FROM_OD, RUIFROK_HED, optical_density, padding_mask
from model.views import DIHEDRAL_VIEWS, dihedral

@dataclass(frozen=True)
class AugmentConfig:
    hed_scale: float = 0.05  # stain density factor drawn from 1 +- this
    hed_shift: float = 0.05  # stain density offset drawn from +- this
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    scale: float = 0.1  # zoom factor drawn from 1 +- this, about the centre
    shift: float = 4.0  # px
    blur_probability: float = 0.2
    blur_sigma: float = 1.0
    noise_probability: float = 0.2
    noise_std: float = 4.0  # grey levels


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, scale: float, shift: float) -> np.ndarray:
    """Perturb the hematoxylin, eosin and DAB densities of a uint8 RGB patch."""
    concentrations = optical_density(rgb) @ HED_FROM_OD.astype(np.float32)
    alpha = rng.uniform(1 - scale, 1 + scale, size=3).astype(np.float32)
    beta = rng.uniform(-shift, shift, size=3).astype(np.float32)
    od = (concentrations * alpha + beta) @ RUIFROK_HED.astype(np.float32)
    return np.clip(256.0 * np.exp(-od) - 1.0, 0, 255)


def photometric(rgb: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Return a float32 ``(H, W, 3)`` patch with stain, colour, blur and noise changes."""
    padding = padding_mask(rgb)
    image = hed_jitter(rgb, rng, config.hed_scale, config.hed_shift)

    image = image * rng.uniform(1 - config.brightness, 1 + config.brightness)
    mean = image.mean()
    image = (image - mean) * rng.uniform(1 - config.contrast, 1 + config.contrast) + mean
    grey = image.mean(axis=2, keepdims=True)
    image = (image - grey) * rng.uniform(1 - config.saturation, 1 + config.saturation) + grey

    if rng.random() < config.blur_probability:
        sigma = rng.uniform(0.1, config.blur_sigma)
        image = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0))
    if rng.random() < config.noise_probability:
        image = image + rng.normal(0.0, config.noise_std, size=image.shape)

    image[padding] = 0.0
    return np.clip(image, 0, 255).astype(np.float32)


def geometric(
    image: np.ndarray, masks: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random dihedral view and a small zoom and shift to ``image`` (H, W, 3) and ``masks`` (K, H, W)."""
    view = list(DIHEDRAL_VIEWS)[rng.integers(len(DIHEDRAL_VIEWS))]
    image = dihedral(image, view)
    masks = dihedral(masks, view, axes=(1, 2))

    zoom = rng.uniform(1 - config.scale, 1 + config.scale)
    shift = rng.uniform(-config.shift, config.shift, size=2)
    height, width = image.shape[:2]
    center = np.array([(height - 1) / 2, (width - 1) / 2])
    # Output pixel p samples input pixel center + (p - center) / zoom - shift.
    matrix = np.eye(2) / zoom
    offset = center - matrix @ center - shift

    image = np.stack(
        [ndimage.affine_transform(image[..., c], matrix, offset, order=1, mode="reflect") for c in range(3)], axis=-1
    )
    masks = np.stack([ndimage.affine_transform(m, matrix, offset, order=0, mode="constant") for m in masks])
    return image, masks
