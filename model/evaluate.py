"""Score labelled patches through the container's predictor: metrics with bootstrap intervals, plots, errors.

    python -m model.evaluate --weights weights --data amibr:../shared/data/ami-br --split test --out reports/amibr-test
    python -m model.evaluate --weights weights --data folders:../shared/data/atnorm-br --out reports/atnorm-br

Patches pass the training audit (:func:`model.data.audit`) and are scored as uint8 RGB pages by
:class:`model.predict.Predictor`, the class ``process.py`` uses, so every number here is the container's
number. The decision rule and threshold come from the weights' manifest. ``--out`` receives:

* ``metrics.json``: balanced accuracy, AUROC, sensitivity, specificity and accuracy, each with a 95%
  percentile bootstrap interval. The interval resamples the patches with replacement ``--bootstrap``
  times from ``--seed``. The metrics are given for the ensemble, under the other decision rule (``mean``
  or ``vote``), for each fold alone at the same threshold, and for each value of each record domain. A
  metric that is undefined for a group (such as sensitivity without atypical patches) is left out. The
  audit report and the counts are included.
* ``predictions.csv``: one row per patch with label, P(atypical), class, slide, domains and per-fold P(atypical).
* ``roc.png``, ``confusion_matrix.png``, ``reliability.png``, ``p_atypical_histogram.png``.
* ``errors_montage.png``: the most confident false positives and false negatives, each outlined with the
  figure mask from the network's auxiliary decoder (the fold mean of ``sigmoid(dense_logits[:, 0])``,
  contoured at 0.5). The decoder runs only here, as an explanation, and never in the container.

Libraries: the metric intervals are computed here with numpy and scipy (vectorised over resamples)
because grand-challenge-metrics 0.6.0 bootstraps only ROC curves and ROC points, with a fixed seed of 40. Its
``get_bootstrapped_roc_ci_curves`` draws the ROC band in ``roc.png``. That function never draws the last
patch (``randint(0, n - 1)`` excludes ``n - 1``) and ignores ``--seed``, so its band and the AUROC interval
in ``metrics.json`` can differ slightly. The point metrics, the ROC curve, the confusion matrix and the
reliability curve come from scikit-learn.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from model.data import CLASS_NAMES, DataError, Record, audit, load_records
from model.io import StackError
from model.predict import RULES, Prediction, Predictor, WeightsError, decide, resolve_weights_dir
from model.views import DIHEDRAL_VIEWS

logger = logging.getLogger("model.evaluate")

METRICS = ("balanced_accuracy", "auroc", "sensitivity", "specificity", "accuracy")
CONFIDENCE_LEVEL = 0.95
RESAMPLE_CHUNK = 100  # resamples computed at once, which bounds memory to about 100 x patches x 8 bytes per array


# ---------------------------------------------------------------- metrics


def confusion_counts(labels: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    """Count true/false positives and negatives, atypical being positive."""
    labels, predicted = np.asarray(labels, bool), np.asarray(predicted, bool)
    return {
        "tp": int(np.sum(labels & predicted)),
        "fp": int(np.sum(~labels & predicted)),
        "fn": int(np.sum(labels & ~predicted)),
        "tn": int(np.sum(~labels & ~predicted)),
    }


def _ratio(numerator, denominator):
    """Divide elementwise, giving NaN where the denominator is 0."""
    numerator = np.asarray(numerator, np.float64)
    denominator = np.asarray(denominator, np.float64)
    result = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=result, where=denominator > 0)
    return result


def sensitivity(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Return the recall of the atypical class, or NaN without atypical patches."""
    counts = confusion_counts(labels, predicted)
    return float(_ratio(counts["tp"], counts["tp"] + counts["fn"]))


