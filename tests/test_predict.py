"""The predictor: weights lookup, hash checks, views, decision rules, and agreement with the network."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import model.predict as predict
from conftest import make_weights
from model.network import MultiTaskNet, NetConfig
from model.predict import Predictor, WeightsError, decide, load_manifest


def pages(count: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(count)]


def test_probabilities_match_network(tiny_weights):
    predictor = Predictor(tiny_weights, device="cpu")
    prediction = predictor.predict(pages())

    torch.manual_seed(0)  # fold 0 of make_weights, rounded to half precision like the exported file
    net = MultiTaskNet(NetConfig()).eval()
    net.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in net.state_dict().items()})
    images = torch.from_numpy(np.stack(pages()).transpose(0, 3, 1, 2).copy()).float()
    with torch.no_grad():
        views = [net.classify(images), net.classify(images.flip(3)), net.classify(images.flip(2))]
    expected = torch.sigmoid(torch.stack(views)).mean(0).numpy()
    np.testing.assert_allclose(prediction.fold_probabilities[0], expected, atol=1e-5)


def test_mean_over_folds(tiny_weights):
    prediction = Predictor(tiny_weights, device="cpu").predict(pages())
    np.testing.assert_allclose(prediction.p_atypical, prediction.fold_probabilities.mean(axis=0))
    assert prediction.p_atypical.shape == (3,)


def test_odd_page_sizes_accepted(tiny_weights):
    prediction = Predictor(tiny_weights, device="cpu").predict([np.zeros((96, 96, 3), np.uint8), np.zeros((256, 256, 3), np.uint8)])
    assert len(prediction.classes) == 2


def test_mean_rule():
    probabilities = np.array([[0.9, 0.2], [0.1, 0.3], [0.2, 0.8]])
    np.testing.assert_array_equal(decide(probabilities, 0.4, "mean"), [False, True])


def test_vote_rule():
    probabilities = np.array([[0.9, 0.45], [0.1, 0.45], [0.2, 0.0]])
    np.testing.assert_array_equal(decide(probabilities, 0.4, "vote"), [False, True])
    np.testing.assert_array_equal(decide(probabilities, 0.4, "mean"), [False, False])
    np.testing.assert_array_equal(decide(probabilities, 0.15, "vote"), [True, True])


def test_missing_manifest_rejected(tmp_path):
    with pytest.raises(WeightsError, match="manifest not found"):
        Predictor(tmp_path)


def test_hash_mismatch_rejected(tmp_path, tiny_weights):
    weights = shutil.copytree(tiny_weights, tmp_path / "w")
    data = bytearray((weights / "fold1.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (weights / "fold1.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="fold1.safetensors: sha256 .* does not match"):
        Predictor(weights)


def test_corrupt_file_with_matching_hash_rejected(tmp_path, tiny_weights):
    weights = shutil.copytree(tiny_weights, tmp_path / "w")
    (weights / "fold0.safetensors").write_bytes(b"garbage, not safetensors")
    manifest = json.loads((weights / "manifest.json").read_text())
    manifest["folds"][0]["sha256"] = predict.sha256_file(weights / "fold0.safetensors")
    (weights / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="cannot be loaded"):
        Predictor(weights)


def test_missing_fold_file_rejected(tmp_path, tiny_weights):
    weights = shutil.copytree(tiny_weights, tmp_path / "w")
    (weights / "fold0.safetensors").unlink()
    with pytest.raises(WeightsError, match="fold weights not found"):
        Predictor(weights)


def test_fold_path_outside_folder_rejected(tmp_path, tiny_weights):
    weights = shutil.copytree(tiny_weights, tmp_path / "w")
    manifest = json.loads((weights / "manifest.json").read_text())
    manifest["folds"][0]["file"] = "../fold0.safetensors"
    (weights / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="plain file name"):
        Predictor(weights)


@pytest.mark.parametrize("field, value, message", [
    ("views", ["identity", "sideways"], "invalid views"),
    ("rule", "median", "rule must be one of"),
    ("threshold", 1.5, "threshold in"),
    ("format_version", 99, "format_version"),
])
def test_invalid_manifest_rejected(tmp_path, tiny_weights, field, value, message):
    weights = shutil.copytree(tiny_weights, tmp_path / "w")
    manifest = json.loads((weights / "manifest.json").read_text())
    manifest[field] = value
    (weights / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match=message):
        load_manifest(weights)


def test_weights_lookup_order(tmp_path, monkeypatch):
    uploaded = make_weights(tmp_path / "opt-ml-model", folds=1)
    monkeypatch.setattr(predict, "GRAND_CHALLENGE_MODEL_DIR", uploaded)
    assert predict.resolve_weights_dir(tmp_path / "mine")[0] == tmp_path / "mine"
    assert predict.resolve_weights_dir(None)[0] == uploaded
    monkeypatch.setattr(predict, "GRAND_CHALLENGE_MODEL_DIR", tmp_path / "empty")
    assert predict.resolve_weights_dir(None)[0] == predict.BUNDLED_WEIGHTS_DIR


def test_cuda_request_without_gpu_rejected(tiny_weights):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(WeightsError, match="CUDA is not available"):
        Predictor(tiny_weights, device="cuda")
