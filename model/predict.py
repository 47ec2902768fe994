"""The fold-ensemble predictor shared by the container (``process.py``) and ``model.evaluate``.

``weights/manifest.json`` lists the fold files with their sha256, the network settings, the test-time
augmentation views and the decision rule. Every page is fitted to the network's input size, turned into
each view, and all pages x views go through each fold in one batch. P(atypical) is the mean of the
sigmoid over views and folds. The class is ``atypical`` when that mean reaches the threshold (rule
``mean``) or when most folds' own view-means reach it (rule ``vote``).

Two changes make CPU inference faster. Each fold's batch norms are folded into the convolutions
that feed them once the weights are loaded (:func:`fold_batch_norms`), and each batch is cut into
slices that worker threads score at the same time (:func:`classify_in_slices`). Neither changes the
outputs beyond float rounding, as ``tests/test_predict_speed_equivalence.py`` checks, and
benchmarks/README.md has the measurements.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

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

# fold_batch_norms undoes the folding when any encoder output or logit of its probe batch moves by more than this.
FOLD_TOLERANCE = 1e-4


class WeightsError(Exception):
    """The manifest or a fold file is missing, corrupt or does not match."""


def resolve_weights_dir(requested: str | Path | None = None) -> tuple[Path, str]:
    """Return the weights folder and why it was chosen.

    Order: the requested folder; else ``/opt/ml/model`` when it contains a manifest (Grand Challenge
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

        self.nets = [self._load_network(entry) for entry in self.manifest["folds"]]

    def _load_network(self, entry: dict) -> MultiTaskNet:
        """Build one fold's network from its file, fold its batch norms and move it to the device."""
        state = load_fold(self.weights_dir, entry)
        net = MultiTaskNet(self.net_config)
        try:
            net.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0]
            raise WeightsError(f"{self.weights_dir / entry['file']}: does not fit the manifest's network ({first_line})") from None
        net.eval()
        fold_batch_norms(net)
        return net.to(self.device, self.dtype, memory_format=torch.channels_last)

    def prepare(self, pages: list[np.ndarray]) -> torch.Tensor:
        """Fit each ``(H, W, 3)`` uint8 page to the input size; return ``(N, 3, S, S)`` on the device."""
        size = self.net_config.input_size
        array = np.stack([fit_page(page, size) for page in pages]).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @torch.inference_mode()
    def fold_probabilities(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Return ``(F, N)`` P(atypical) per fold, each the mean over the views.

        On CPU with more than one intra-op thread, each fold's batch is cut into slices that worker
        threads score at the same time, one intra-op thread each (see :func:`classify_in_slices`).
        """
        count = images.shape[0]
        per_fold = torch.zeros(len(self.nets), count)
        workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(ThreadPoolExecutor(workers)) if workers > 1 else None
            for start in range(0, count, max(1, batch_size // len(self.views))):
                chunk = images[start : start + max(1, batch_size // len(self.views))]
                batch = view_batch(chunk, self.views).to(self.dtype).contiguous(memory_format=torch.channels_last)
                for fold, net in enumerate(self.nets):
                    logits = classify_in_slices(net, batch, pool, workers) if pool else net.classify(batch)
                    probability = torch.sigmoid(logits.float()).view(len(self.views), -1)
                    per_fold[fold, start : start + chunk.shape[0]] = probability.mean(dim=0).cpu()
        return per_fold

    def predict(self, pages: list[np.ndarray]) -> Prediction:
        fold_probabilities = self.fold_probabilities(self.prepare(pages)).numpy().astype(np.float64)
        return Prediction(
            p_atypical=fold_probabilities.mean(axis=0),
            fold_probabilities=fold_probabilities,
            atypical=decide(fold_probabilities, self.threshold, self.rule),
        )


def classify_in_slices(net: MultiTaskNet, batch: torch.Tensor, pool: ThreadPoolExecutor, workers: int) -> torch.Tensor:
    """Return ``net.classify(batch)`` computed as ``2 * workers`` slices of the batch on ``pool``'s threads.

    Each worker runs one intra-op thread, so ``workers`` threads share the cores that intra-op
    parallelism would use. EfficientNet-Lite's small depthwise convolutions split poorly across
    intra-op threads, so on 2 CPU cores this scored 16 pages x 3 views with five folds in 0.64 s
    against 0.91 s as one batch on two intra-op threads (benchmarks/README.md). Slicing changes no
    result beyond float rounding, because every image is scored on its own.
    """
    # NOTE: measured on 2 cores only, where twice as many slices as workers was the fastest split.
    slices = torch.tensor_split(batch, min(len(batch), 2 * workers))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # worker threads take this setting when they first run an op; restored below
    try:
        logits = list(pool.map(lambda images: _classify_without_grad(net, images), slices))
    finally:
        torch.set_num_threads(threads)
    return torch.cat(logits)


def _classify_without_grad(net: MultiTaskNet, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():  # the mode is per thread, so a worker must enter it itself
        return net.classify(images)


def fold_batch_norms(net: MultiTaskNet, probe_size: int = 32) -> int:
    """Fold each eval-mode batch norm that reads a convolution's output into that convolution.

    One pass of a random ``probe_size`` batch through the classification path, with hooks, finds the
    pairs: a batch norm is folded only when its input is the very tensor that a convolution returned,
    and both ran once in the pass. Its scale and shift move into the convolution's weight and bias,
    and the module is replaced by what came after the normalisation (timm's ``BatchNormAct2d`` keeps
    its dropout and activation). Modules that ``classify`` does not run, such as the decoder, stay as
    they are. The probe then runs again, and when any encoder output or logit moved by more than
    ``FOLD_TOLERANCE`` every change is undone. A network in training mode is left as it is, because
    the probe pass would update its running statistics. Returns the number of batch norms folded.
    """
    if net.training:
        return 0
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 256, (2, 3, probe_size, probe_size), generator=generator).float()
    pairs, expected = _conv_norm_pairs(net, probe)

    undo = []
    for conv_name, norm_name in pairs:
        conv, norm = net.get_submodule(conv_name), net.get_submodule(norm_name)
        parent_name, _, child_name = norm_name.rpartition(".")
        parent = net.get_submodule(parent_name)
        undo.append((conv, conv.weight, conv.bias, parent, child_name, norm))
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
        setattr(parent, child_name, _after_normalisation(norm))

    difference = (_probe_outputs(net, probe) - expected).abs().max().item() if pairs else 0.0
    if difference > FOLD_TOLERANCE:
        logger.warning("folding %d batch norm(s) moved the probe's encoder outputs by %.2e, more than %.0e, "
                       "so they stay unfolded and inference runs at the unfolded speed", len(pairs), difference, FOLD_TOLERANCE)
        for conv, weight, bias, parent, child_name, norm in undo:
            conv.weight, conv.bias = weight, bias
            setattr(parent, child_name, norm)
        return 0
    return len(pairs)


def _probe_outputs(net: MultiTaskNet, images: torch.Tensor) -> torch.Tensor:
    """Return every encoder feature map and the classification logits of ``images``, flattened into one vector."""
    with torch.no_grad():
        features = net.encoder(net.normalize(images))
        logits = net.classifier(net.pooled(features[-1]))
    return torch.cat([tensor.flatten() for tensor in (*features, logits)])


def _after_normalisation(norm: nn.BatchNorm2d) -> nn.Module:
    """Return the module that does what ``norm`` does after normalising."""
    if type(norm) is BatchNormAct2d:
        return nn.Sequential(norm.drop, norm.act)
    return nn.Identity()


def _conv_norm_pairs(net: MultiTaskNet, images: torch.Tensor) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """Return the ``(convolution, batch norm)`` module names where the batch norm reads the convolution's
    output, and the probe outputs of ``images`` before any folding."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (name, output); holding the tensor keeps its id unique
    calls: dict[str, int] = {}
    found: list[tuple[str, str]] = []

    def after_conv(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            outputs[id(output)] = (name, output)
        return hook

    def before_norm(name):
        def hook(module, inputs):
            calls[name] = calls.get(name, 0) + 1
            source = outputs.get(id(inputs[0]))
            if source is not None and source[1] is inputs[0]:
                found.append((source[0], name))
        return hook

    handles = []
    for name, module in net.named_modules():
        if type(module) in (nn.Conv2d, Conv2dSame):
            handles.append(module.register_forward_hook(after_conv(name)))
        elif type(module) in (nn.BatchNorm2d, BatchNormAct2d) and not module.training and module.track_running_stats:
            handles.append(module.register_forward_pre_hook(before_norm(name)))
    try:
        expected = _probe_outputs(net, images)
    finally:
        for handle in handles:
            handle.remove()

    conv_uses: dict[str, int] = {}
    for conv_name, _ in found:
        conv_uses[conv_name] = conv_uses.get(conv_name, 0) + 1
    pairs = [(c, n) for c, n in found if calls[c] == 1 and calls[n] == 1 and conv_uses[c] == 1]
    return pairs, expected
