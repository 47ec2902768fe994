"""The training loss: the classification term plus weighted auxiliary terms.

Every weight is a training setting; a weight of 0 turns its task off (the single-task ablation sets all
of them to 0). Patches whose figure mask is the fallback disc (nothing found by the target maker) count
``fallback_weight`` times in the figure mask and HV terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    classification: str = "bce"  # "bce", or "focal" (Lin et al., ICCV 2017) with focal_gamma
    focal_gamma: float = 2.0
    figure_mask: float = 1.0  # BCE + Dice on the figure mask
    hv: float = 1.0  # MSE on the HV maps
    nuclei: float = 0.5  # BCE on the all-nuclei mask
    agreement: float = 0.5  # BCE on the fraction of experts voting atypical
    subtype: float = 0.2  # cross-entropy on the mitosis phase or subtype
    fallback_weight: float = 0.1


def _per_sample_mean(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).mean(dim=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Return the soft Dice loss per sample of ``(B, H, W)`` logits against a binary target."""
    probability = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    overlap = (probability * target).sum(dim=1)
    return 1.0 - (2.0 * overlap + eps) / (probability.sum(dim=1) + target.sum(dim=1) + eps)


def multitask_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    weights: LossWeights,
    pos_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the total loss and each term's value (before weighting) for logging."""
    label = batch["label"]
    logits = outputs["logits"].float()
    per_patch = F.binary_cross_entropy_with_logits(
        logits, label, pos_weight=torch.tensor(pos_weight, device=label.device), reduction="none"
    )
    if weights.classification == "focal":
        p_true = torch.where(label > 0.5, torch.sigmoid(logits), 1.0 - torch.sigmoid(logits))
        per_patch = per_patch * (1.0 - p_true) ** weights.focal_gamma
    elif weights.classification != "bce":
        raise ValueError(f"invalid classification loss '{weights.classification}': expected bce or focal")
    classification = per_patch.mean()
    total = classification
    terms = {"classification": classification.detach()}

    dense = outputs["dense_logits"].float()
    sample_weight = torch.where(batch["target_fallback"], weights.fallback_weight, 1.0).to(dense.dtype)
    sample_weight = sample_weight / sample_weight.sum().clamp_min(1e-6)

    if weights.figure_mask > 0:
        mask_bce = _per_sample_mean(F.binary_cross_entropy_with_logits(dense[:, 0], batch["figure_mask"], reduction="none"))
        mask_term = ((mask_bce + dice_loss(dense[:, 0], batch["figure_mask"])) * sample_weight).sum()
        total = total + weights.figure_mask * mask_term
        terms["figure_mask"] = mask_term.detach()
    if weights.hv > 0:
        hv_error = _per_sample_mean((torch.tanh(dense[:, 1:3]) - batch["hv"]) ** 2)
        hv_term = (hv_error * sample_weight).sum()
        total = total + weights.hv * hv_term
        terms["hv"] = hv_term.detach()
    if weights.nuclei > 0:
        nuclei_term = F.binary_cross_entropy_with_logits(dense[:, 3], batch["nuclei"])
        total = total + weights.nuclei * nuclei_term
        terms["nuclei"] = nuclei_term.detach()

    known = ~torch.isnan(batch["agreement"])
    if weights.agreement > 0 and known.any():
        agreement_term = F.binary_cross_entropy_with_logits(
            outputs["agreement_logits"][known].float(), batch["agreement"][known]
        )
        total = total + weights.agreement * agreement_term
        terms["agreement"] = agreement_term.detach()
    labelled = batch["subtype"] >= 0
    if weights.subtype > 0 and labelled.any():
        subtype_term = F.cross_entropy(outputs["subtype_logits"][labelled].float(), batch["subtype"][labelled])
        total = total + weights.subtype * subtype_term
        terms["subtype"] = subtype_term.detach()

    return total, {name: float(value) for name, value in terms.items()}
