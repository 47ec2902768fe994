"""Make the container's sample input and its expected output from synthetic patches.

The repository ships no third-party images, so ``test/input`` is drawn here: 16 deterministic
128x128 H&E-like patches (eosin-pink stroma with texture, a few purple nuclei, a dark irregular
mitotic-figure-like blob in the centre). The patches carry no labels; they exercise reading,
inference and the output format, not accuracy. The script writes

    test/input/inputs.json                                                      Grand Challenge socket list
    test/input/images/stacked-histopathology-roi-cropouts/stack.tiff            16-page deflate TIFF
    test/expected_output.json                                                   process.py's output on it

Regenerate after the weights change (the expected output belongs to exactly those weights):

    .venv/bin/python test/make_sample.py --weights weights
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model.io import SOCKET, case_inputs  # noqa: E402 - needs the checkout on sys.path first
OUTPUT_FILE = "multiple-mitotic-figure-classification.json"
STACK_NAME = "stack.tiff"

# Optical density per unit stain in R, G, B (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001).
HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])

# The real challenge stacks are scanned at about 0.248 um per pixel, which is 25,400 / 0.248 dpi.
DPI = 25_400 / 0.248


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Return a ``(size, size)`` float field in [0, 1]: random values on a coarse grid, bicubically upsampled."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    field = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(field), 0.0, 1.0)


def ellipse_mask(size: int, centre: tuple[float, float], radii: tuple[float, float], angle: float,
                 wobble: np.ndarray | None = None) -> np.ndarray:
    """Return a soft ``(size, size)`` mask of a rotated ellipse whose radius ``wobble`` varies with angle.

    ``wobble[k]`` is the relative amplitude of the cosine of ``k + 1`` times the polar angle.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = y - centre[0], x - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / radii[0]
    v = (-dx * sin + dy * cos) / radii[1]
    distance = np.sqrt(u * u + v * v)
    if wobble is not None:
        theta = np.arctan2(v, u)
        harmonics = np.arange(1, len(wobble) + 1)
        distance = distance / (1.0 + (wobble[:, None, None] * np.cos(harmonics[:, None, None] * theta)).sum(0))
    # A one-pixel ramp at the edge, so that the shapes are not aliased.
    edge = 1.0 / max(min(radii), 1.0)
    return np.clip((1.0 - distance) / edge, 0.0, 1.0)


def draw_patch(rng: np.random.Generator, size: int, irregular: bool) -> np.ndarray:
    """Draw one ``(size, size, 3)`` uint8 RGB patch. With ``irregular`` the figure is split into several clumps."""
    eosin = 0.30 + 0.35 * smooth_noise(rng, size, 6) + 0.15 * smooth_noise(rng, size, 24)
    hematoxylin = 0.08 * smooth_noise(rng, size, 16)

    # Interphase nuclei away from the centre: pale, with chromatin speckle.
    for _ in range(rng.integers(5, 10)):
        while True:
            centre = rng.uniform(8, size - 8, 2)
            if np.hypot(*(centre - size / 2)) > size / 4:
                break
        radii = rng.uniform(7, 13, 2)
        mask = ellipse_mask(size, tuple(centre), tuple(radii), rng.uniform(0, np.pi))
        speckle = 0.7 + 0.3 * smooth_noise(rng, size, 40)
        hematoxylin += mask * rng.uniform(0.5, 0.8) * speckle

    # The mitotic figure: dense, dark, irregular outline, in the centre as in the challenge patches.
    clumps = rng.integers(3, 6) if irregular else 1
    for index in range(clumps):
        offset = rng.normal(0, 7 if irregular else 1.5, 2)
        centre = (size / 2 + offset[0], size / 2 + offset[1])
        radii = (rng.uniform(4, 8), rng.uniform(3, 6)) if irregular else (rng.uniform(10, 14), rng.uniform(4, 7))
        wobble = rng.normal(0, 0.12, 5)
        mask = ellipse_mask(size, centre, radii, rng.uniform(0, np.pi), wobble)
        hematoxylin += mask * rng.uniform(1.3, 1.8)

    optical_density = hematoxylin[..., None] * HEMATOXYLIN + eosin[..., None] * EOSIN
    rgb = 255.0 * np.exp(-optical_density) + rng.normal(0, 3.0, (size, size, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def write_input(input_dir: Path, pages: list[np.ndarray]) -> Path:
    """Write the stack and ``inputs.json`` in the layout Grand Challenge gives the container."""
    stack_dir = input_dir / "images" / SOCKET
    stack_dir.mkdir(parents=True, exist_ok=True)
    for stale in stack_dir.iterdir():
        stale.unlink()

    images = [Image.fromarray(page) for page in pages]
    stack_path = stack_dir / STACK_NAME
    images[0].save(stack_path, save_all=True, append_images=images[1:], compression="tiff_adobe_deflate", dpi=(DPI, DPI))

    (input_dir / "inputs.json").write_text(json.dumps(case_inputs(STACK_NAME), indent=4) + "\n", encoding="utf-8")
    return stack_path


def run_process(input_dir: Path, weights: Path, device: str) -> list[dict]:
    """Run process.py on ``input_dir`` exactly as a user would, and return its JSON output."""
    with tempfile.TemporaryDirectory(prefix="sample-output-") as output_dir:
        command = [sys.executable, str(ROOT / "process.py"), "--input", str(input_dir), "--output", output_dir,
                   "--weights", str(weights), "--device", device]
        completed = subprocess.run(command, check=False)
        if completed.returncode != 0:
            raise SystemExit(f"process.py failed with exit code {completed.returncode}: {' '.join(command)}")
        return json.loads((Path(output_dir) / OUTPUT_FILE).read_text(encoding="utf-8"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help="weights folder that process.py scores with")
    parser.add_argument("--input", type=Path, default=ROOT / "test" / "input", help="folder to write the sample input to")
    parser.add_argument("--expected", type=Path, default=ROOT / "test" / "expected_output.json", help="file for process.py's output")
    parser.add_argument("--pages", type=int, default=16, help="number of patches in the stack")
    parser.add_argument("--size", type=int, default=128, help="patch side in pixels")
    parser.add_argument("--seed", type=int, default=2025, help="random seed, so that the same seed draws the same patches")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device for the reference run. Keep cpu, because the GPU path runs in float16 and test.sh allows only 1e-3 per confidence")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pages < 1:
        raise SystemExit(f"--pages must be at least 1, got {args.pages}")
    if not (args.weights / "manifest.json").is_file():
        raise SystemExit(f"{args.weights / 'manifest.json'}: manifest not found; pass the weights folder with --weights")

    rng = np.random.default_rng(args.seed)
    pages = [draw_patch(rng, args.size, irregular=index % 2 == 1) for index in range(args.pages)]
    stack_path = write_input(args.input, pages)
    print(f"wrote {len(pages)} page(s) to {stack_path}", file=sys.stderr)

    result = run_process(args.input, args.weights, args.device)
    if len(result) != len(pages):
        raise SystemExit(f"process.py returned {len(result)} prediction(s) for {len(pages)} page(s)")
    args.expected.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    atypical = sum(entry["class"] == "atypical" for entry in result)
    print(f"wrote {args.expected}: {len(result)} page(s), {atypical} atypical, weights {args.weights}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
