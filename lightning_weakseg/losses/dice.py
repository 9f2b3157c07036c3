"""Soft Dice loss per sample (tensors in, tensors out)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_dice_loss"]


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    r"""Per-sample soft Dice loss over the foreground classes, labelled pixels only.

    .. math:: L_n = 1 - \frac{1}{K-1} \sum_{c \ge 1} \frac{2 \sum_i p_{nic} y_{nic} + 1}{\sum_i (p_{nic} + y_{nic}) + 1}

    (a class absent from both target and prediction scores 1, i.e. no loss).

    Args:
        probs: (B, K, H, W) softmax. target: (B, H, W) long with ``ignore_index`` for unknown pixels.

    Returns:
        (B,) losses in [0, 1]: always the per-sample values (``reduction="none"`` in the convention of
        :mod:`lightning_weakseg.losses`); reduce them with :func:`lightning_weakseg.losses.reduce`.

    Example:
        >>> t = torch.tensor([[[0, 1], [1, 1]]])
        >>> p = F.one_hot(t, 2).permute(0, 3, 1, 2).float()
        >>> soft_dice_loss(p, t).tolist(), round(float(soft_dice_loss(1 - p, t)), 3)   # 1 - (0 + 1) / (4 + 1)
        ([0.0], 0.8)
    """
    valid = (target != ignore_index).unsqueeze(1)
    onehot = F.one_hot(target.clamp(0, probs.shape[1] - 1), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    p, t = probs * valid, onehot * valid
    inter = (p * t).flatten(2).sum(-1)[:, 1:]
    denom = (p + t).flatten(2).sum(-1)[:, 1:]
    dice = (2 * inter + 1) / (denom + 1)
    return 1 - dice.mean(1)
