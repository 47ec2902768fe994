"""Tests for model.evaluate: metrics against hand-computed values, bootstrap intervals, the CLI end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import DATA, require_data
from model import evaluate
from model.evaluate import (
    accuracy,
    auroc,
    balanced_accuracy,
    confident_errors,
    confusion_counts,
    percentile_interval,
    resampled_metrics,
    sensitivity,
    specificity,
    summarize,
)
from model.predict import Prediction, Predictor, decide

# 3 atypical (1) and 5 normal (0): TP 2, FN 1, TN 3, FP 2.
LABELS = np.array([1, 1, 1, 0, 0, 0, 0, 0])
PREDICTED = np.array([1, 1, 0, 0, 0, 0, 1, 1])


def test_confusion_counts_by_hand():
    assert confusion_counts(LABELS, PREDICTED) == {"tp": 2, "fp": 2, "fn": 1, "tn": 3}


def test_sensitivity_by_hand():
    assert sensitivity(LABELS, PREDICTED) == pytest.approx(2 / 3)


def test_specificity_by_hand():
    assert specificity(LABELS, PREDICTED) == pytest.approx(3 / 5)


def test_balanced_accuracy_by_hand():
    assert balanced_accuracy(LABELS, PREDICTED) == pytest.approx((2 / 3 + 3 / 5) / 2)


def test_accuracy_by_hand():
    assert accuracy(LABELS, PREDICTED) == pytest.approx(5 / 8)


def test_auroc_by_hand():
    # Positive 0.35 beats one of two negatives, positive 0.8 beats both: 3 of 4 pairs.
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


def test_auroc_counts_ties_as_half():
    # Positive 0.5 ties one negative (1/2) and beats the other; positive 0.9 beats both: 3.5 of 4.
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.5, 0.2, 0.5, 0.9])) == pytest.approx(0.875)


def test_metrics_undefined_for_one_class():
    normal_only = np.zeros(4, int)
    predicted = np.array([0, 1, 0, 0])
    assert math.isnan(sensitivity(normal_only, predicted))
    assert math.isnan(balanced_accuracy(normal_only, predicted))
    assert math.isnan(auroc(normal_only, np.linspace(0, 1, 4)))
    assert specificity(normal_only, predicted) == pytest.approx(3 / 4)


def test_resampled_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.random(60) < 0.3
    scores = np.round(rng.random(60), 1)  # rounded, so there are ties
    resamples = resampled_metrics(labels, scores, scores >= 0.5, resamples=20, seed=3)

    indices = np.random.default_rng(3).integers(0, 60, size=(20, 60))
    expected = [roc_auc_score(labels[i], scores[i]) for i in indices]
    np.testing.assert_allclose(resamples["auroc"], expected)


def test_resampled_metrics_match_point_functions():
    rng = np.random.default_rng(2)
    labels = rng.random(40) < 0.4
    predicted = rng.random(40) < 0.5
    resamples = resampled_metrics(labels, rng.random(40), predicted, resamples=5, seed=0)

    indices = np.random.default_rng(0).integers(0, 40, size=(5, 40))
    for name, function in (("balanced_accuracy", balanced_accuracy), ("sensitivity", sensitivity),
                           ("specificity", specificity), ("accuracy", accuracy)):
        expected = [function(labels[i], predicted[i]) for i in indices]
        np.testing.assert_allclose(resamples[name], expected, err_msg=name)


def test_percentile_interval_by_hand():
    assert percentile_interval(np.arange(101.0), level=0.9) == pytest.approx((5.0, 95.0))


def test_percentile_interval_ignores_nan():
    assert percentile_interval(np.array([np.nan, 2.0, 2.0])) == (2.0, 2.0)


def test_percentile_interval_none_when_undefined():
    assert percentile_interval(np.array([np.nan, np.nan])) is None


@pytest.fixture(scope="module")
def random_scores():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.3
    scores = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    return labels, scores, scores >= 0.5


def test_intervals_contain_point_estimate(random_scores):
    summary = summarize(*random_scores, resamples=500, seed=0)
    for name, entry in summary["metrics"].items():
        low, high = entry["ci95"]
        assert low <= entry["value"] <= high, name


def test_intervals_repeat_with_seed(random_scores):
    first = summarize(*random_scores, resamples=200, seed=5)
    second = summarize(*random_scores, resamples=200, seed=5)
    assert first == second


def test_intervals_change_with_seed(random_scores):
    first = summarize(*random_scores, resamples=200, seed=5)
    second = summarize(*random_scores, resamples=200, seed=6)
    assert first["metrics"]["auroc"]["ci95"] != second["metrics"]["auroc"]["ci95"]


def test_summary_of_one_class_omits_undefined():
    summary = summarize(np.zeros(6, bool), np.linspace(0, 1, 6), np.linspace(0, 1, 6) >= 0.5, resamples=50, seed=0)
    assert set(summary["metrics"]) == {"specificity", "accuracy"}
    assert summary["counts"] == {"patches": 6, "atypical": 0, "normal": 6, "tp": 0, "fp": 3, "fn": 0, "tn": 3}


def test_summary_without_bootstrap_has_no_interval(random_scores):
    summary = summarize(*random_scores, resamples=0, seed=0)
    assert all("ci95" not in entry for entry in summary["metrics"].values())


def make_prediction(fold_probabilities, threshold=0.5, rule="mean") -> Prediction:
    fold_probabilities = np.asarray(fold_probabilities, np.float64)
    return Prediction(fold_probabilities.mean(axis=0), fold_probabilities, decide(fold_probabilities, threshold, rule))


def test_evaluate_other_rule_and_folds():
    # Page 2: fold means 0.8 and 0.3 give a mean of 0.55 (atypical) but only one of two folds votes for it.
    prediction = make_prediction([[0.9, 0.1, 0.8, 0.2], [0.7, 0.2, 0.3, 0.1]])
    labels = np.array([1, 0, 0, 0], bool)
    report = evaluate.evaluate(labels, prediction, 0.5, "mean", {}, ["fold0", "fold1"], resamples=0, seed=0)
    assert report["ensemble"]["counts"]["fp"] == 1
    assert report["other_rule"]["rule"] == "vote"
    assert report["other_rule"]["counts"]["fp"] == 0
    assert [fold["counts"]["fp"] for fold in report["folds"]] == [1, 0]


def test_evaluate_splits_domains():
    prediction = make_prediction([[0.9, 0.1, 0.8, 0.2]])
    labels = np.array([1, 0, 1, 0], bool)
    report = evaluate.evaluate(labels, prediction, 0.5, "mean", {"scanner": ["a", "a", "b", "b"]}, ["fold0"], 0, 0)
    assert set(report["domains"]["scanner"]) == {"a", "b"}
    assert report["domains"]["scanner"]["b"]["counts"]["patches"] == 2


def test_confident_errors_order():
    prediction = make_prediction([[0.9, 0.6, 0.8, 0.1, 0.3, 0.4]])
    labels = np.array([0, 0, 0, 1, 1, 1], bool)
    false_positives, false_negatives = confident_errors(labels, prediction, count=2)
    assert false_positives.tolist() == [0, 2]
    assert false_negatives.tolist() == [3, 4]


# ---------------------------------------------------------------- command line


def write_patches(root: Path, atypical: int = 4, normal: int = 6, seed: int = 0) -> Path:
    """Write random 128x128 RGB PNG patches in the folders: layout, one odd-sized patch among them."""
    rng = np.random.default_rng(seed)
    for folder, count in (("Atypical", atypical), ("Normal", normal)):
        (root / folder).mkdir(parents=True)
        for index in range(count):
            size = (120, 136) if folder == "Normal" and index == 0 else (128, 128)
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{folder.lower()}_{index}.png")
    return root


OUTPUT_FILES = ("metrics.json", "predictions.csv", "roc.png", "confusion_matrix.png", "reliability.png",
                "p_atypical_histogram.png", "errors_montage.png")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("evaluate")
    data = write_patches(root / "data")
    code = evaluate.main(["--weights", str(tiny_weights), "--data", f"folders:{data}", "--out", str(root / "out"),
                          "--device", "cpu", "--bootstrap", "50", "--batch-size", "4"])
    return code, data, root / "out"


def test_cli_exit_code(evaluated):
    assert evaluated[0] == 0


@pytest.mark.parametrize("name", OUTPUT_FILES)
def test_cli_writes_file(evaluated, name):
    assert (evaluated[2] / name).stat().st_size > 0


def test_cli_metrics_content(evaluated):
    metrics = json.loads((evaluated[2] / "metrics.json").read_text())
    assert metrics["ensemble"]["counts"]["patches"] == 10
    assert metrics["audit"]["refitted"][0].startswith("Normal/normal_0.png")
    assert [fold["fold"] for fold in metrics["folds"]] == ["fold0", "fold1"]
    assert metrics["other_rule"]["rule"] == "vote"
    assert set(metrics["domains"]["dataset"]) == {"data"}


def test_cli_matches_predictor(evaluated, tiny_weights):
    """The CSV contains the numbers the container's predictor gives for the same audited pages."""
    from model.data import audit, load_records

    with (evaluated[2] / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    records, images, _ = audit(load_records(f"folders:{evaluated[1]}"))
    expected = Predictor(tiny_weights, device="cpu").predict([images[r.name] for r in records])

    assert [row["patch"] for row in rows] == [r.name for r in records]
    np.testing.assert_allclose([float(row["p_atypical"]) for row in rows], expected.p_atypical, atol=1e-5)
    assert [row["class"] for row in rows] == expected.classes
    np.testing.assert_allclose([float(row["p_atypical_fold1"]) for row in rows], expected.fold_probabilities[1], atol=1e-5)


def test_cli_missing_weights(tmp_path, capsys):
    data = write_patches(tmp_path / "data", 1, 1)
    code = evaluate.main(["--weights", str(tmp_path / "none"), "--data", f"folders:{data}", "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert error[-1].startswith("error: ")
    assert "manifest not found" in error[-1]


def test_cli_bad_spec(tmp_path, capsys, tiny_weights):
    code = evaluate.main(["--weights", str(tiny_weights), "--data", "nosuch:x", "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert error == ["error: invalid data spec 'nosuch:x': expected amibr:DIR, folders:DIR or midog25:CSV:IMAGES"]


def test_cli_missing_data_folder(tmp_path, capsys, tiny_weights):
    code = evaluate.main(["--weights", str(tiny_weights), "--data", f"folders:{tmp_path / 'none'}", "--out", str(tmp_path / "o")])
    assert code == 1
    assert "data folder not found" in capsys.readouterr().err


def test_real_patches_score(tmp_path, tiny_weights):
    """A few real AtNorM-Br patches of each class run through the whole command."""
    source = require_data(DATA / "atnorm-br")
    data = tmp_path / "data"
    for folder in ("Atypical", "Normal"):
        (data / folder).mkdir(parents=True)
        for path in sorted((source / folder).glob("*.png"))[:3]:
            (data / folder / path.name).symlink_to(path)
    code = evaluate.main(["--weights", str(tiny_weights), "--data", f"folders:{data}", "--out", str(tmp_path / "out"),
                          "--device", "cpu", "--bootstrap", "20"])
    assert code == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["ensemble"]["counts"]["patches"] == 6
