"""Shared fixtures: paths to the real data (tests skip without it) and small weight folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SAMPLE_INPUT = DATA / "midog25-track2-sample"


def require_data(path: Path = DATA) -> Path:
    """Return ``path``, or skip the test when the shared data folder is not beside the checkout."""
    if not path.exists():
        pytest.skip(f"needs the labelled data at {path}, which is not present")
    return path


def make_weights(target: Path, folds: int = 2, threshold: float = 0.5, rule: str = "mean",
                 views=("identity", "hflip", "vflip"), seed: int = 0) -> Path:
    """Export ``folds`` randomly initialised networks as a weights folder, as training would."""
    from model.network import MultiTaskNet, NetConfig
    from model.train import write_weights

    config = NetConfig()
    states = []
    for fold in range(folds):
        torch.manual_seed(seed + fold)
        states.append(MultiTaskNet(config).eval().state_dict())
    write_weights(target, states, config.to_dict(), {"views": list(views), "threshold": threshold, "rule": rule},
                  [{"fold": fold} for fold in range(folds)])
    return target


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A two-fold weights folder with random networks (session-wide; do not modify it)."""
    return make_weights(tmp_path_factory.mktemp("weights"))


def synthetic_patch(seed: int, atypical: bool, size: int = 128):
    """Draw a pink patch with purple nuclei; atypical patches get a larger, darker, split centre figure."""
    import numpy as np

    rng = np.random.default_rng(seed)
    patch = np.empty((size, size, 3), np.float32)
    patch[:] = (230, 185, 210)
    patch += rng.normal(0, 6, patch.shape)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(4):
        cy, cx = rng.uniform(10, size - 10, 2)
        patch[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(4, 7) ** 2] = (120, 80, 160)
    centres = [(-6, 0), (6, 0)] if atypical else [(0, 0)]
    for dy, dx in centres:
        patch[(yy - size / 2 - dy) ** 2 + (xx - size / 2 - dx) ** 2 <= 6**2] = (50, 25, 90) if atypical else (80, 50, 130)
    return np.clip(patch, 0, 255).astype(np.uint8)


def write_folders_dataset(root: Path, per_class: int = 6, size: int = 128) -> Path:
    """Write a ``folders:`` layout (Atypical/, Normal/) of synthetic PNG patches."""
    from PIL import Image

    for label, folder in ((1, "Atypical"), (0, "Normal")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(synthetic_patch(index * 2 + label, bool(label), size)).save(root / folder / f"{index}.png")
    return root
