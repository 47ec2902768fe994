"""Pack labelled patches into challenge-style cases: 16-page TIFF stacks, ``inputs.json`` and ground truth.

    python -m model.stacks --data amibr:../shared/data/ami-br --split test --out stacks/amibr-test
    python process.py --input stacks/amibr-test/cases/stack_1 --output /tmp/out

MIDOG 2025 track 2 hands a container one multi-page TIFF per job on the socket
``stacked-histopathology-roi-cropouts``, with up to 16 patches of 128x128 RGB. This command builds the same
layout from a labelled data set, so the container (or any other) can be run on cases with known labels:

* ``OUT/cases/stack_<k>/inputs.json`` and ``OUT/cases/stack_<k>/images/stacked-histopathology-roi-cropouts/stack_<k>.tiff``
  (``k`` from 1), each stack deflate-compressed with the resolution in pixels per centimetre. Grand
  Challenge's TIFF importer (panimg) reads the pixel size from these tags and accepts only inch or
  centimetre units.
* ``OUT/ground_truth.json`` in the format of the official MIDOG 2025 track-2 evaluation container
  (DeepMicroscopy/MIDOG25_T2_evaluation_docker): one ``{"image", "labels", "tumordomains"}`` entry per
  stack, with labels ``"normal"``/``"atypical"`` and one integer domain per page. That evaluator uses the
  domain numbers only to group pages for its per-domain metrics.
* ``OUT/pages.csv``: stack, page, patch name, label, slide and domain of every page.

Patches pass the same audit as training (:func:`model.data.audit`), are shuffled with ``--seed`` and
cut into stacks of ``--pages``, so the last stack contains the remainder. Every stack is read back with
:func:`model.io.read_stack` and compared with the patches written.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np

from model.data import CLASS_NAMES, DataError, Record, audit, load_records
from model.io import SOCKET, StackError, case_inputs, read_stack

logger = logging.getLogger("model.stacks")

DEFAULT_PAGES = 16
DEFAULT_PIXEL_SIZE_UM = 0.25  # MIDOG and AMi-Br patches are cut at about 0.25 um per pixel
TIFF_RESOLUTION_UNIT_CENTIMETER = 3


def plan_stacks(records: list[Record], pages: int, seed: int) -> list[list[Record]]:
    """Shuffle ``records`` with ``seed`` and cut them into stacks of ``pages`` (the last may be shorter)."""
    if pages < 1:
        raise ValueError(f"invalid page count {pages}: expected at least 1")
    order = np.random.default_rng(seed).permutation(len(records))
    shuffled = [records[i] for i in order]
    return [shuffled[start : start + pages] for start in range(0, len(shuffled), pages)]


def domain_key(records: list[Record], requested: str | None = None) -> str | None:
    """Choose the record domain reported as ``tumordomains``: ``requested``, else ``tumor``, else ``dataset``."""
    if requested:
        missing = [r.name for r in records if requested not in r.domains]
        if missing:
            raise DataError(f"domain '{requested}' missing on {len(missing)} patches, such as {missing[0]}. "
                            "Choose a --domain that every patch has")
        return requested
    for key in ("tumor", "dataset"):
        if all(key in r.domains for r in records):
            return key
    return None


def domain_numbers(records: list[Record], key: str | None) -> dict[str, int]:
    """Number each value of domain ``key`` from 1 in sorted order, as the evaluator expects integers."""
    if key is None:
        return {"": 1}
    return {value: number for number, value in enumerate(sorted({r.domains[key] for r in records}), start=1)}


def write_stack(path: Path, pages: list[np.ndarray], pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM) -> None:
    """Write ``(H, W, 3)`` uint8 pages as one deflate-compressed multi-page RGB TIFF."""
    from PIL import Image

    pixels_per_cm = 1e4 / pixel_size_um
    frames = [Image.fromarray(page, mode="RGB") for page in pages]
    frames[0].save(
        path,
        format="TIFF",
        save_all=True,
        append_images=frames[1:],
        compression="tiff_adobe_deflate",
        resolution_unit=TIFF_RESOLUTION_UNIT_CENTIMETER,
        x_resolution=pixels_per_cm,
        y_resolution=pixels_per_cm,
    )


def pack(
    records: list[Record],
    images: dict[str, np.ndarray],
    out: Path,
    pages: int = DEFAULT_PAGES,
    seed: int = 0,
    domain: str | None = None,
    pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
) -> list[dict]:
    """Write every case, ``ground_truth.json`` and ``pages.csv`` under ``out``, and return the ground truth."""
    from tqdm import tqdm

    out = Path(out)
    cases = out / "cases"
    for existing in (cases, out / "ground_truth.json"):
        if existing.exists() and (existing.is_file() or any(existing.iterdir())):
            raise FileExistsError(f"{existing} already exists; choose an empty --out folder so old stacks do not mix in")
    if not records:
        raise DataError("no patches to pack")

    key = domain_key(records, domain)
    numbers = domain_numbers(records, key)
    ground_truth, rows = [], []
    for index, stack in enumerate(tqdm(plan_stacks(records, pages, seed), desc="stacks"), start=1):
        name = f"stack_{index}"
        case = cases / name
        folder = case / "images" / SOCKET
        folder.mkdir(parents=True)
        (case / "inputs.json").write_text(json.dumps(case_inputs(f"{name}.tiff"), indent=4) + "\n", encoding="utf-8")

        arrays = [images[record.name] for record in stack]
        path = folder / f"{name}.tiff"
        write_stack(path, arrays, pixel_size_um)
        check_stack(path, arrays)

        values = [record.domains[key] if key else "" for record in stack]
        ground_truth.append(
            {
                "image": path.name,
                "labels": [CLASS_NAMES[record.label] for record in stack],
                "tumordomains": [numbers[value] for value in values],
            }
        )
        for page, (record, value) in enumerate(zip(stack, values)):
            rows.append([path.name, page, record.name, CLASS_NAMES[record.label], record.slide, value, numbers[value]])

    # One stack a line, like the evaluator's own example file.
    lines = ",\n ".join(json.dumps(entry) for entry in ground_truth)
    (out / "ground_truth.json").write_text(f"[{lines}]\n", encoding="utf-8")
    with (out / "pages.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stack", "page", "patch", "label", "slide", key or "domain", "tumordomain"])
        writer.writerows(rows)
    logger.info("domain '%s' numbered as %s", key, numbers)
    return ground_truth


def check_stack(path: Path, pages: list[np.ndarray]) -> None:
    """Read ``path`` back and require every page to equal the patch written."""
    read = read_stack(path)
    if len(read) != len(pages):
        raise StackError(f"{path}: read back {len(read)} pages, wrote {len(pages)}")
    for index, (expected, actual) in enumerate(zip(pages, read)):
        if not np.array_equal(expected, actual):
            raise StackError(f"{path}: page {index} reads back different from the patch written")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults in ``--help``, except for options whose default is None."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model.stacks",
        description="Pack labelled patches into challenge-style TIFF stack cases with ground truth.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--data", required=True, help="amibr:DIR, folders:DIR or midog25:CSV:IMAGES")
    parser.add_argument("--split", default="all", help="for amibr: train, test or all")
    parser.add_argument("--out", type=Path, required=True, help="empty or new folder for cases/, ground_truth.json, pages.csv")
    parser.add_argument("--pages", type=int, default=DEFAULT_PAGES, help="patches per stack")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle that assigns patches to stacks")
    parser.add_argument("--domain", default=None,
                        help="record domain written as tumordomains (default: tumor when every patch has it, else dataset)")
    parser.add_argument("--pixel-size", type=float, default=DEFAULT_PIXEL_SIZE_UM,
                        help="pixel size in micrometres, written as the TIFF resolution")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.pages < 1 or args.pixel_size <= 0:
            raise ValueError(f"--pages must be at least 1 and --pixel-size positive, got {args.pages} and {args.pixel_size}")
        records, images, _ = audit(load_records(args.data, args.split))  # logs what it dropped
        ground_truth = pack(records, images, args.out, args.pages, args.seed, args.domain, args.pixel_size)
    except (DataError, StackError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    atypical = sum(label == "atypical" for entry in ground_truth for label in entry["labels"])
    print(f"wrote {len(ground_truth)} cases ({len(records)} pages, {atypical} atypical) to {args.out / 'cases'}")
    print(f"ground truth: {args.out / 'ground_truth.json'}; page list: {args.out / 'pages.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
