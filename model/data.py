"""Labelled patch data: three layouts behind one ``--data`` spec, the load-time audit, slide-grouped folds.

Specs:

* ``amibr:DIR``: AMi-Br (``AMI-BR.csv`` plus ``Atypical/`` and ``Normal/`` folders of
  ``{dataset}_{uid}.png``). ``split`` selects the published ``amibr_train_split.csv`` rows (``train``),
  the remaining rows (``test``) or all of them.
* ``folders:DIR``: one folder per class, ``Atypical`` and ``Normal`` in any letter case (AtNorM-Br).
  Without slide names each patch is its own group.
* ``midog25:CSV:IMAGES``: the MIDOG 2025 Atypical Training Set (labels ``AMF``/``NMF``; the slide is
  ``filename``; ``Tumor``, ``Scanner``, ``Species`` are domains).

The audit hashes every file and applies a fixed policy, reported through the logger:

* unreadable files are dropped;
* of byte-identical copies with one label, the first by name is kept;
* byte-identical copies with conflicting labels are all dropped;
* pages that are not 128x128 RGB are converted and fitted like the container's input
  (:func:`model.io.fit_page`).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.augment import AugmentConfig, geometric, photometric
from model.io import fit_page, to_rgb
from model.targets import TargetConfig, hv_maps, make_targets

logger = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "atypical")


class DataError(Exception):
    """A data spec, label file or image folder is invalid."""


@dataclass
class Record:
    name: str  # unique patch id, the file path relative to the data root
    path: Path
    label: int  # 1 atypical, 0 normal
    slide: str
    domains: dict[str, str] = field(default_factory=dict)
    agreement: float = math.nan  # fraction of experts voting atypical
    subtype: str = ""  # mitosis phase or atypia subtype, "" when unknown


def load_records(spec: str, split: str = "all") -> list[Record]:
    """Parse a ``--data`` spec into records (not yet audited)."""
    kind, _, rest = spec.partition(":")
    if kind == "amibr" and rest:
        return _amibr_records(Path(rest), split)
    if kind == "folders" and rest:
        return _folder_records(Path(rest))
    if kind == "midog25" and ":" in rest:
        csv_path, images = rest.split(":", 1)
        return _midog25_records(Path(csv_path), Path(images))
    raise DataError(f"invalid data spec '{spec}': expected amibr:DIR, folders:DIR or midog25:CSV:IMAGES")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _is_true(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes", "amf", "atypical")


def _amibr_records(root: Path, split: str) -> list[Record]:
    if split not in ("train", "test", "all"):
        raise DataError(f"invalid split '{split}' for amibr: expected train, test or all")
    rows = _read_csv(root / "AMI-BR.csv")
    train_names = {row["dataset_uid"] for row in _read_csv(root / "amibr_train_split.csv")} if split != "all" else set()

    records = []
    for row in rows:
        file_name = f"{row['dataset']}_{row['uid']}.png"
        if split == "train" and file_name not in train_names or split == "test" and file_name in train_names:
            continue
        label = int(_is_true(row["majority_atypical"]))
        folder = "Atypical" if label else "Normal"
        votes = [_is_true(row[f"expert{i}_atypical"]) for i in (1, 2, 3)]
        records.append(
            Record(
                name=f"{folder}/{file_name}",
                path=root / folder / file_name,
                label=label,
                slide=f"{row['dataset']}/{row['slide']}",
                domains={"dataset": row["dataset"]},
                agreement=sum(votes) / len(votes),
                subtype=row.get("expert1_label", "").strip(),
            )
        )
    return records


def _folder_records(root: Path) -> list[Record]:
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.lower() not in CLASS_NAMES:
            logger.warning("%s: ignoring folder that is neither Atypical nor Normal", folder)
            continue
        label = CLASS_NAMES.index(folder.name.lower())
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
                name = f"{folder.name}/{path.name}"
                records.append(Record(name=name, path=path, label=label, slide=name, domains={"dataset": root.name}))
    if not records:
        raise DataError(f"{root}: no images found in Atypical/ or Normal/ folders")
    return records


def _midog25_records(csv_path: Path, images: Path) -> list[Record]:
    records = []
    for row in _read_csv(csv_path):
        majority = row["majority"].strip().upper()
        if majority not in ("AMF", "NMF"):
            raise DataError(f"{csv_path}: image {row['image_id']} has label '{row['majority']}', expected AMF or NMF")
        votes = [row[f"expert{i}"].strip().upper() == "AMF" for i in (1, 2, 3) if row.get(f"expert{i}", "").strip()]
        records.append(
            Record(
                name=row["image_id"],
                path=images / row["image_id"],
                label=int(majority == "AMF"),
                slide=row["filename"],
                domains={key.lower(): row[key] for key in ("Tumor", "Scanner", "Species") if key in row},
                agreement=sum(votes) / len(votes) if votes else math.nan,
            )
        )
    return records


@dataclass
class AuditReport:
    size: int = 128
    total: int = 0
    unreadable: list[str] = field(default_factory=list)
    refitted: list[str] = field(default_factory=list)  # not 128x128 RGB: converted and fitted
    duplicate_copies: list[str] = field(default_factory=list)  # identical copies dropped
    conflicting: list[str] = field(default_factory=list)  # identical files with different labels, all dropped
    kept: int = 0

    def summary(self) -> str:
        return (
            f"{self.total} patches: kept {self.kept}; dropped {len(self.unreadable)} unreadable, "
            f"{len(self.duplicate_copies)} identical copies, {len(self.conflicting)} in groups with conflicting labels; "
            f"{len(self.refitted)} converted to {self.size}x{self.size} RGB"
        )


def audit(records: list[Record], size: int = 128) -> tuple[list[Record], dict[str, np.ndarray], AuditReport]:
    """Read, hash and check every patch; return the kept records, their images by name and the report."""
    from tqdm import tqdm

    report = AuditReport(size=size, total=len(records))
    images: dict[str, np.ndarray] = {}
    by_digest: dict[str, list[Record]] = defaultdict(list)

    for record in tqdm(sorted(records, key=lambda r: r.name), desc="audit", leave=False, disable=len(records) < 200):
        try:
            data = record.path.read_bytes()
            with Image.open(record.path) as image:
                mode = image.mode
                array = np.asarray(image.convert("RGB") if mode in ("P", "PA", "1", "CMYK") else image)
        except (OSError, ValueError, SyntaxError) as error:
            report.unreadable.append(f"{record.name} ({error})")
            continue
        array = to_rgb(array)
        if array.shape[:2] != (size, size) or mode != "RGB":
            report.refitted.append(f"{record.name} ({mode} {array.shape[1]}x{array.shape[0]})")
            array = fit_page(array, size)
        images[record.name] = array
        by_digest[hashlib.sha256(data).hexdigest()].append(record)

    kept = []
    for group in by_digest.values():
        if len({r.label for r in group}) > 1:
            report.conflicting.extend(f"{r.name} (label {CLASS_NAMES[r.label]})" for r in group)
            continue
        kept.append(group[0])
        report.duplicate_copies.extend(f"{r.name} (copy of {group[0].name})" for r in group[1:])

    kept.sort(key=lambda r: r.name)
    images = {r.name: images[r.name] for r in kept}
    report.kept = len(kept)
    logger.info("audit: %s", report.summary())
    for title, items in (("unreadable", report.unreadable), ("conflicting labels", report.conflicting)):
        for item in items:
            logger.warning("audit: dropped, %s: %s", title, item)
    return kept, images, report


def make_folds(records: list[Record], folds: int = 5, seed: int = 42) -> np.ndarray:
    """Return each record's validation fold: StratifiedGroupKFold by slide, shuffled with ``seed``."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.array([r.label for r in records])
    groups = np.array([r.slide for r in records])
    assignment = np.full(len(records), -1)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, validation) in enumerate(splitter.split(np.zeros(len(records)), labels, groups)):
        assignment[validation] = fold
    return assignment


