"""Dihedral views and training augmentation."""

from __future__ import annotations

import numpy as np
import torch

from model.augment import AugmentConfig, geometric, hed_jitter, photometric
from model.views import DIHEDRAL_VIEWS, dihedral, view_batch


def test_views_are_eight_distinct():
    square = np.arange(16).reshape(4, 4)
    results = {dihedral(square, view).tobytes() for view in DIHEDRAL_VIEWS}
    assert len(results) == 8


def test_named_views_do_what_they_say():
    square = np.arange(16).reshape(4, 4)
    np.testing.assert_array_equal(dihedral(square, "hflip"), square[:, ::-1])
    np.testing.assert_array_equal(dihedral(square, "vflip"), square[::-1])
    np.testing.assert_array_equal(dihedral(square, "transpose"), square.T)
    np.testing.assert_array_equal(dihedral(square, "rot180"), square[::-1, ::-1])


def test_torch_views_match_numpy():
    images = np.random.default_rng(0).random((2, 3, 5, 5)).astype(np.float32)
    batch = view_batch(torch.from_numpy(images), list(DIHEDRAL_VIEWS)).numpy()
    for index, view in enumerate(DIHEDRAL_VIEWS):
        np.testing.assert_array_equal(batch[index * 2 : index * 2 + 2], dihedral(images, view, axes=(2, 3)))


def test_hed_jitter_zero_change_is_identity():
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = hed_jitter(rgb, np.random.default_rng(0), scale=0.0, shift=0.0)
    np.testing.assert_allclose(out, rgb, atol=0.5)


def test_photometric_keeps_padding_black():
    rgb = np.full((32, 32, 3), 200, np.uint8)
    rgb[:, :5] = 0
    out = photometric(rgb, np.random.default_rng(0), AugmentConfig(noise_probability=1.0))
    assert np.all(out[:, :5] == 0)


def test_geometric_keeps_mask_on_blob():
    image = np.full((64, 64, 3), 220.0, np.float32)
    image[20:30, 40:50] = 30.0
    mask = np.zeros((1, 64, 64), np.float32)
    mask[0, 20:30, 40:50] = 1.0
    for seed in range(5):
        moved, moved_mask = geometric(image, mask, np.random.default_rng(seed), AugmentConfig())
        inside = moved_mask[0] > 0.5
        assert moved[..., 0][inside].mean() < 80
