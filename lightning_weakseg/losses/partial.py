"""Losses for partial labels (scribbles): the masked (partial) cross-entropy that every dense label map of the
library trains with, and two label-free regularisers, entropy minimisation and total variation. Batched,
device-agnostic, no NumPy.

The gated CRF regulariser that usually goes with them is :func:`lightning_weakseg.losses.gated_crf_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._reduction import check_reduction, reduce

__all__ = ["masked_cross_entropy", "partial_cross_entropy", "entropy_loss", "total_variation_loss",
           "PartialCrossEntropyLoss", "EntropyLoss", "TotalVariationLoss"]


def _check_probs(probs: Tensor, name: str = "probs") -> None:
    if probs.ndim != 4:
        raise ValueError(f"expected {name} of shape (B, K, H, W), got {tuple(probs.shape)}")


def masked_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255, *, weight: Tensor | None = None,
                         reduction: str = "sum") -> Tensor:
    r"""Cross-entropy over each sample's labelled pixels (partial cross-entropy: scribbles, clicks, pseudo labels,
    full masks — any label map with an ignore value).

    For sample b with labelled pixels :math:`\Omega_b = \{i : y_{bi} \ne \text{ignore}\}` and optional class
    weights w (all ones by default)

    .. math::
        \mathrm{pCE}_b = \frac{1}{|\Omega_b|} \sum_{i \in \Omega_b} -w_{y_{bi}}
        \log \operatorname{softmax}(z_{bi})_{y_{bi}}

    and :math:`\mathrm{pCE}_b = 0` (with zero gradient) when :math:`\Omega_b = \emptyset`. Each sample is a
    mean over its own pixels, so a sample with a long scribble does not outweigh one with a short scribble. The
    weights scale the pixels' terms, the divisor stays the pixel count (a background weight < 1 lowers the
    background pixels' share, as for partial points in Qu et al. 2019).

    Args:
        logits: (B, K, *spatial) raw scores.
        target: (B, *spatial) long class ids in [0, K) or ``ignore_index``.
        ignore_index: value of unlabelled pixels.
        weight: optional (K,) class weights.
        reduction: ``"none"`` → :math:`\mathrm{pCE}_b` (B,); ``"mean"`` → :math:`\frac{1}{B}\sum_b
            \mathrm{pCE}_b` (a sample without labelled pixels counts as 0); ``"sum"`` → :math:`\sum_b
            \mathrm{pCE}_b` (:mod:`lightning_weakseg.losses`).

    Example:
        >>> z = torch.zeros(1, 2, 1, 2)                       # uniform prediction
        >>> y = torch.tensor([[[1, 255]]])                    # one labelled pixel
        >>> round(float(masked_cross_entropy(z, y)), 4)       # log 2
        0.6931
    """
    check_reduction(reduction)
    if logits.ndim < 3:
        raise ValueError(f"expected logits of shape (B, K, *spatial), got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"expected target of shape (B, *spatial) = {(logits.shape[0],) + tuple(logits.shape[2:])}, "
                         f"got {tuple(target.shape)}")
    if target.dtype != torch.long:
        raise ValueError(f"expected a long target (class ids), got dtype {target.dtype}")
    ce = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none").flatten(1)
    n = (target != ignore_index).flatten(1).sum(1)
    return reduce(ce.sum(1) / n.clamp_min(1), reduction)


#: Partial cross-entropy (scribbles): the same function as :func:`masked_cross_entropy`.
partial_cross_entropy = masked_cross_entropy


def entropy_loss(probs: Tensor, valid: Tensor | None = None, reduction: str = "sum", eps: float = 1e-8) -> Tensor:
    r"""Entropy minimisation (Grandvalet & Bengio, NeurIPS 2004): push every pixel towards a confident class.

    .. math::
        H_b = \frac{1}{\sum_i m_{bi}} \sum_i m_{bi} \Big(-\sum_k p_{bik} \log (p_{bik} + \epsilon)\Big)

    with gate :math:`m` (``valid``; all ones by default) and :math:`H_b = 0` when no pixel is valid. The
    value lies in [0, log K]; the gradient of the unit-gated term is that of the mean pixel entropy.

    Args:
        probs: (B, K, H, W) class probabilities (softmax output).
        valid: optional (B, H, W) bool/float gate (e.g. only unlabelled pixels, a field of view).
        reduction: ``"none"`` → :math:`H_b` (B,), ``"mean"`` / ``"sum"`` → their mean / sum over the batch
            (:mod:`lightning_weakseg.losses`).
        eps: keeps ``log`` finite at p = 0.

    Example:
        >>> p = torch.full((1, 2, 2, 2), 0.5)                 # maximal uncertainty for 2 classes
        >>> round(float(entropy_loss(p)), 4)                  # log 2
        0.6931
    """
    check_reduction(reduction)
    _check_probs(probs)
    ent = -(probs * torch.log(probs + eps)).sum(1)  # (B, H, W)
    if valid is None:
        per_sample = ent.flatten(1).mean(1)
    else:
        if valid.shape != ent.shape:
            raise ValueError(f"expected valid of shape (B, H, W) = {tuple(ent.shape)}, got {tuple(valid.shape)}")
        m = valid.to(ent.dtype)
        per_sample = (ent * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return reduce(per_sample, reduction)


def total_variation_loss(probs: Tensor, reduction: str = "sum", valid: Tensor | None = None) -> Tensor:
    r"""Anisotropic total variation of the probability maps, per pixel (favours piecewise-constant maps).

    .. math::
        \mathrm{TV}_b = \frac{1}{HW} \sum_k \Big(\sum_{y=0}^{H-2}\sum_{x} |p_{bk,y+1,x} - p_{bk,y,x}|
                      + \sum_{y}\sum_{x=0}^{W-2} |p_{bk,y,x+1} - p_{bk,y,x}|\Big)

    Dividing by the pixel count H·W gives the per-pixel scale of a mean CE: the term measures boundary length
    per unit of image area (a straight edge between two classes across a W-wide image costs 2W/(HW) = 2/H).

    Args:
        probs: (B, K, H, W) class probabilities.
        reduction: ``"none"`` → :math:`\mathrm{TV}_b` (B,), ``"mean"`` / ``"sum"`` → their mean / sum over the
            batch (:mod:`lightning_weakseg.losses`).
        valid: optional (B, H, W) bool gate: only pairs of two valid pixels count, and H·W becomes the number of
            valid pixels (the TV of the valid region alone, e.g. without the padding of a letterboxed image).

    Example:
        >>> p = torch.zeros(1, 2, 2, 2); p[:, 0, :, 0] = 1; p[:, 1, :, 1] = 1   # left column class 0
        >>> float(total_variation_loss(p))                    # 2 classes × 2 rows × |1 − 0| / 4 px
        1.0
    """
    check_reduction(reduction)
    _check_probs(probs)
    h, w = probs.shape[-2:]
    ddy = (probs[..., 1:, :] - probs[..., :-1, :]).abs()
    ddx = (probs[..., :, 1:] - probs[..., :, :-1]).abs()
    if valid is None:
        return reduce((ddy.flatten(1).sum(1) + ddx.flatten(1).sum(1)) / (h * w), reduction)
    # with a (B,H,W) gate (e.g. not the padding of a letterboxed image): pairs of two valid pixels, per valid pixel
    m = valid.to(probs.device, torch.bool)
    my = (m[:, 1:, :] & m[:, :-1, :])[:, None]
    mx = (m[:, :, 1:] & m[:, :, :-1])[:, None]
    tv = (ddy * my).flatten(1).sum(1) + (ddx * mx).flatten(1).sum(1)
    return reduce(tv / m.flatten(1).sum(1).clamp_min(1), reduction)


class PartialCrossEntropyLoss(nn.Module):
    """Module form of :func:`masked_cross_entropy` (partial cross-entropy); ``weight`` optional (K,) class
    weights."""

    def __init__(self, ignore_index: int = 255, reduction: str = "sum", weight: Tensor | None = None):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, check_reduction(reduction)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return masked_cross_entropy(logits, target, self.ignore_index, weight=self.weight, reduction=self.reduction)


class EntropyLoss(nn.Module):
    """Module form of :func:`entropy_loss`."""

    def __init__(self, reduction: str = "sum", eps: float = 1e-8):
        super().__init__()
        self.reduction, self.eps = check_reduction(reduction), eps

    def forward(self, probs: Tensor, valid: Tensor | None = None) -> Tensor:
        return entropy_loss(probs, valid, self.reduction, self.eps)


class TotalVariationLoss(nn.Module):
    """Module form of :func:`total_variation_loss`."""

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, probs: Tensor) -> Tensor:
        return total_variation_loss(probs, self.reduction)
