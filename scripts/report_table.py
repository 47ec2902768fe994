"""Print a markdown table of balanced accuracy and AUROC, with 95% CIs, from model.evaluate outputs.

    python scripts/report_table.py "full=runs/ablation/full" "single-task=runs/ablation/single"

Each argument is LABEL=RUN, where RUN contains ``amibr-test/metrics.json`` and ``atnorm-br/metrics.json``
(written by ``scripts/ablation.sh`` or by hand with ``python -m model.evaluate``) and, when present,
``oof.json`` from training. ``--variants`` adds rows for the other decision rule and each single fold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SETS = ("amibr-test", "atnorm-br")


def cell(block: dict | None, metric: str) -> str:
    if block is None or metric not in block["metrics"]:
        return "-"
    entry = block["metrics"][metric]
    low, high = entry["ci95"]
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def oof_cell(run: Path) -> str:
    path = run / "oof.json"
    if not path.is_file():
        return "-"
    metrics = json.loads(path.read_text())["metrics"]["at_threshold"]
    return f"{metrics['balanced_accuracy']:.3f} / {metrics['auroc']:.3f}"


def rows_for(label: str, run: Path, variants: bool) -> list[str]:
    reports = {name: json.loads((run / name / "metrics.json").read_text()) for name in SETS}
    blocks = {label: ({name: reports[name]["ensemble"] for name in SETS}, oof_cell(run))}
    if variants:
        other = reports[SETS[0]]["other_rule"]["rule"]
        blocks[f"{label}, {other} rule"] = ({name: reports[name]["other_rule"] for name in SETS}, "-")
        for index, fold in enumerate(reports[SETS[0]]["folds"]):
            blocks[f"{label}, {fold['fold']} alone"] = ({name: reports[name]["folds"][index] for name in SETS}, "-")
    lines = []
    for name, (by_set, oof) in blocks.items():
        cells = [cell(by_set[s], metric) for s in SETS for metric in ("balanced_accuracy", "auroc")]
        lines.append(f"| {name} | {oof} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN folder")
    parser.add_argument("--variants", action="store_true", help="add the other rule and single folds")
    args = parser.parse_args()

    print("| model | out-of-fold BA / AUROC | AMi-Br test BA | AMi-Br test AUROC | AtNorM-Br BA | AtNorM-Br AUROC |")
    print("| --- | --- | --- | --- | --- | --- |")
    for item in args.runs:
        label, _, run = item.partition("=")
        for line in rows_for(label, Path(run), args.variants):
            print(line)


if __name__ == "__main__":
    main()
