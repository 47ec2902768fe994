"""Head shapes, the inference path and checkpoint round trips."""

from __future__ import annotations

import pytest
import torch

from model.network import DENSE_CHANNELS, MultiTaskNet, NetConfig, build_network


@pytest.fixture(scope="module")
def net() -> MultiTaskNet:
    torch.manual_seed(0)
    return MultiTaskNet(NetConfig(subtypes=("a", "b", "c"))).eval()


@pytest.mark.parametrize("size", [96, 128, 130])
def test_head_shapes_odd_sizes(net, size):
    with torch.no_grad():
        outputs = net(torch.rand(2, 3, size, size) * 255)
    assert outputs["logits"].shape == (2,)
    assert outputs["dense_logits"].shape == (2, len(DENSE_CHANNELS), size, size)
    assert outputs["agreement_logits"].shape == (2,)
    assert outputs["subtype_logits"].shape == (2, 3)


def test_classify_matches_forward(net):
    images = torch.rand(3, 3, 128, 128) * 255
    with torch.no_grad():
        torch.testing.assert_close(net.classify(images), net(images)["logits"])


def test_config_round_trip():
    config = NetConfig(input_size=96, subtypes=("x",))
    assert NetConfig.from_dict(config.to_dict()) == config


def test_config_rejects_unknown_field():
    with pytest.raises(ValueError, match="unknown NetConfig fields"):
        NetConfig.from_dict({"backbone": "tf_efficientnet_lite0", "colour": "red"})


def test_imagenet_init_changes_encoder():
    torch.manual_seed(0)
    plain = MultiTaskNet(NetConfig())
    pretrained = build_network(NetConfig(), imagenet=True)
    stem = "conv_stem.weight"
    assert not torch.equal(plain.encoder.state_dict()[stem], pretrained.encoder.state_dict()[stem])
