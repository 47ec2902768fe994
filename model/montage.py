"""Montages for checking auxiliary targets and augmentation by eye.

    python -m model.montage --data amibr:../shared/data/ami-br --out docs/targets.png
    python -m model.montage --data amibr:../shared/data/ami-br --out docs/augmented.png --augment

Each patch becomes three tiles: the patch with the figure mask outlined in green and the other nuclei
in yellow (a red outline marks a fallback disc), then the horizontal and vertical HV maps (blue -1,
white 0, red +1). With ``--augment`` the patches, masks and HV maps are augmented as in training.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from model.augment import AugmentConfig
from model.data import PatchDataset, audit, compute_targets, load_records
from model.targets import TargetConfig

GREEN, YELLOW, RED = (0, 220, 0), (255, 220, 0), (230, 0, 0)


def outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def diverging(values: np.ndarray) -> np.ndarray:
    """Map values in [-1, 1] to RGB: blue for -1, white for 0, red for +1."""
    values = np.clip(values, -1, 1)[..., None]
    white = np.ones(values.shape[:2] + (3,))
    red, blue = np.array([0.85, 0.1, 0.1]), np.array([0.1, 0.2, 0.85])
    rgb = np.where(values >= 0, white * (1 - values) + red * values, white * (1 + values) - blue * values)
    return (rgb * 255).astype(np.uint8)


def tiles(item: dict) -> list[np.ndarray]:
    image = item["image"].numpy().transpose(1, 2, 0).clip(0, 255).astype(np.uint8).copy()
    figure = item["figure_mask"].numpy() > 0.5
    nuclei = item["nuclei"].numpy() > 0.5
    image[outline(nuclei & ~figure)] = YELLOW
    image[outline(figure)] = RED if bool(item["target_fallback"]) else GREEN
    hv = item["hv"].numpy()
    return [image, diverging(hv[0]), diverging(hv[1])]


def make_montage(dataset: PatchDataset, indices: list[int], columns: int = 4, gap: int = 4) -> Image.Image:
    """Lay out ``len(indices)`` patches, three tiles each, ``columns`` patches per row."""
    size = dataset[indices[0]]["image"].shape[-1]
    rows = -(-len(indices) // columns)
    width = columns * (3 * size + 2 * gap) + (columns - 1) * 3 * gap
    canvas = np.full((rows * (size + gap), width, 3), 255, np.uint8)
    for position, index in enumerate(indices):
        row, column = divmod(position, columns)
        top, left = row * (size + gap), column * (3 * size + 5 * gap)
        for tile_index, tile in enumerate(tiles(dataset[index])):
            x = left + tile_index * (size + gap)
            canvas[top : top + size, x : x + size] = tile
    return Image.fromarray(canvas)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.montage", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="amibr:DIR, folders:DIR or midog25:CSV:IMAGES")
    parser.add_argument("--split", default="train", help="for amibr: train, test or all")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--count", type=int, default=32, help="number of patches")
    parser.add_argument("--seed", type=int, default=0, help="which patches are drawn, and their augmentation")
    parser.add_argument("--augment", action="store_true", help="show training augmentation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    records, images, _ = audit(load_records(args.data, args.split))
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(len(records), size=min(args.count, len(records)), replace=False).tolist())
    records = [records[i] for i in chosen]
    targets = compute_targets([r.name for r in records], images, TargetConfig())
    dataset = PatchDataset(records, images, targets, augment=AugmentConfig() if args.augment else None, seed=args.seed)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_montage(dataset, list(range(len(records)))).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
