"""Noisy masks: train on ``batch[noisy_key]`` with a noise-robust loss instead of cross-entropy.

Baselines for co-teaching: generalized cross-entropy (Zhang & Sabuncu 2018) and symmetric cross-entropy
(Wang et al. 2019), see :mod:`lightning_weakseg.losses.robust`.
"""
from __future__ import annotations

import torch

from ..losses.robust import generalized_cross_entropy, symmetric_cross_entropy
from ..module import WeakSegModule

__all__ = ["RobustLossMixin", "RobustSegModule"]


class RobustLossMixin:
    """Adds ``noisy/gce`` or ``noisy/sce``: per image, the mean robust loss over its labelled noisy-mask pixels,
    then :meth:`WeakSegModule.batch_mean` over the images that have a noisy mask. The robust loss replaces the
    base ``seg/ce`` term (``replaces_base_term``).

    Args:
        robust_loss: ``"gce"`` or ``"sce"``.
        noisy_key: the dense noisy label map (255 = ignore).
        gce_q: q of GCE (0.7). sce_alpha, sce_beta, sce_log_zero: α, β and log 0 := A of SCE (0.1, 1.0, −4).
    """

    default_loss_weights = {"noisy/gce": 1.0, "noisy/sce": 1.0}
    replaces_base_term = True

    def __init__(self, *, robust_loss: str = "gce", noisy_key: str = "noisy_mask", gce_q: float = 0.7,
                 sce_alpha: float = 0.1, sce_beta: float = 1.0, sce_log_zero: float = -4.0, **kwargs):
        if robust_loss not in ("gce", "sce"):
            raise ValueError(f"robust_loss: expected 'gce' or 'sce', got {robust_loss!r}")
        if not 0.0 < gce_q <= 1.0:
            raise ValueError(f"gce_q: expected a value in (0, 1], got {gce_q}")
        if sce_log_zero >= 0:
            raise ValueError(f"sce_log_zero: expected a negative value (it stands for log 0), got {sce_log_zero}")
        super().__init__(**kwargs)

    def robust_sample_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,): each image's mean robust loss over its labelled pixels (0 for an image without any)."""
        h = self.hparams
        if h.robust_loss == "gce":
            return generalized_cross_entropy(logits, target, q=h.gce_q, ignore_index=self.ignore_index,
                                             reduction="none")
        return symmetric_cross_entropy(logits, target, alpha=h.sce_alpha, beta=h.sce_beta,
                                       log_zero=h.sce_log_zero, ignore_index=self.ignore_index, reduction="none")

    def loss_terms(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, out)
        key = self.hparams.noisy_key
        if key in batch and batch[f"has_{key}"].any():
            per_image = self.robust_sample_loss(out["logits"], batch[key])
            terms[f"noisy/{self.hparams.robust_loss}"] = self.batch_mean(per_image, batch[f"has_{key}"])
        return terms


class RobustSegModule(RobustLossMixin, WeakSegModule):
    """Ready-made robust-loss module for LightningCLI configs (``configs/noisy_robust.yaml``)."""
