"""Compare two multiple-mitotic-figure-classification.json files page by page.

    python3 test/compare_output.py ACTUAL EXPECTED [--tolerance 1e-3]

Both files must be JSON lists of ``{"class": ..., "confidence": ...}``, one per page. They match when
the lengths are equal, every page has the same class, and every confidence differs by at most the
tolerance. Each difference is printed on stderr with its page index; the exit code is 1 on any
difference or invalid file, else 0. Standard library only, so it runs on a host without the
project's environment.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load_result(path: Path) -> list[dict]:
    """Read one result file and check its shape. Raises ValueError naming the file and the page."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: failed to read JSON ({error})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list, got {type(data).__name__}")

    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or "class" not in entry or "confidence" not in entry:
            raise ValueError(f"{path}: page {index}: expected an object with 'class' and 'confidence', got {entry!r}")
        confidence = entry["confidence"]
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not math.isfinite(confidence):
            raise ValueError(f"{path}: page {index}: confidence must be a finite number, got {confidence!r}")
    return data


def compare(actual: list[dict], expected: list[dict], tolerance: float) -> list[str]:
    """Return one line per difference between two result lists (empty when they match)."""
    problems = []
    if len(actual) != len(expected):
        problems.append(f"{len(actual)} page(s) in the output, {len(expected)} expected")

    for index, (got, want) in enumerate(zip(actual, expected)):
        if got["class"] != want["class"]:
            problems.append(f"page {index}: class {got['class']!r}, expected {want['class']!r}")
        difference = abs(got["confidence"] - want["confidence"])
        if difference > tolerance:
            problems.append(
                f"page {index}: confidence {got['confidence']:.6f}, expected {want['confidence']:.6f} "
                f"(difference {difference:.2e} > tolerance {tolerance:.0e})"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("actual", type=Path, help="result file to check")
    parser.add_argument("expected", type=Path, help="reference result file")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed confidence difference per page")
    args = parser.parse_args(argv)

    try:
        actual = load_result(args.actual)
        expected = load_result(args.expected)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    problems = compare(actual, expected, args.tolerance)
    for problem in problems:
        print(f"mismatch: {problem}", file=sys.stderr)
    if problems:
        print(f"{args.actual} does not match {args.expected}: {len(problems)} difference(s)", file=sys.stderr)
        return 1
    print(f"{args.actual} matches {args.expected}: {len(actual)} page(s), confidences within {args.tolerance:g}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
