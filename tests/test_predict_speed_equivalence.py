"""The predictor's speed-ups (batch-norm folding, batch slices on worker threads) keep the plain networks' outputs within 1e-4."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import model.predict as predict
from model.network import MultiTaskNet, NetConfig
from model.predict import Predictor, classify_in_slices, fold_batch_norms
from model.views import view_batch


def random_pages(count: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(count)]


def plain_networks(weights_dir) -> list[MultiTaskNet]:
    """Load every fold as a plain eval-mode network, without the predictor's optimisations."""
    manifest = json.loads((weights_dir / "manifest.json").read_text())
    nets = []
    for entry in manifest["folds"]:
        net = MultiTaskNet(NetConfig.from_dict(manifest["net_config"]))
        net.load_state_dict({k: v.float() for k, v in load_file(weights_dir / entry["file"]).items()})
        nets.append(net.eval())
    return nets


def with_random_statistics(net: MultiTaskNet, seed: int = 0) -> MultiTaskNet:
    """Give every batch norm trained-looking statistics, so that folding changes the weights."""
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.25)
            with torch.no_grad():
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.2)
    return net.eval()


def batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.fixture
def intra_op_threads():
    """Set torch's intra-op thread count for one test and restore it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 3])  # 3: the batch is sliced across worker threads
def test_predictor_matches_plain_networks(tiny_weights, intra_op_threads, threads):
    predictor = Predictor(tiny_weights, device="cpu")
    images = predictor.prepare(random_pages(count=5))
    batch = view_batch(images, predictor.views).float()
    with torch.no_grad():
        expected = torch.stack([
            torch.sigmoid(net.classify(batch)).view(len(predictor.views), -1).mean(dim=0)
            for net in plain_networks(tiny_weights)
        ])

    intra_op_threads(threads)
    probabilities = predictor.fold_probabilities(images)

    torch.testing.assert_close(probabilities, expected, atol=1e-4, rtol=0)
    assert torch.get_num_threads() == threads


def test_slices_match_whole_batch(intra_op_threads):
    torch.manual_seed(0)
    net = with_random_statistics(MultiTaskNet(NetConfig()))
    batch = torch.randint(0, 256, (7, 3, 64, 64)).float()  # 7 images do not split evenly
    with torch.inference_mode():
        expected = net.classify(batch)

    intra_op_threads(2)
    with ThreadPoolExecutor(2) as pool:
        logits = classify_in_slices(net, batch, pool, workers=2)

    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert torch.get_num_threads() == 2


def test_predictor_runs_no_batch_norm_on_classify_path(tiny_weights):
    predictor = Predictor(tiny_weights, device="cpu")
    for net in predictor.nets:
        assert batch_norms(net.encoder) == []
        assert batch_norms(net.neck) == []


def test_fold_matches_every_head():
    torch.manual_seed(0)
    net = with_random_statistics(MultiTaskNet(NetConfig()))
    plain = copy.deepcopy(net)
    expected_count = len(batch_norms(net.encoder)) + len(batch_norms(net.neck))
    images = torch.randint(0, 256, (3, 3, 96, 80)).float()  # odd, non-square size

    assert fold_batch_norms(net) == expected_count
    with torch.no_grad():
        folded_outputs, plain_outputs = net(images), plain(images)
        torch.testing.assert_close(net.classify(images), plain.classify(images), atol=1e-4, rtol=0)
    for name in ("logits", "dense_logits", "agreement_logits", "subtype_logits"):
        torch.testing.assert_close(folded_outputs[name], plain_outputs[name], atol=1e-4, rtol=0, msg=name)


def test_fold_leaves_decoder_alone():
    torch.manual_seed(0)
    net = with_random_statistics(MultiTaskNet(NetConfig()))
    decoder_norms = batch_norms(net.decoder)

    fold_batch_norms(net)

    assert decoder_norms and batch_norms(net.decoder) == decoder_norms


def test_fold_skips_training_mode():
    torch.manual_seed(0)
    net = MultiTaskNet(NetConfig()).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    norms = batch_norms(net)

    assert fold_batch_norms(net) == 0
    assert batch_norms(net) == norms
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, state[name]), name  # running statistics untouched


def test_fold_undone_when_outputs_move(monkeypatch):
    torch.manual_seed(0)
    net = with_random_statistics(MultiTaskNet(NetConfig()))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    norms = batch_norms(net)
    monkeypatch.setattr(predict, "FOLD_TOLERANCE", -1.0)  # every folding counts as moved

    assert fold_batch_norms(net) == 0
    assert batch_norms(net) == norms
    restored = net.state_dict()
    assert restored.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(restored[name], tensor), name

