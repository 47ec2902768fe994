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
