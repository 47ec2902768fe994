"""Training: the loss goes down, a run exports loadable weights, --resume continues at the right epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import model.train as train
from conftest import write_folders_dataset
from model.data import PatchDataset, audit, compute_targets, load_records
from model.losses import LossWeights, multitask_loss
from model.network import MultiTaskNet, NetConfig
from model.predict import Predictor
from model.targets import TargetConfig


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return write_folders_dataset(tmp_path_factory.mktemp("data") / "set", per_class=6)


def tiny_config(tmp_path, root, **overrides) -> train.TrainConfig:
    values = {"data": f"folders:{root}", "out": str(tmp_path / "run"), "folds": 2, "epochs": 2, "batch_size": 4,
              "max_steps": 1, "imagenet": False, "cache_dir": str(tmp_path / "cache"), "val_views": ["identity"],
              "views": ["identity", "hflip"]}
    values.update(overrides)
    return train.config_from_dict(values)


def test_two_steps_lower_loss(dataset_root):
    torch.manual_seed(0)
    records, images, _ = audit(load_records(f"folders:{dataset_root}"))
    targets = compute_targets([r.name for r in records], images, TargetConfig())
    batch = torch.utils.data.default_collate([PatchDataset(records, images, targets)[i] for i in range(8)])
    net = MultiTaskNet(NetConfig(dropout=0.0)).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)

    losses = []
    for _ in range(3):
        loss, _ = multitask_loss(net(batch["image"]), batch, LossWeights())
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[2] < losses[0]


def test_zero_weights_leave_classification_only(dataset_root):
    records, images, _ = audit(load_records(f"folders:{dataset_root}"))
    batch = torch.utils.data.default_collate([PatchDataset(records, images, None)[i] for i in range(2)])
    weights = LossWeights(figure_mask=0, hv=0, nuclei=0, agreement=0, subtype=0)
    with torch.no_grad():
        _, terms = multitask_loss(MultiTaskNet(NetConfig()).eval()(batch["image"]), batch, weights)
    assert set(terms) == {"classification"}


def test_run_exports_loadable_weights(tmp_path, dataset_root):
    config = tiny_config(tmp_path, dataset_root, export=str(tmp_path / "weights"))
    result = train.run(config)
    manifest = json.loads((tmp_path / "weights" / "manifest.json").read_text())
    assert len(manifest["folds"]) == 2
    assert manifest["views"] == ["identity", "hflip"]
    assert 0.0 <= manifest["threshold"] <= 1.0
    assert result["oof"]["metrics"]["patches"] == 12
    prediction = Predictor(tmp_path / "weights").predict([np.zeros((128, 128, 3), np.uint8)])
    assert prediction.fold_probabilities.shape == (2, 1)


def test_only_folds_exports_subset(tmp_path, dataset_root):
    config = tiny_config(tmp_path, dataset_root, only_folds=[1], export=str(tmp_path / "weights"))
    train.run(config)
    manifest = json.loads((tmp_path / "weights" / "manifest.json").read_text())
    assert [entry["file"] for entry in manifest["folds"]] == ["fold1.safetensors"]


def test_resume_continues_after_last_epoch(tmp_path, dataset_root, monkeypatch):
    config = tiny_config(tmp_path, dataset_root, folds=2, only_folds=[0], epochs=3)
    original = train.predict_probabilities
    calls = {"count": 0}

    def interrupt_in_second_epoch(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "predict_probabilities", interrupt_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.run(config)
    monkeypatch.setattr(train, "predict_probabilities", original)

    resumed = train.config_from_dict({**train.dataclasses.asdict(config), "resume": True})
    train.run(resumed)
    log = [json.loads(line) for line in (tmp_path / "run" / "fold0" / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1, 2]


def test_existing_run_needs_resume(tmp_path, dataset_root):
    config = tiny_config(tmp_path, dataset_root, only_folds=[0], epochs=1)
    train.run(config)
    with pytest.raises(SystemExit, match="--resume"):
        train.run(config)


def test_cli_yaml_and_override(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("epochs: 7\nloss:\n  hv: 0.0\n")
    config = train.parse_args(["--config", str(settings), "--epochs", "3", "--loss.nuclei", "0.25"])
    assert config.epochs == 3
    assert config.loss.hv == 0.0
    assert config.loss.nuclei == 0.25


def test_cli_rejects_unknown_setting(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("epoch: 7\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(settings)])


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "(default: 42)" in capsys.readouterr().out


def test_best_threshold_separates():
    labels = np.array([0, 0, 0, 1, 1])
    probabilities = np.array([0.1, 0.2, 0.3, 0.35, 0.9])
    threshold = train.best_threshold(labels, probabilities)
    assert 0.3 < threshold <= 0.35


def test_focal_loss_downweights_easy_patches():
    batch = {"label": torch.tensor([1.0, 0.0]), "target_fallback": torch.tensor([False, False]),
             "agreement": torch.tensor([float("nan")] * 2), "subtype": torch.tensor([-1, -1])}
    outputs = {"logits": torch.tensor([4.0, -4.0]), "dense_logits": torch.zeros(2, 4, 8, 8),
               "agreement_logits": torch.zeros(2), "subtype_logits": torch.zeros(2, 1)}
    off = {"figure_mask": 0, "hv": 0, "nuclei": 0, "agreement": 0, "subtype": 0}
    bce, _ = multitask_loss(outputs, batch, LossWeights(**off))
    focal, _ = multitask_loss(outputs, batch, LossWeights(classification="focal", **off))
    assert focal < bce * 0.01


def test_unknown_classification_loss_rejected():
    batch = {"label": torch.tensor([1.0]), "target_fallback": torch.tensor([False]),
             "agreement": torch.tensor([float("nan")]), "subtype": torch.tensor([-1])}
    outputs = {"logits": torch.tensor([0.0]), "dense_logits": torch.zeros(1, 4, 8, 8),
               "agreement_logits": torch.zeros(1), "subtype_logits": torch.zeros(1, 1)}
    with pytest.raises(ValueError, match="invalid classification loss"):
        multitask_loss(outputs, batch, LossWeights(classification="hinge"))