def compute_targets(
    names: list[str], images: dict[str, np.ndarray], config: TargetConfig, cache_dir: Path | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Make the auxiliary targets of every patch, cached on disk per patch content and settings."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(hashlib.sha256(images[name].tobytes()).digest())
    cache = cache_dir / f"targets-{config.digest()}-{digest.hexdigest()[:12]}.npz" if cache_dir else None

    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            arrays = {key: stored[key] for key in ("figure_mask", "nuclei", "fallback")}
        return {name: {key: value[i] for key, value in arrays.items()} for i, name in enumerate(names)}

    targets = {name: make_targets(images[name], config) for name in tqdm(names, desc="targets", leave=False)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(".tmp.npz")
        np.savez_compressed(
            temporary,
            figure_mask=np.stack([targets[n]["figure_mask"] for n in names]),
            nuclei=np.stack([targets[n]["nuclei"] for n in names]),
            fallback=np.array([targets[n]["fallback"] for n in names]),
        )
        temporary.replace(cache)
    return targets


class PatchDataset(torch.utils.data.Dataset):
    """Patches with their labels and auxiliary targets; augmented when ``augment`` is set."""

    def __init__(
        self,
        records: list[Record],
        images: dict[str, np.ndarray],
        targets: dict[str, dict[str, np.ndarray]] | None,
        subtypes: tuple[str, ...] = (),
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ):
        self.records = records
        self.images = images
        self.targets = targets
        self.subtype_index = {name: i for i, name in enumerate(subtypes)}
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        image = self.images[record.name]
        height, width = image.shape[:2]
        if self.targets is not None:
            target = self.targets[record.name]
            masks = np.stack([target["figure_mask"], target["nuclei"]]).astype(np.float32)
            fallback = bool(target["fallback"])
        else:
            masks, fallback = np.zeros((2, height, width), np.float32), True

        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, masks = geometric(photometric(image, rng, self.augment), masks, rng, self.augment)
        image = np.ascontiguousarray(image, dtype=np.float32).transpose(2, 0, 1)
        masks = (masks > 0.5).astype(np.float32)

        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": torch.tensor(float(record.label)),
            "figure_mask": torch.from_numpy(masks[0]),
            "hv": torch.from_numpy(hv_maps(masks[0] > 0)),
            "nuclei": torch.from_numpy(masks[1]),
            "target_fallback": torch.tensor(fallback),
            "agreement": torch.tensor(record.agreement, dtype=torch.float32),
            "subtype": torch.tensor(self.subtype_index.get(record.subtype, -1)),
            "index": torch.tensor(index),
        }
