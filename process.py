"""Grand Challenge entry point for MIDOG 2025 track 2: atypical vs normal mitotic figure classification.

    python process.py [--input DIR] [--output DIR] [--weights DIR] [--device auto|cpu|cuda]
                      [--confidence predicted-class|atypical]

Reads the one stack on the socket ``stacked-histopathology-roi-cropouts`` under ``--input`` (default
``/input``), scores every page with the fold ensemble and writes
``multiple-mitotic-figure-classification.json`` to ``--output`` (default ``/output``): one
``{"class": "normal"|"atypical", "confidence": float}`` per page, in page order. The confidence is
the probability of the written class (``--confidence atypical`` writes P(atypical) instead).

On any failure it prints one line on stderr naming the problem and the file, writes nothing and exits 1.
Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("process")


def offline_environment() -> None:
    """Keep every library off the network and every cache under /tmp, even with HOME unset or read-only."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for variable, folder in (("TORCH_HOME", "torch"), ("XDG_CACHE_HOME", "cache"), ("MPLCONFIGDIR", "matplotlib")):
        os.environ.setdefault(variable, str(Path(tempfile.gettempdir()) / folder))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", type=Path, default=Path("/input"), help="folder with inputs.json and images/")
    parser.add_argument("--output", type=Path, default=Path("/output"), help="folder for the JSON result")
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder with manifest.json and fold files (default: /opt/ml/model if it has a manifest, else weights/ beside this file)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the network")
    parser.add_argument("--confidence", choices=("predicted-class", "atypical"), default="predicted-class",
                        help="what 'confidence' contains: the probability of the written class, as the official "
                        "evaluator reads it, or P(atypical) on every page")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of a failure")
    return parser.parse_args(argv)


def check_writable(folder: Path) -> None:
    """Create the output folder if needed and check that a file can be written there, before any work."""
    from model.io import StackError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StackError(f"{folder}: cannot create the output folder ({error.strerror})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise StackError(f"{folder}: output folder is not writable ({error.strerror})") from None


def build_result(p_atypical, classes, confidence: str = "predicted-class") -> list[dict]:
    """Pair each page's class with its confidence, checking that every confidence is a finite float in [0, 1].

    With ``predicted-class`` the confidence is the probability of the class written beside it:
    P(atypical) for an atypical page, 1 - P(atypical) for a normal one. The official MIDOG 2025 track-2
    evaluator reads it that way, recovering P(atypical) as ``confidence`` or ``1 - confidence`` by class
    before it computes AUROC. With ``atypical`` the confidence is P(atypical) on every page.
    """
    result = []
    for index, (probability, name) in enumerate(zip(p_atypical, classes)):
        value = float(probability)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0) or name not in ("normal", "atypical"):
            raise ValueError(f"page {index}: invalid prediction class={name!r} P(atypical)={value!r}")
        if confidence == "predicted-class" and name == "normal":
            value = 1.0 - value
        result.append({"class": name, "confidence": value})
    return result


def write_json_atomic(data: list[dict], path: Path) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", suffix=".json", delete=False) as handle:
        json.dump(data, handle, indent=2)
        temporary = Path(handle.name)
    try:
        temporary.chmod(0o644)
        temporary.replace(path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import torch

    from model.io import OUTPUT_FILE, find_stack, read_stack
    from model.predict import Predictor, resolve_weights_dir

    cuda = torch.cuda.is_available()
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none"
    logger.info("torch %s; CUDA available: %s (%d device(s): %s)", torch.__version__, cuda, torch.cuda.device_count(), names)
    check_writable(args.output)

    stack_path = find_stack(args.input)
    pages = read_stack(stack_path)
    logger.info("read %d page(s) from %s", len(pages), stack_path)

    weights_dir, reason = resolve_weights_dir(args.weights)
    loaded = time.perf_counter()
    predictor = Predictor(weights_dir, device=args.device)
    logger.info(
        "loaded %d fold(s) from %s (%s) on %s in %.2f s; views %s, rule %s, threshold %.4f",
        len(predictor.nets), weights_dir, reason, predictor.device, time.perf_counter() - loaded,
        ",".join(predictor.views), predictor.rule, predictor.threshold,
    )

    prediction = predictor.predict(pages)
    result = build_result(prediction.p_atypical, prediction.classes, args.confidence)
    if len(result) != len(pages):
        raise ValueError(f"{len(result)} predictions for {len(pages)} pages")

    output_path = args.output / OUTPUT_FILE
    write_json_atomic(result, output_path)
    atypical = sum(entry["class"] == "atypical" for entry in result)
    logger.info("wrote %s: %d page(s), %d atypical, in %.2f s", output_path, len(result), atypical, time.perf_counter() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    offline_environment()
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    from model.io import StackError
    from model.predict import WeightsError

    try:
        return run(args)
    except (StackError, WeightsError) as error:
        message = str(error)
    except OSError as error:
        message = f"{error.filename or ''}: {error.strerror or error}".lstrip(": ")
    except Exception as error:  # noqa: BLE001 - one line instead of a traceback, unless --debug
        if args.debug:
            raise
        message = f"unexpected {type(error).__name__}: {error}"
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
