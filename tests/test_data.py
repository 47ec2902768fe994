"""The three data layouts, the audit and slide-grouped folds, on tiny fixtures made here."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, require_data, synthetic_patch, write_folders_dataset
from model.data import DataError, PatchDataset, audit, compute_targets, load_records, make_folds
from model.augment import AugmentConfig
from model.targets import TargetConfig

AMIBR_COLUMNS = ["", "slide", "dataset", "uid", "x", "y", "expert1_label", "expert2_label",
                 "expert1_atypical", "expert2_atypical", "expert3_atypical", "majority_atypical"]


def write_amibr(root: Path) -> Path:
    rows = []
    for uid in range(6):
        atypical = uid % 2 == 1
        votes = [atypical, atypical, uid == 1]
        rows.append({"": uid, "slide": f"{uid // 2:03d}.tiff", "dataset": "MIDOG21", "uid": uid, "x": 0, "y": 0,
                     "expert1_label": "AMF segregation" if atypical else "NMF metaphase", "expert2_label": "",
                     "expert1_atypical": votes[0], "expert2_atypical": votes[1], "expert3_atypical": votes[2],
                     "majority_atypical": atypical})
        folder = root / ("Atypical" if atypical else "Normal")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_patch(uid, atypical)).save(folder / f"MIDOG21_{uid}.png")
    with (root / "AMI-BR.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, AMIBR_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with (root / "amibr_train_split.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["dataset_uid"])
        writer.writeheader()
        writer.writerows({"dataset_uid": f"MIDOG21_{uid}.png"} for uid in range(4))
    return root


def test_amibr_layout_splits(tmp_path):
    root = write_amibr(tmp_path)
    train = load_records(f"amibr:{root}", "train")
    test = load_records(f"amibr:{root}", "test")
    assert [r.name for r in train] == ["Normal/MIDOG21_0.png", "Atypical/MIDOG21_1.png", "Normal/MIDOG21_2.png", "Atypical/MIDOG21_3.png"]
    assert len(test) == 2
    assert train[1].agreement == 1.0
    assert math.isclose(train[3].agreement, 2 / 3)
    assert train[1].subtype == "AMF segregation"
    assert train[0].slide == "MIDOG21/000.tiff"


def test_folders_layout_any_case(tmp_path):
    write_folders_dataset(tmp_path / "set", per_class=2)
    (tmp_path / "set" / "Atypical").rename(tmp_path / "set" / "ATYPICAL")
    records = load_records(f"folders:{tmp_path / 'set'}")
    assert sorted(r.label for r in records) == [0, 0, 1, 1]
    assert all(math.isnan(r.agreement) for r in records)


def test_midog25_layout(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for index, (majority, votes) in enumerate([("AMF", ("AMF", "AMF", "NMF")), ("NMF", ("NMF", "NMF", "NMF"))]):
        Image.fromarray(synthetic_patch(index, majority == "AMF")).save(images / f"{index + 1}.png")
        rows.append({"image_id": f"{index + 1}.png", "filename": f"slide{index}.tiff", "coordinateX": 1, "coordinateY": 2,
                     "Tumor": "human melanoma", "Scanner": "Aperio", "Origin": "UMC", "Species": "human",
                     "expert1": votes[0], "expert2": votes[1], "expert3": votes[2], "majority": majority})
    csv_path = tmp_path / "MIDOG25_Atypical_Classification_Train_Set.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    records = load_records(f"midog25:{csv_path}:{images}")
    assert [r.label for r in records] == [1, 0]
    assert math.isclose(records[0].agreement, 2 / 3)
    assert records[0].domains == {"tumor": "human melanoma", "scanner": "Aperio", "species": "human"}
    assert records[1].slide == "slide1.tiff"


def test_invalid_spec_rejected():
    with pytest.raises(DataError, match="expected amibr:DIR"):
        load_records("csv:somewhere")


def test_audit_duplicates_and_conflicts(tmp_path):
    root = write_folders_dataset(tmp_path / "set", per_class=3)
    shutil.copy(root / "Normal" / "0.png", root / "Normal" / "copy.png")  # identical, same label
    shutil.copy(root / "Normal" / "1.png", root / "Atypical" / "conflict.png")  # identical, other label
    (root / "Normal" / "broken.png").write_bytes(b"not a png")
    records, images, report = audit(load_records(f"folders:{root}"))
    names = [r.name for r in records]
    assert len(report.duplicate_copies) == 1
    assert len(report.conflicting) == 2
    assert len(report.unreadable) == 1
    assert "Normal/1.png" not in names
    assert "Atypical/conflict.png" not in names
    assert ("Normal/0.png" in names) != ("Normal/copy.png" in names)
    assert set(images) == set(names)


def test_audit_fits_odd_sizes(tmp_path):
    root = write_folders_dataset(tmp_path / "set", per_class=1, size=140)
    records, images, report = audit(load_records(f"folders:{root}"), size=128)
    assert len(report.refitted) == 2
    assert all(image.shape == (128, 128, 3) for image in images.values())


def test_folds_keep_slides_together():
    from model.data import Record

    records = [Record(name=str(i), path=Path(str(i)), label=i % 3 == 0, slide=f"s{i // 4}") for i in range(60)]
    folds = make_folds(records, folds=5, seed=42)
    for slide in {r.slide for r in records}:
        assert len({f for r, f in zip(records, folds) if r.slide == slide}) == 1
    assert set(folds) == set(range(5))


def test_dataset_items_and_cache(tmp_path):
    root = write_folders_dataset(tmp_path / "set", per_class=2)
    records, images, _ = audit(load_records(f"folders:{root}"))
    names = [r.name for r in records]
    targets = compute_targets(names, images, TargetConfig(), tmp_path / "cache")
    cached = compute_targets(names, images, TargetConfig(), tmp_path / "cache")
    np.testing.assert_array_equal(cached[names[0]]["figure_mask"], targets[names[0]]["figure_mask"])
    item = PatchDataset(records, images, targets, augment=AugmentConfig())[0]
    assert item["image"].shape == (3, 128, 128)
    assert item["hv"].shape == (2, 128, 128)
    assert float(item["hv"].abs().max()) <= 1.0
    assert int(item["subtype"]) == -1


def test_atnorm_audit_reports_known_conflicts():
    require_data(DATA / "atnorm-br")
    _, _, report = audit(load_records(f"folders:{DATA / 'atnorm-br'}"))
    assert report.total == 746
    assert len(report.conflicting) >= 4
    assert len(report.duplicate_copies) > 0
