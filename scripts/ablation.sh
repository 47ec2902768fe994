#!/usr/bin/env bash
# Ablation of the auxiliary tasks under one reduced budget: every arm trains fold 0 of the same
# 5-fold split (same seed, same epochs), exports it, and is scored on the AMi-Br test split and on
# AtNorM-Br through model.evaluate.
#
#   EPOCHS=4 bash scripts/ablation.sh            # results in runs/ablation/<arm>/
#   .venv/bin/python scripts/report_table.py full=runs/ablation/full single-task=runs/ablation/single ...
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
EPOCHS=${EPOCHS:-4}
FOLD=${FOLD:-0}
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/ablation}
ARMS=${ARMS:-"full single mask_hv nuclei labels"}

arm_weights() {
  case "$1" in
    full)    echo "" ;;
    single)  echo "--loss.figure-mask 0 --loss.hv 0 --loss.nuclei 0 --loss.agreement 0 --loss.subtype 0" ;;
    mask_hv) echo "--loss.nuclei 0 --loss.agreement 0 --loss.subtype 0" ;;
    nuclei)  echo "--loss.figure-mask 0 --loss.hv 0 --loss.agreement 0 --loss.subtype 0" ;;
    labels)  echo "--loss.figure-mask 0 --loss.hv 0 --loss.nuclei 0" ;;
    *) echo "unknown arm '$1' (expected full, single, mask_hv, nuclei or labels)" >&2; exit 2 ;;
  esac
}

for arm in $ARMS; do
  run="$OUT/$arm"
  resume=""
  [ -f "$run/config.yaml" ] && resume="--resume"
  # shellcheck disable=SC2046  # the loss options are separate words on purpose
  "$PYTHON" -m model.train --config configs/amibr.yaml --data "amibr:$DATA/ami-br" --out "$run" \
    --epochs "$EPOCHS" --only-folds "$FOLD" --export "$run/weights" $resume $(arm_weights "$arm")
  "$PYTHON" -m model.evaluate --weights "$run/weights" --data "amibr:$DATA/ami-br" --split test --out "$run/amibr-test"
  "$PYTHON" -m model.evaluate --weights "$run/weights" --data "folders:$DATA/atnorm-br" --out "$run/atnorm-br"
done
