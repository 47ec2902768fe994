"""The fold-ensemble predictor shared by the container (``process.py``) and ``model.evaluate``.

``weights/manifest.json`` lists the fold files with their sha256, the network settings, the test-time
augmentation views and the decision rule. Every page is fitted to the network's input size, turned into
each view, and all pages x views go through each fold in one batch. P(atypical) is the mean of the
sigmoid over views and folds. The class is ``atypical`` when that mean reaches the threshold (rule
``mean``) or when most folds' own view-means reach it (rule ``vote``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.io import fit_page
from model.network import MultiTaskNet, NetConfig
from model.views import DIHEDRAL_VIEWS, view_batch

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
GRAND_CHALLENGE_MODEL_DIR = Path("/opt/ml/model")
BUNDLED_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_VIEWS = ("identity", "hflip", "vflip")
RULES = ("mean", "vote")


class WeightsError(Exception):
    """The manifest or a fold file is missing, corrupt or does not match."""


def resolve_weights_dir(requested: str | Path | None = None) -> tuple[Path, str]:
    """Return the weights folder and why it was chosen.

    Order: the requested folder; else ``/opt/ml/model`` when it holds a manifest (Grand Challenge
    unpacks a separately uploaded model tarball there); else the ``weights/`` folder beside the package.
    """
    if requested is not None:
        return Path(requested), "requested with --weights"
    if (GRAND_CHALLENGE_MODEL_DIR / MANIFEST).is_file():
        return GRAND_CHALLENGE_MODEL_DIR, "uploaded model in /opt/ml/model"
    return BUNDLED_WEIGHTS_DIR, "weights bundled with the code"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(weights_dir: Path) -> dict:
    """Read and check ``manifest.json``: version, network settings, views, rule, threshold, folds."""
    path = Path(weights_dir) / MANIFEST
    if not path.is_file():
        raise WeightsError(f"{path}: manifest not found; train and export weights first (python -m model.train)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{path}: invalid JSON ({error})") from None

    if not isinstance(manifest, dict) or manifest.get("format_version") != MANIFEST_VERSION:
        raise WeightsError(f"{path}: expected format_version {MANIFEST_VERSION}")
    try:
        NetConfig.from_dict(manifest["net_config"])
        views = manifest.get("views", list(DEFAULT_VIEWS))
        threshold = float(manifest["threshold"])
        rule = manifest["rule"]
        folds = manifest["folds"]
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(f"{path}: missing or invalid entry ({error})") from None
    unknown = [v for v in views if v not in DIHEDRAL_VIEWS]
    if not views or unknown:
        raise WeightsError(f"{path}: invalid views {unknown or views}; expected names from {', '.join(DIHEDRAL_VIEWS)}")
    if rule not in RULES or not 0.0 <= threshold <= 1.0:
        raise WeightsError(f"{path}: rule must be one of {RULES} and threshold in [0, 1], got {rule!r}, {threshold}")
    if not folds or not all(isinstance(f, dict) and "file" in f and "sha256" in f for f in folds):
        raise WeightsError(f"{path}: 'folds' must list at least one {{file, sha256}} entry")
    return manifest


def load_fold(weights_dir: Path, entry: dict) -> dict[str, torch.Tensor]:
    """Check one fold file against its manifest hash and load it without executing pickled code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(weights_dir) / entry["file"]
    if Path(entry["file"]).name != entry["file"]:
        raise WeightsError(f"{weights_dir / MANIFEST}: fold file '{entry['file']}' must be a plain file name")
    if not path.is_file():
        raise WeightsError(f"{path}: fold weights not found")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise WeightsError(f"{path}: sha256 {actual[:16]}... does not match the manifest's {entry['sha256'][:16]}...")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path}: cannot be loaded ({error})") from None


def decide(fold_probabilities: np.ndarray, threshold: float, rule: str) -> np.ndarray:
    """Return True (atypical) per page from ``(F, N)`` per-fold probabilities."""
    if rule == "vote":
        return (fold_probabilities >= threshold).sum(axis=0) * 2 > fold_probabilities.shape[0]
    return fold_probabilities.mean(axis=0) >= threshold


def select_device(requested: str = "auto") -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"invalid device '{requested}': expected auto, cpu or cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise WeightsError("--device cuda requested but CUDA is not available")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


@dataclass
class Prediction:
    p_atypical: np.ndarray  # (N,) mean over folds and views
    fold_probabilities: np.ndarray  # (F, N) mean over views, per fold
    atypical: np.ndarray  # (N,) bool, from the manifest's rule

    @property
    def classes(self) -> list[str]:
        return ["atypical" if a else "normal" for a in self.atypical]


class Predictor:
    """Load the fold ensemble once; score lists of RGB pages with :meth:`predict`."""

    def __init__(self, weights_dir: str | Path, device: str = "auto", views: list[str] | None = None):
        self.weights_dir = Path(weights_dir)
        self.device = select_device(device)
        self.manifest = load_manifest(self.weights_dir)
        self.net_config = NetConfig.from_dict(self.manifest["net_config"])
        self.views = list(views or self.manifest.get("views", DEFAULT_VIEWS))
        self.threshold = float(self.manifest["threshold"])
        self.rule = self.manifest["rule"]
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))

        self.nets = []
        for entry in self.manifest["folds"]:
            state = load_fold(self.weights_dir, entry)
            net = MultiTaskNet(self.net_config)
            try:
                net.load_state_dict({k: v.float() for k, v in state.items()})
            except RuntimeError as error:
                first_line = str(error).strip().splitlines()[0]
                raise WeightsError(f"{self.weights_dir / entry['file']}: does not fit the manifest's network ({first_line})") from None
            net = net.to(self.device, self.dtype, memory_format=torch.channels_last).eval()
            self.nets.append(net)

    def prepare(self, pages: list[np.ndarray]) -> torch.Tensor:
        """Fit each ``(H, W, 3)`` uint8 page to the input size; return ``(N, 3, S, S)`` on the device."""
        size = self.net_config.input_size
        array = np.stack([fit_page(page, size) for page in pages]).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @torch.inference_mode()
    def fold_probabilities(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Return ``(F, N)`` P(atypical) per fold, each the mean over the views."""
        count = images.shape[0]
        per_fold = torch.zeros(len(self.nets), count)
        for start in range(0, count, max(1, batch_size // len(self.views))):
            chunk = images[start : start + max(1, batch_size // len(self.views))]
            batch = view_batch(chunk, self.views).to(self.dtype).contiguous(memory_format=torch.channels_last)
            for fold, net in enumerate(self.nets):
                probability = torch.sigmoid(net.classify(batch).float()).view(len(self.views), -1)
                per_fold[fold, start : start + chunk.shape[0]] = probability.mean(dim=0).cpu()
        return per_fold

    def predict(self, pages: list[np.ndarray]) -> Prediction:
        fold_probabilities = self.fold_probabilities(self.prepare(pages)).numpy().astype(np.float64)
        return Prediction(
            p_atypical=fold_probabilities.mean(axis=0),
            fold_probabilities=fold_probabilities,
            atypical=decide(fold_probabilities, self.threshold, self.rule),
        )
