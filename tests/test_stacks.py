"""Tests for model.stacks: packing, reading back, the case layout, ground truth and process.py on a case."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, require_data
from model import stacks
from model.data import CLASS_NAMES, DataError, Record, audit, load_records
from model.io import SOCKET, find_stack, read_stack


def write_patches(root: Path, atypical: int = 4, normal: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for folder, count in (("Atypical", atypical), ("Normal", normal)):
        (root / folder).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{folder.lower()}_{index}.png")
    return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("stacks")
    data = write_patches(root / "data")
    code = stacks.main(["--data", f"folders:{data}", "--out", str(root / "out"), "--pages", "4", "--seed", "3"])
    return code, data, root / "out"


def read_pages_csv(out: Path) -> list[dict]:
    with (out / "pages.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_pack_exit_code(packed):
    assert packed[0] == 0


def test_pack_stack_sizes(packed):
    ground_truth = json.loads((packed[2] / "ground_truth.json").read_text())
    assert [len(entry["labels"]) for entry in ground_truth] == [4, 4, 2]


def test_pack_case_layout(packed):
    case = packed[2] / "cases" / "stack_2"
    assert find_stack(case) == case / "images" / SOCKET / "stack_2.tiff"


def test_pack_inputs_json(packed):
    entries = json.loads((packed[2] / "cases" / "stack_1" / "inputs.json").read_text())
    assert entries[0]["interface"]["slug"] == SOCKET
    assert entries[0]["image"]["name"] == "stack_1.tiff"
    assert entries[0]["interface"]["relative_path"] == f"images/{SOCKET}"


def test_pack_round_trip(packed):
    """Every page read back equals its source patch, in the order and with the label pages.csv lists."""
    _, data, out = packed
    ground_truth = {entry["image"]: entry for entry in json.loads((out / "ground_truth.json").read_text())}
    rows = read_pages_csv(out)
    assert sorted(row["patch"] for row in rows) == sorted(f"{p.parent.name}/{p.name}" for p in data.glob("*/*.png"))

    for image_name, entry in ground_truth.items():
        pages = read_stack(out / "cases" / Path(image_name).stem / "images" / SOCKET / image_name)
        listed = [row for row in rows if row["stack"] == image_name]
        assert [int(row["page"]) for row in listed] == list(range(len(pages)))
        assert [row["label"] for row in listed] == entry["labels"]
        for page, row in zip(pages, listed):
            source = np.asarray(Image.open(data / row["patch"]).convert("RGB"))
            np.testing.assert_array_equal(page, source, err_msg=f"{image_name} page {row['page']}")
            assert row["label"] == row["patch"].split("/")[0].lower()


def test_pack_ground_truth_format(packed):
    entry = json.loads((packed[2] / "ground_truth.json").read_text())[0]
    assert set(entry) == {"image", "labels", "tumordomains"}
    assert set(entry["labels"]) <= set(CLASS_NAMES)
    assert all(isinstance(domain, int) for domain in entry["tumordomains"])


def test_pack_tiff_tags(packed):
    path = packed[2] / "cases" / "stack_1" / "images" / SOCKET / "stack_1.tiff"
    with Image.open(path) as image:
        tags = image.tag_v2
        assert image.n_frames == 4
        assert tags[259] == 8  # compression: Adobe deflate
        assert tags[296] == 3  # resolution unit: centimetre
        assert float(tags[282]) == pytest.approx(40000)  # pixels per cm at 0.25 um per pixel
        assert float(tags[283]) == pytest.approx(40000)


def test_pack_shuffle_follows_seed(tmp_path):
    data = write_patches(tmp_path / "data")
    records, images, _ = audit(load_records(f"folders:{data}"))
    first = [[r.name for r in stack] for stack in stacks.plan_stacks(records, 4, seed=1)]
    again = [[r.name for r in stack] for stack in stacks.plan_stacks(records, 4, seed=1)]
    other = [[r.name for r in stack] for stack in stacks.plan_stacks(records, 4, seed=2)]
    assert first == again
    assert first != other


def test_pack_rejects_used_folder(packed, capsys):
    _, data, out = packed
    code = stacks.main(["--data", f"folders:{data}", "--out", str(out)])
    assert code == 1
    assert "already exists" in capsys.readouterr().err


def test_pack_bad_spec(tmp_path, capsys):
    code = stacks.main(["--data", "folders", "--out", str(tmp_path / "out")])
    assert code == 1
    assert capsys.readouterr().err.startswith("error: invalid data spec 'folders'")


def test_domain_numbers_sorted():
    records = [Record(f"p{i}", Path(f"p{i}"), 0, "s", {"tumor": tumor}) for i, tumor in enumerate("cab")]
    assert stacks.domain_numbers(records, stacks.domain_key(records)) == {"a": 1, "b": 2, "c": 3}


def test_domain_key_prefers_tumor():
    records = [Record("p", Path("p"), 0, "s", {"dataset": "x", "tumor": "y"})]
    assert stacks.domain_key(records) == "tumor"


def test_domain_key_missing_raises():
    records = [Record("p", Path("p"), 0, "s", {"dataset": "x"})]
    with pytest.raises(DataError, match="domain 'scanner' missing on 1 patches"):
        stacks.domain_key(records, "scanner")


def test_process_reads_case(packed, tiny_weights, tmp_path):
    """process.py scores a generated case and writes one result per page."""
    import process

    output = tmp_path / "output"
    output.mkdir()
    code = process.main(["--input", str(packed[2] / "cases" / "stack_3"), "--output", str(output),
                         "--weights", str(tiny_weights), "--device", "cpu"])
    result = json.loads((output / "multiple-mitotic-figure-classification.json").read_text())
    assert code == 0
    assert len(result) == 2


def test_real_amibr_round_trip(tmp_path):
    """Twenty AMi-Br test patches survive packing unchanged."""
    root = require_data(DATA / "ami-br")
    records, images, _ = audit(load_records(f"amibr:{root}", "test")[:20])
    stacks.pack(records, images, tmp_path / "out", pages=16, seed=0)
    rows = read_pages_csv(tmp_path / "out")
    pages = read_stack(tmp_path / "out" / "cases" / "stack_2" / "images" / SOCKET / "stack_2.tiff")
    assert len(pages) == 4
    for page, row in zip(pages, [row for row in rows if row["stack"] == "stack_2.tiff"]):
        np.testing.assert_array_equal(page, images[row["patch"]])
    assert {row["dataset"] for row in rows} <= {r.domains["dataset"] for r in records}
