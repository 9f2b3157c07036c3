"""Losses for partial labels (scribbles): partial cross-entropy and two label-free regularisers, entropy
minimisation and total variation. Batched, device-agnostic, no NumPy.

The gated CRF regulariser that usually goes with them is :func:`lightning_weakseg.losses.gated_crf_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["partial_cross_entropy", "entropy_loss", "total_variation_loss",
           "PartialCrossEntropyLoss", "EntropyLoss", "TotalVariationLoss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_probs(probs: Tensor, name: str = "probs") -> None:
    if probs.ndim != 4:
        raise ValueError(f"expected {name} of shape (B, K, H, W), got {tuple(probs.shape)}")


def partial_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255,
                          reduction: str = "mean") -> Tensor:
    r"""Cross-entropy over the labelled pixels only (scribbles, clicks, any map with an ignore value).

    For sample b with labelled pixels :math:`\Omega_b = \{i : y_{bi} \ne \text{ignore}\}`

    .. math::
        \mathrm{pCE}_b = \frac{1}{|\Omega_b|} \sum_{i \in \Omega_b} -\log \operatorname{softmax}(z_{bi})_{y_{bi}}

    and :math:`\mathrm{pCE}_b = 0` (with zero gradient) when :math:`\Omega_b = \emptyset`. Each sample is a
    mean over its own pixels, so a sample with a long scribble does not outweigh one with a short scribble.

    Args:
        logits: (B, K, H, W) raw scores.
        target: (B, H, W) long class ids in [0, K) or ``ignore_index``.
        ignore_index: value of unlabelled pixels.
        reduction: ``"none"`` → (B,); ``"mean"`` → mean over the samples that have labelled pixels (0 if none);
            ``"sum"`` → sum over samples.

    Example:
        >>> z = torch.zeros(1, 2, 1, 2)                       # uniform prediction
        >>> y = torch.tensor([[[1, 255]]])                    # one labelled pixel
        >>> round(float(partial_cross_entropy(z, y)), 4)      # log 2
        0.6931
    """
    _check_reduction(reduction)
    _check_probs(logits, "logits")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"expected target of shape (B, H, W) = {(logits.shape[0],) + tuple(logits.shape[2:])}, "
                         f"got {tuple(target.shape)}")
    if target.dtype != torch.long:
        raise ValueError(f"expected a long target (class ids), got dtype {target.dtype}")
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten(1)
    n = (target != ignore_index).flatten(1).sum(1)
    per_sample = ce.sum(1) / n.clamp_min(1)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / (n > 0).sum().clamp_min(1)


def entropy_loss(probs: Tensor, valid: Tensor | None = None, reduction: str = "mean", eps: float = 1e-8) -> Tensor:
    r"""Entropy minimisation (Grandvalet & Bengio, NeurIPS 2004): push every pixel towards a confident class.

    .. math::
        H_b = \frac{1}{\sum_i m_{bi}} \sum_i m_{bi} \Big(-\sum_k p_{bik} \log (p_{bik} + \epsilon)\Big)

    with gate :math:`m` (``valid``; all ones by default) and :math:`H_b = 0` when no pixel is valid. The
    value lies in [0, log K]; the gradient of the unit-gated term is that of the mean pixel entropy.

    Args:
        probs: (B, K, H, W) class probabilities (softmax output).
        valid: optional (B, H, W) bool/float gate (e.g. only unlabelled pixels, a field of view).
        reduction: ``"none"`` → (B,), ``"mean"`` over samples, ``"sum"`` over samples.
        eps: keeps ``log`` finite at p = 0.

    Example:
        >>> p = torch.full((1, 2, 2, 2), 0.5)                 # maximal uncertainty for 2 classes
        >>> round(float(entropy_loss(p)), 4)                  # log 2
        0.6931
    """
    _check_reduction(reduction)
    _check_probs(probs)
    ent = -(probs * torch.log(probs + eps)).sum(1)  # (B, H, W)
    if valid is None:
        per_sample = ent.flatten(1).mean(1)
    else:
        if valid.shape != ent.shape:
            raise ValueError(f"expected valid of shape (B, H, W) = {tuple(ent.shape)}, got {tuple(valid.shape)}")
        m = valid.to(ent.dtype)
        per_sample = (ent * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def total_variation_loss(probs: Tensor, reduction: str = "mean") -> Tensor:
    r"""Anisotropic total variation of the probability maps, per pixel (favours piecewise-constant maps).

    .. math::
        \mathrm{TV}_b = \frac{1}{HW} \sum_k \Big(\sum_{y=0}^{H-2}\sum_{x} |p_{bk,y+1,x} - p_{bk,y,x}|
                      + \sum_{y}\sum_{x=0}^{W-2} |p_{bk,y,x+1} - p_{bk,y,x}|\Big)

    Dividing by the pixel count H·W gives the per-pixel scale of a mean CE: the term measures boundary length
    per unit of image area (a straight edge between two classes across a W-wide image costs 2W/(HW) = 2/H).

    Args:
        probs: (B, K, H, W) class probabilities.
        reduction: ``"none"`` → (B,), ``"mean"`` over samples, ``"sum"`` over samples.

    Example:
        >>> p = torch.zeros(1, 2, 2, 2); p[:, 0, :, 0] = 1; p[:, 1, :, 1] = 1   # left column class 0
        >>> float(total_variation_loss(p))                    # 2 classes × 2 rows × |1 − 0| / 4 px
        1.0
    """
    _check_reduction(reduction)
    _check_probs(probs)
    h, w = probs.shape[-2:]
    dy = (probs[..., 1:, :] - probs[..., :-1, :]).abs().flatten(1).sum(1)
    dx = (probs[..., :, 1:] - probs[..., :, :-1]).abs().flatten(1).sum(1)
    per_sample = (dy + dx) / (h * w)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


class PartialCrossEntropyLoss(nn.Module):
    """Module form of :func:`partial_cross_entropy`."""

    def __init__(self, ignore_index: int = 255, reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return partial_cross_entropy(logits, target, self.ignore_index, self.reduction)


class EntropyLoss(nn.Module):
    """Module form of :func:`entropy_loss`."""

    def __init__(self, reduction: str = "mean", eps: float = 1e-8):
        super().__init__()
        _check_reduction(reduction)
        self.reduction, self.eps = reduction, eps

    def forward(self, probs: Tensor, valid: Tensor | None = None) -> Tensor:
        return entropy_loss(probs, valid, self.reduction, self.eps)


class TotalVariationLoss(nn.Module):
    """Module form of :func:`total_variation_loss`."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction

    def forward(self, probs: Tensor) -> Tensor:
        return total_variation_loss(probs, self.reduction)
