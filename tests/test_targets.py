"""Auxiliary targets on drawn patches: the centre blob is the figure, border blobs are only nuclei."""

from __future__ import annotations

import numpy as np

from model.targets import TargetConfig, hv_maps, make_targets


def drawn_patch(size: int = 128) -> np.ndarray:
    """A pink background with a dark purple blob at the centre and two at the border."""
    patch = np.empty((size, size, 3), np.uint8)
    patch[:] = (235, 190, 215)
    yy, xx = np.mgrid[:size, :size]
    for cy, cx, radius in ((size / 2, size / 2, 9), (12, 14, 7), (110, 100, 8)):
        patch[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = (70, 40, 120)
    return patch


def test_figure_mask_covers_centre_blob_only():
    targets = make_targets(drawn_patch())
    mask = targets["figure_mask"].astype(bool)
    assert mask[64, 64]
    assert not mask[12, 14]
    assert not mask[110, 100]
    assert not targets["fallback"]


def test_nuclei_mask_covers_every_blob():
    nuclei = make_targets(drawn_patch())["nuclei"].astype(bool)
    assert nuclei[64, 64]
    assert nuclei[12, 14]
    assert nuclei[110, 100]
    assert not nuclei[64, 5]


def test_hv_maps_zero_outside_and_bounded():
    mask = make_targets(drawn_patch())["figure_mask"].astype(bool)
    maps = hv_maps(mask)
    assert np.all(maps[:, ~mask] == 0)
    assert maps.min() >= -1
    assert maps.max() <= 1
    assert np.isclose(np.abs(maps[0]).max(), 1.0)


def test_hv_horizontal_grows_left_to_right():
    mask = np.zeros((32, 32), bool)
    mask[10:20, 8:24] = True
    horizontal = hv_maps(mask)[0]
    assert horizontal[15, 8] < 0 < horizontal[15, 23]


def test_blank_patch_falls_back():
    blank = np.full((128, 128, 3), 240, np.uint8)
    targets = make_targets(blank)
    assert targets["fallback"]
    assert targets["figure_mask"][64, 64] == 1
    assert not np.isnan(hv_maps(targets["figure_mask"] > 0)).any()


def test_padding_excluded_from_threshold():
    patch = drawn_patch()
    patch[:, :40] = 0  # zero padding at the left edge, as for a figure near the slide border
    targets = make_targets(patch)
    assert targets["figure_mask"][64, 64] == 1
    assert targets["nuclei"][:, :40].sum() == 0


def test_oversized_component_clipped():
    patch = np.full((128, 128, 3), (235, 190, 215), np.uint8)
    patch[20:108, 20:108] = (70, 40, 120)  # one 88x88 dark region: 7,744 px
    config = TargetConfig()
    mask = make_targets(patch, config)["figure_mask"]
    assert mask.sum() <= np.pi * (config.clip_radius + 1) ** 2


def test_digest_changes_with_settings():
    assert TargetConfig().digest() != TargetConfig(disc_radius=12).digest()