def specificity(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Return the recall of the normal class, or NaN without normal patches."""
    counts = confusion_counts(labels, predicted)
    return float(_ratio(counts["tn"], counts["tn"] + counts["fp"]))


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Return the mean of sensitivity and specificity, or NaN unless both classes are present."""
    return (sensitivity(labels, predicted) + specificity(labels, predicted)) / 2


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Return the fraction of patches classified correctly, or NaN for no patches."""
    counts = confusion_counts(labels, predicted)
    return float(_ratio(counts["tp"] + counts["tn"], sum(counts.values())))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the area under the ROC curve of ``scores`` (scikit-learn), or NaN unless both classes are present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def point_metrics(labels: np.ndarray, scores: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Compute every metric in :data:`METRICS` on one set of patches, NaN where undefined."""
    return {
        "balanced_accuracy": balanced_accuracy(labels, predicted),
        "auroc": auroc(labels, scores),
        "sensitivity": sensitivity(labels, predicted),
        "specificity": specificity(labels, predicted),
        "accuracy": accuracy(labels, predicted),
    }


def resampled_metrics(
    labels: np.ndarray, scores: np.ndarray, predicted: np.ndarray, resamples: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Compute every metric on ``resamples`` bootstrap resamples of the patches, as ``(resamples,)`` per metric.

    A resample with one class only gives NaN for the metrics that need both. AUROC is the Mann-Whitney
    statistic on average ranks, which equals scikit-learn's ``roc_auc_score`` including ties.
    """
    from scipy.stats import rankdata

    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)
    predicted = np.asarray(predicted, bool)
    count = len(labels)
    rng = np.random.default_rng(seed)
    values = {name: [] for name in METRICS}

    for start in range(0, resamples, RESAMPLE_CHUNK):
        indices = rng.integers(0, count, size=(min(RESAMPLE_CHUNK, resamples - start), count))
        truth, decision = labels[indices], predicted[indices]  # (R, N)
        tp = np.sum(truth & decision, axis=1)
        fn = np.sum(truth & ~decision, axis=1)
        tn = np.sum(~truth & ~decision, axis=1)
        sens = _ratio(tp, tp + fn)
        spec = _ratio(tn, count - tp - fn)

        positives = truth.sum(axis=1)
        negatives = count - positives
        ranks = rankdata(scores[indices], axis=1)
        rank_sum = np.sum(ranks * truth, axis=1)
        area = _ratio(rank_sum - positives * (positives + 1) / 2, positives * negatives)

        values["balanced_accuracy"].append((sens + spec) / 2)
        values["auroc"].append(area)
        values["sensitivity"].append(sens)
        values["specificity"].append(spec)
        values["accuracy"].append((tp + tn) / count)
    return {name: np.concatenate(parts) if parts else np.empty(0) for name, parts in values.items()}


def percentile_interval(values: np.ndarray, level: float = CONFIDENCE_LEVEL) -> tuple[float, float] | None:
    """Return the central ``level`` percentile interval of the finite ``values``, or None if there are none."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def summarize(labels: np.ndarray, scores: np.ndarray, predicted: np.ndarray, resamples: int, seed: int) -> dict:
    """Return counts and every defined metric with its bootstrap interval, ready for JSON."""
    labels = np.asarray(labels, bool)
    counts = {"patches": int(len(labels)), "atypical": int(labels.sum()), "normal": int((~labels).sum())}
    counts.update(confusion_counts(labels, predicted))
    points = point_metrics(labels, scores, predicted)
    samples = resampled_metrics(labels, scores, predicted, resamples, seed) if resamples > 0 and len(labels) else {}

    metrics = {}
    for name in METRICS:
        if not np.isfinite(points[name]):
            continue
        entry = {"value": points[name]}
        if name in samples:
            interval = percentile_interval(samples[name])
            if interval is not None:
                entry["ci95"] = list(interval)
            defined = int(np.isfinite(samples[name]).sum())
            if defined < resamples:
                entry["resamples_defined"] = defined  # the rest had one class only
        metrics[name] = entry
    return {"counts": counts, "metrics": metrics}


def domain_values(records: list[Record]) -> dict[str, list[str]]:
    """Return each domain key with its value per record (``"unknown"`` where a record lacks the key)."""
    keys = sorted({key for record in records for key in record.domains})
    return {key: [record.domains.get(key, "unknown") for record in records] for key in keys}


def evaluate(
    labels: np.ndarray,
    prediction: Prediction,
    threshold: float,
    rule: str,
    domains: dict[str, list[str]],
    fold_names: list[str],
    resamples: int,
    seed: int,
) -> dict:
    """Summarise the ensemble, the other decision rule, each fold alone and each domain value."""
    labels = np.asarray(labels, bool)
    p_atypical, atypical = prediction.p_atypical, prediction.atypical
    other_rule = next(r for r in RULES if r != rule)

    report = {"ensemble": summarize(labels, p_atypical, atypical, resamples, seed)}
    other = decide(prediction.fold_probabilities, threshold, other_rule)
    report["other_rule"] = {"rule": other_rule, **summarize(labels, p_atypical, other, resamples, seed)}
    report["folds"] = [
        {"fold": name, **summarize(labels, probabilities, probabilities >= threshold, resamples, seed)}
        for name, probabilities in zip(fold_names, prediction.fold_probabilities)
    ]

    report["domains"] = {}
    for key, values in domains.items():
        values = np.asarray(values)
        report["domains"][key] = {}
        for value in sorted(set(values)):
            mask = values == value
            report["domains"][key][value] = summarize(labels[mask], p_atypical[mask], atypical[mask], resamples, seed)
    return report


# ---------------------------------------------------------------- prediction and figure masks


def predict_pages(predictor: Predictor, pages: list[np.ndarray], batch_size: int = 64) -> Prediction:
    """Score ``pages`` with ``predictor.predict`` in batches, with a progress bar."""
    from tqdm import tqdm

    parts = [predictor.predict(pages[start : start + batch_size])
             for start in tqdm(range(0, len(pages), batch_size), desc="predict", unit="batch")]
    return Prediction(
        p_atypical=np.concatenate([part.p_atypical for part in parts]),
        fold_probabilities=np.concatenate([part.fold_probabilities for part in parts], axis=1),
        atypical=np.concatenate([part.atypical for part in parts]),
    )


def figure_masks(predictor: Predictor, pages: list[np.ndarray]) -> np.ndarray:
    """Return the fold-mean figure-mask probability ``(N, S, S)`` of the fitted pages (identity view)."""
    import torch

    if not pages:
        size = predictor.net_config.input_size
        return np.zeros((0, size, size), np.float32)
    images = predictor.prepare(pages).to(predictor.dtype)
    with torch.inference_mode():
        masks = [torch.sigmoid(net(images)["dense_logits"][:, 0].float()) for net in predictor.nets]
    return torch.stack(masks).mean(dim=0).cpu().numpy()


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(path: Path, labels: np.ndarray, prediction: Prediction, summary: dict, resamples: int) -> None:
    """Plot the ensemble ROC curve with a bootstrap band, each fold's curve and the operating point."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    labels = np.asarray(labels, bool)
    figure, axes = plt.subplots(figsize=(5.5, 5.5))
    both_classes = labels.any() and not labels.all()

    # The library never draws the last patch, so the band needs both classes among the others.
    if both_classes and resamples > 0 and labels[:-1].any() and not labels[:-1].all():
        from grand_challenge_metrics.roc import get_bootstrapped_roc_ci_curves

        band = get_bootstrapped_roc_ci_curves(prediction.p_atypical, labels.astype(int), num_bootstraps=resamples)
        axes.fill_between(band.fpr_vals, band.low_tpr_vals, band.high_tpr_vals, color="tab:blue", alpha=0.2,
                          label="95% bootstrap band")
    if both_classes:
        for index, probabilities in enumerate(prediction.fold_probabilities):
            fpr, tpr, _ = roc_curve(labels, probabilities)
            axes.plot(fpr, tpr, color="grey", linewidth=0.7, alpha=0.7, label="single folds" if index == 0 else None)
        fpr, tpr, _ = roc_curve(labels, prediction.p_atypical)
        auc = summary["metrics"]["auroc"]
        interval = auc.get("ci95")
        text = f"ensemble, AUROC {auc['value']:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
        axes.plot(fpr, tpr, color="tab:blue", linewidth=2, label=text)

        sens, spec = summary["metrics"]["sensitivity"]["value"], summary["metrics"]["specificity"]["value"]
        axes.plot(1 - spec, sens, "o", color="tab:red", label=f"decision: sensitivity {sens:.2f}, specificity {spec:.2f}")
    else:
        axes.text(0.5, 0.5, "ROC undefined: one class only", ha="center")

    axes.plot([0, 1], [0, 1], linestyle=":", color="black", linewidth=0.8)
    axes.set(xlabel="1 - specificity (normal called atypical)", ylabel="sensitivity (atypical found)",
             xlim=(0, 1), ylim=(0, 1.01), title="ROC, atypical as positive")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_confusion(path: Path, labels: np.ndarray, predicted: np.ndarray, rule: str, threshold: float) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay.from_predictions(
        np.asarray(labels, int), np.asarray(predicted, int), labels=[0, 1], display_labels=list(CLASS_NAMES),
        ax=axes, colorbar=False, cmap="Blues",
    )
    axes.set_title(f"rule {rule}, threshold {threshold:.3f}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_reliability(path: Path, labels: np.ndarray, p_atypical: np.ndarray, bins: int = 10) -> None:
    """Plot the observed atypical fraction per P(atypical) bin above the number of patches per bin."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    plt = _pyplot()
    figure, (curve, counts) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    labels = np.asarray(labels, int)
    curve.plot([0, 1], [0, 1], linestyle=":", color="black", linewidth=0.8, label="perfect calibration")
    if len(labels):
        observed, mean_predicted = calibration_curve(labels, p_atypical, n_bins=bins, strategy="uniform")
        brier = brier_score_loss(labels, p_atypical, labels=[0, 1])
        curve.plot(mean_predicted, observed, "o-", color="tab:blue", label=f"ensemble (Brier score {brier:.3f})")
    curve.set(ylabel="fraction atypical", ylim=(0, 1), title="reliability")
    curve.legend(loc="upper left", fontsize=8)
    counts.hist(p_atypical, bins=np.linspace(0, 1, bins + 1), color="tab:blue")
    counts.set(xlabel="P(atypical)", ylabel="patches", xlim=(0, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_histograms(path: Path, labels: np.ndarray, p_atypical: np.ndarray, threshold: float) -> None:
    """Plot P(atypical) per true class, one panel each, with the decision threshold."""
    plt = _pyplot()
    labels = np.asarray(labels, bool)
    figure, panels = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    for panel, label, colour in zip(panels, (False, True), ("tab:green", "tab:red")):
        values = p_atypical[labels == label]
        panel.hist(values, bins=np.linspace(0, 1, 41), color=colour)
        panel.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
        panel.set(ylabel="patches", title=f"true {CLASS_NAMES[int(label)]} ({len(values)} patches)")
        panel.legend(fontsize=8)
    panels[-1].set(xlabel="P(atypical)", xlim=(0, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def confident_errors(labels: np.ndarray, prediction: Prediction, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the indices of up to ``count`` false positives (highest P first) and false negatives (lowest first)."""
    labels = np.asarray(labels, bool)
    p_atypical = prediction.p_atypical
    false_positives = np.flatnonzero(~labels & prediction.atypical)
    false_negatives = np.flatnonzero(labels & ~prediction.atypical)
    false_positives = false_positives[np.argsort(-p_atypical[false_positives], kind="stable")][:count]
    false_negatives = false_negatives[np.argsort(p_atypical[false_negatives], kind="stable")][:count]
    return false_positives, false_negatives


def plot_error_montage(
    path: Path, names: list[str], pages: list[np.ndarray], masks: np.ndarray, p_atypical: np.ndarray,
    groups: list[tuple[str, np.ndarray]], columns: int = 6,
) -> None:
    """Draw each group of patches (fitted pages) in a grid, with the figure-mask contour and P(atypical).

    ``pages`` and ``masks`` are indexed like the concatenated group indices.
    """
    plt = _pyplot()
    rows_per_group = [max(1, -(-len(indices) // columns)) for _, indices in groups]
    heights = [rows if len(indices) else 0.3 for rows, (_, indices) in zip(rows_per_group, groups)]
    figure = plt.figure(figsize=(1.9 * columns, 2.2 * sum(heights) + 0.6 * len(groups)))
    subfigures = np.atleast_1d(figure.subfigures(len(groups), 1, height_ratios=heights))

    position = 0
    for subfigure, (title, indices), rows in zip(subfigures, groups, rows_per_group):
        subfigure.suptitle(title, fontsize=11)
        if len(indices) == 0:
            continue
        axes = np.atleast_1d(subfigure.subplots(rows, columns)).ravel()
        for axis in axes:
            axis.axis("off")
        for axis, index in zip(axes, indices):
            axis.imshow(pages[position])
            mask = masks[position]
            if mask.max() > 0.5 > mask.min():
                axis.contour(mask, levels=[0.5], colors=["#00ff66"], linewidths=1.2)
            axis.set_title(f"{Path(names[index]).name[-24:]}\nP(atypical) {p_atypical[index]:.3f}", fontsize=7)
            position += 1
    figure.text(0.01, 0.003, "green contour: figure mask from the decoder (fold-mean probability 0.5)", fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------- outputs


def write_predictions(path: Path, records: list[Record], prediction: Prediction, fold_names: list[str]) -> None:
    domains = domain_values(records)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patch", "label", "p_atypical", "class", "slide", *domains,
                         *(f"p_atypical_{name}" for name in fold_names)])
        for index, (record, name) in enumerate(zip(records, prediction.classes)):
            writer.writerow([
                record.name, CLASS_NAMES[record.label], f"{prediction.p_atypical[index]:.6f}", name, record.slide,
                *(values[index] for values in domains.values()),
                *(f"{p:.6f}" for p in prediction.fold_probabilities[:, index]),
            ])


def write_plots(out: Path, records, images, predictor: Predictor, prediction: Prediction, report: dict, args) -> None:
    labels = np.array([r.label for r in records], bool)
    plot_roc(out / "roc.png", labels, prediction, report["ensemble"], args.bootstrap)
    plot_confusion(out / "confusion_matrix.png", labels, prediction.atypical, predictor.rule, predictor.threshold)
    plot_reliability(out / "reliability.png", labels, prediction.p_atypical)
    plot_histograms(out / "p_atypical_histogram.png", labels, prediction.p_atypical, predictor.threshold)

    false_positives, false_negatives = confident_errors(labels, prediction, args.montage)
    chosen = np.concatenate([false_positives, false_negatives]).astype(int)
    size = predictor.net_config.input_size
    from model.io import fit_page

    pages = [fit_page(images[records[i].name], size) for i in chosen]
    counts = report["ensemble"]["counts"]
    groups = []
    for title, indices, total in (("normal called atypical (false positives)", false_positives, counts["fp"]),
                                  ("atypical called normal (false negatives)", false_negatives, counts["fn"])):
        selection = f"the {len(indices)} most confident of {total}" if total else "none"
        groups.append((f"{title}: {selection}", indices))
    plot_error_montage(out / "errors_montage.png", [r.name for r in records], pages, figure_masks(predictor, pages),
                       prediction.p_atypical, groups)


# ---------------------------------------------------------------- command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults in ``--help``, except for options whose default is None."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model.evaluate",
        description="Score labelled patches with the fold ensemble; write metrics with bootstrap intervals and plots.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder with manifest.json and fold files (default: as process.py, /opt/ml/model or weights/)")
    parser.add_argument("--data", required=True, help="amibr:DIR, folders:DIR or midog25:CSV:IMAGES")
    parser.add_argument("--split", default="all", help="for amibr: train, test or all")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json, predictions.csv and plots")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the network")
    parser.add_argument("--views", nargs="+", choices=list(DIHEDRAL_VIEWS), default=None, metavar="VIEW",
                        help=f"test-time augmentation views from {', '.join(DIHEDRAL_VIEWS)} (default: the manifest's)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per interval (0: no intervals)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="pages per predictor call (memory grows with pages x views)")
    parser.add_argument("--montage", type=int, default=12, help="false positives and false negatives shown, each")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    if args.bootstrap < 0 or args.batch_size < 1 or args.montage < 0:
        raise ValueError(f"invalid --bootstrap {args.bootstrap}, --batch-size {args.batch_size} or --montage "
                         f"{args.montage}: expected >= 0, >= 1 and >= 0")
    records = load_records(args.data, args.split)
    weights_dir, reason = resolve_weights_dir(args.weights)
    predictor = Predictor(weights_dir, device=args.device, views=args.views)
    fold_names = [Path(entry["file"]).stem for entry in predictor.manifest["folds"]]
    logger.info("loaded %d fold(s) from %s (%s) on %s; views %s, rule %s, threshold %.4f", len(predictor.nets),
                weights_dir, reason, predictor.device, ",".join(predictor.views), predictor.rule, predictor.threshold)

    records, images, audit_report = audit(records, predictor.net_config.input_size)
    if not records:
        raise DataError(f"{args.data}: no readable patches left after the audit")
    labels = np.array([r.label for r in records], bool)
    if labels.all() or not labels.any():
        logger.warning("only %s patches: AUROC, balanced accuracy and one of sensitivity/specificity are undefined",
                       CLASS_NAMES[int(labels[0])])

    prediction = predict_pages(predictor, [images[r.name] for r in records], args.batch_size)
    report = evaluate(labels, prediction, predictor.threshold, predictor.rule, domain_values(records), fold_names,
                      args.bootstrap, args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "data": args.data, "split": args.split, "weights": str(weights_dir), "device": str(predictor.device),
        "views": predictor.views, "rule": predictor.rule, "threshold": predictor.threshold,
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "level": CONFIDENCE_LEVEL,
                      "method": "percentile interval, patches resampled with replacement"},
        "audit": dataclasses.asdict(audit_report),
        **report,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    write_predictions(args.out / "predictions.csv", records, prediction, fold_names)
    write_plots(args.out, records, images, predictor, prediction, report, args)
    logger.info("evaluated %d patches in %.1f s", len(records), time.perf_counter() - started)
    return metrics


def format_summary(metrics: dict) -> str:
    """Return a short table of the ensemble metrics, the other rule and the single folds."""
    rows = [("ensemble", f"{metrics['rule']} >= {metrics['threshold']:.3f}", metrics["ensemble"])]
    rows.append(("ensemble", f"{metrics['other_rule']['rule']} >= {metrics['threshold']:.3f}", metrics["other_rule"]))
    rows.extend((fold["fold"], f"alone >= {metrics['threshold']:.3f}", fold) for fold in metrics["folds"])

    lines = [f"{metrics['ensemble']['counts']['patches']} patches ({metrics['ensemble']['counts']['atypical']} atypical) "
             f"from {metrics['data']}"]
    for name, decision, summary in rows:
        cells = []
        for metric in ("balanced_accuracy", "auroc", "sensitivity", "specificity"):
            entry = summary["metrics"].get(metric)
            if entry is None:
                cells.append(f"{metric} -")
                continue
            interval = entry.get("ci95")
            cells.append(f"{metric} {entry['value']:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""))
        lines.append(f"{name:>10}  {decision:<16}" + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / "matplotlib"))
    try:
        metrics = run(args)
    except (DataError, WeightsError, StackError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return 1

    print(format_summary(metrics))
    print(f"wrote metrics.json, predictions.csv and plots to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
