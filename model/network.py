"""The multi-task network: a timm encoder, a classification head and auxiliary heads.

Following the multi-task approach to MIDOG 2025 track 2 (arXiv 2508.21035), the classifier is trained
together with tasks that make the encoder attend to the mitotic figure rather than to the background:

* ``logits``: one logit per patch; ``sigmoid(logits)`` is P(atypical).
* ``dense_logits``: a light FPN-style decoder over the encoder's feature pyramid, at patch resolution,
  with four channels: figure mask logit, horizontal and vertical distance to the figure's centre
  (HoVer-Net style, in [-1, 1] after ``tanh``), all-nuclei logit.
* ``agreement_logits``: the fraction of experts voting atypical, as a logit.
* ``subtype_logits``: the mitosis phase or subtype (``NetConfig.subtypes``).

Only the classification path runs at inference (:meth:`MultiTaskNet.classify`); the decoder and the
label heads cost nothing there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
from torch import nn

DENSE_CHANNELS = ("figure_mask", "hv_horizontal", "hv_vertical", "nuclei")


@dataclass
class NetConfig:
    """Everything needed to rebuild the network and its preprocessing from a checkpoint."""

    backbone: str = "tf_efficientnet_lite0"
    input_size: int = 128
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    head_channels: int = 1280
    decoder_channels: int = 32
    dropout: float = 0.2
    subtypes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "NetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown NetConfig fields {sorted(unknown)}; known: {sorted(known)}")
        values = dict(values)
        for name in ("mean", "std", "subtypes"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


class ConvBnAct(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class PyramidDecoder(nn.Module):
    """FPN-style top-down decoder: lateral 1x1 convs, upsample-and-add, a 3x3 conv per level.

    It stops at the stride-4 level and upsamples its logits bilinearly to the patch size: a figure
    spans 15-40 px at 0.25 um/px, and the full-resolution levels tripled the training step time.
    """

    def __init__(self, in_channels: list[int], channels: int, out_channels: int, first_level: int = 1):
        super().__init__()
        self.first_level = first_level
        in_channels = in_channels[first_level:]
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(ConvBnAct(channels, channels) for _ in in_channels[:-1])
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        features = features[self.first_level :]
        x = self.laterals[-1](features[-1])
        for level in range(len(features) - 2, -1, -1):
            lateral = self.laterals[level](features[level])
            x = F.interpolate(x, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            x = self.smooth[level](x + lateral)
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


class MultiTaskNet(nn.Module):
    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        self.encoder = timm.create_model(config.backbone, pretrained=False, features_only=True)
        channels = self.encoder.feature_info.channels()

        self.neck = nn.Sequential(
            nn.Conv2d(channels[-1], config.head_channels, 1, bias=False),
            nn.BatchNorm2d(config.head_channels),
            nn.ReLU6(inplace=True),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.head_channels, 1)
        self.agreement = nn.Linear(config.head_channels, 1)
        self.subtype = nn.Linear(config.head_channels, max(1, len(config.subtypes)))
        self.decoder = PyramidDecoder(channels, config.decoder_channels, len(DENSE_CHANNELS))

        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8-range RGB ``(B, 3, H, W)`` to the encoder's input range."""
        return (images.to(self.mean.dtype) - self.mean) / self.std

    def pooled(self, deepest: torch.Tensor) -> torch.Tensor:
        return self.neck(deepest).mean(dim=(2, 3))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Return the atypical logit ``(B,)`` of uint8-range RGB images ``(B, 3, H, W)``."""
        features = self.encoder(self.normalize(images))
        return self.classifier(self.pooled(features[-1])).squeeze(1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run every head. Returns logits ``(B,)``, dense_logits ``(B, 4, H, W)``,
        agreement_logits ``(B,)`` and subtype_logits ``(B, S)``."""
        features = self.encoder(self.normalize(images))
        pooled = self.pooled(features[-1])
        dropped = self.dropout(pooled)
        return {
            "logits": self.classifier(dropped).squeeze(1),
            "dense_logits": self.decoder(features, images.shape[-2:]),
            "agreement_logits": self.agreement(dropped).squeeze(1),
            "subtype_logits": self.subtype(dropped),
        }


def build_network(config: NetConfig, imagenet: bool = False, init: str | None = None) -> MultiTaskNet:
    """Build the network; with ``imagenet`` the encoder and neck start from ImageNet weights."""
    net = MultiTaskNet(config)
    if imagenet:
        from model.pretrained import load_imagenet

        full = timm.create_model(config.backbone, pretrained=False)
        load_imagenet(full, config.backbone, init)
        full_state = full.state_dict()
        encoder_state = {k: full_state[k] for k in net.encoder.state_dict()}
        net.encoder.load_state_dict(encoder_state)
        _copy_neck(net, full)
    return net


def _copy_neck(net: MultiTaskNet, full: nn.Module) -> None:
    """Reuse the ImageNet model's 1x1 head conv and its batch norm when their shapes fit."""
    conv, norm = getattr(full, "conv_head", None), getattr(full, "bn2", None)
    if conv is None or norm is None or conv.weight.shape != net.neck[0].weight.shape:
        return
    net.neck[0].load_state_dict(conv.state_dict())
    net.neck[1].load_state_dict({k: v for k, v in norm.state_dict().items() if k in net.neck[1].state_dict()})
