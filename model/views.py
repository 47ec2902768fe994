"""The eight dihedral views of a square patch, for augmentation and test-time augmentation."""

from __future__ import annotations

import numpy as np
import torch

# Each view: (number of counter-clockwise 90-degree rotations, then a horizontal flip or not).
DIHEDRAL_VIEWS = {
    "identity": (0, False),
    "hflip": (0, True),
    "vflip": (2, True),
    "rot90": (1, False),
    "rot180": (2, False),
    "rot270": (3, False),
    "transpose": (3, True),
    "antitranspose": (1, True),
}


def dihedral(array: np.ndarray, view: str, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Apply a named view to the two spatial ``axes`` (rows, columns) of a numpy array."""
    if view not in DIHEDRAL_VIEWS:
        raise ValueError(f"unknown view '{view}'; expected one of {', '.join(DIHEDRAL_VIEWS)}")
    turns, flip = DIHEDRAL_VIEWS[view]
    array = np.rot90(array, turns, axes=axes)
    return np.flip(array, axis=axes[1]) if flip else array


def view_batch(images: torch.Tensor, views: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Stack the named views of ``(N, C, H, W)`` images into ``(V * N, C, H, W)``, view-major."""
    batches = []
    for view in views:
        turns, flip = DIHEDRAL_VIEWS[view]
        batch = torch.rot90(images, turns, dims=(2, 3))
        batches.append(torch.flip(batch, dims=(3,)) if flip else batch)
    return torch.cat(batches)
