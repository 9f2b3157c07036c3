"""Noise-robust losses: generalized cross-entropy and symmetric cross-entropy.

Both take logits ``(N, K, *)`` (softmax over dim 1, binary = K = 2) and a long target ``(N, *)``
whose ``ignore_index`` pixels (255) contribute nothing. Per sample n the value is the mean of the per-pixel loss
over the sample's labelled pixels Ω_n (0 when it has none); ``reduction`` follows the convention of
:mod:`lightning_weakseg.losses`: ``"none"`` → (N,), ``"mean"`` / ``"sum"`` (default) → their mean / sum over the
batch. The per-pixel maps themselves (0 at ignored pixels) are :func:`generalized_cross_entropy_map` and
:func:`symmetric_cross_entropy_map`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._reduction import check_reduction, reduce

__all__ = [
    "generalized_cross_entropy",
    "symmetric_cross_entropy",
    "generalized_cross_entropy_map",
    "symmetric_cross_entropy_map",
    "GeneralizedCrossEntropyLoss",
    "SymmetricCrossEntropyLoss",
]


def _check_logits_target(logits: Tensor, target: Tensor, ignore_index: int, name: str) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError(f"{name}: expected floating logits (N, K, *), got {type(logits).__name__}"
                         f"{'' if not isinstance(logits, Tensor) else ' of dtype ' + str(logits.dtype)}")
    if logits.dim() < 2:
        raise ValueError(f"{name}: expected logits of shape (N, K, *), got {tuple(logits.shape)}")
    if target.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"{name}: expected an integer class target, got dtype {target.dtype}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"{name}: expected target of shape {expected} for logits {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    k = logits.shape[1]
    labelled = target != ignore_index
    if labelled.any():
        t = target[labelled]
        if int(t.min()) < 0 or int(t.max()) >= k:
            raise ValueError(f"{name}: expected target values in [0, {k - 1}] or {ignore_index} (ignore), "
                             f"got values in [{int(t.min())}, {int(t.max())}]")


def _per_sample(per_pixel: Tensor, labelled: Tensor) -> Tensor:
    """Mean over each sample's labelled pixels, (N,); a sample without any gives 0 (and a zero gradient)."""
    n = per_pixel.shape[0]
    return per_pixel.reshape(n, -1).sum(1) / labelled.reshape(n, -1).sum(1).clamp_min(1)


def _log_p_target(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """log p_y per pixel (0 at ignored pixels), the labelled mask and the safe target."""
    labelled = target != ignore_index
    safe = torch.where(labelled, target, torch.zeros_like(target)).long()
    # half precision is upcast; float32 and float64 keep their precision
    log_p = F.log_softmax(logits if logits.dtype in (torch.float32, torch.float64) else logits.float(), dim=1)
    log_py = log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
    return log_py, labelled, safe


def generalized_cross_entropy_map(logits: Tensor, target: Tensor, q: float = 0.7, ignore_index: int = 255) -> Tensor:
    r"""Per-pixel generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018), (N, *), 0 at ignored pixels.

    .. math::  L_q(p, y) = \frac{1 - p_y^{\,q}}{q},  \qquad p = \mathrm{softmax}(s)

    ``q → 0`` gives cross-entropy ``−log p_y``; ``q = 1`` gives ``1 − p_y`` (half the MAE between ``p``
    and the one-hot target). ``p_y^q`` is computed as ``exp(q · log p_y)`` so that it stays finite.

    Example:
        >>> logits = torch.zeros(1, 2, 1, 2)                             # p = (0.5, 0.5) at both pixels
        >>> generalized_cross_entropy_map(logits, torch.tensor([[[1, 255]]]), q=1.0)
        tensor([[[0.5000, 0.0000]]])
    """
    if not 0.0 < float(q) <= 1.0:
        raise ValueError(f"generalized_cross_entropy: expected q in (0, 1], got {q}")
    _check_logits_target(logits, target, ignore_index, "generalized_cross_entropy")
    log_py, labelled, _ = _log_p_target(logits, target, ignore_index)
    # (1 - exp(q log p)) / q == -expm1(q log p) / q, accurate also for small q
    per_pixel = -torch.expm1(q * log_py) / q
    return torch.where(labelled, per_pixel, torch.zeros_like(per_pixel))


def generalized_cross_entropy(logits: Tensor, target: Tensor, q: float = 0.7, ignore_index: int = 255,
                              reduction: str = "sum") -> Tensor:
    r"""Generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018), per sample.

    .. math::  \mathrm{GCE}_n = \frac{1}{|\Omega_n|} \sum_{i \in \Omega_n} \frac{1 - p_{n i y}^{\,q}}{q},
               \qquad p = \mathrm{softmax}(s)

    over the labelled pixels :math:`\Omega_n` of sample n (0 if it has none); the per-pixel term is
    :func:`generalized_cross_entropy_map`.

    Args:
        logits: (N, K, *) scores.
        target: (N, *) long class indices, ``ignore_index`` for unlabelled pixels.
        q: exponent in (0, 1].
        reduction: ``"none"`` → :math:`\mathrm{GCE}_n` (N,); ``"mean"`` → :math:`\frac{1}{N}\sum_n
            \mathrm{GCE}_n` (every sample weighs the same, whatever its number of labelled pixels);
            ``"sum"`` → :math:`\sum_n \mathrm{GCE}_n` (:mod:`lightning_weakseg.losses`).

    Example:
        >>> logits = torch.tensor([[[0.0]], [[0.0]]]).unsqueeze(0)   # (1, 2, 1, 1): p = (0.5, 0.5)
        >>> round(float(generalized_cross_entropy(logits, torch.tensor([[[1]]]), q=1.0)), 4)
        0.5
    """
    check_reduction(reduction)
    per_pixel = generalized_cross_entropy_map(logits, target, q, ignore_index)
    return reduce(_per_sample(per_pixel, target != ignore_index), reduction)


def symmetric_cross_entropy_map(logits: Tensor, target: Tensor, alpha: float = 0.1, beta: float = 1.0,
                                log_zero: float = -4.0, ignore_index: int = 255) -> Tensor:
    r"""Per-pixel symmetric cross-entropy (Wang et al., ICCV 2019), (N, *), 0 at ignored pixels.

    .. math::
        L = \alpha\,\mathrm{CE} + \beta\,\mathrm{RCE}, \quad \mathrm{CE} = -\log p_y, \quad
        \mathrm{RCE} = -\sum_k p_k \log q_k

    where ``q`` is the one-hot target with ``log 0 := A`` (``log_zero``, −4 in the paper), so that
    ``RCE = −A · (1 − p_y)``.

    Example:
        >>> symmetric_cross_entropy_map(torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 255]]]))  # 0.1 ln 2 + 4 * 0.5
        tensor([[[2.0693, 0.0000]]])
    """
    if log_zero >= 0:
        raise ValueError(f"symmetric_cross_entropy: expected log_zero < 0 (it stands for log 0), got {log_zero}")
    _check_logits_target(logits, target, ignore_index, "symmetric_cross_entropy")
    log_py, labelled, _ = _log_p_target(logits, target, ignore_index)
    ce = -log_py
    rce = -log_zero * (1.0 - log_py.exp())
    per_pixel = alpha * ce + beta * rce
    return torch.where(labelled, per_pixel, torch.zeros_like(per_pixel))


def symmetric_cross_entropy(logits: Tensor, target: Tensor, alpha: float = 0.1, beta: float = 1.0,
                            log_zero: float = -4.0, ignore_index: int = 255, reduction: str = "sum") -> Tensor:
    r"""Symmetric cross-entropy (Wang et al., ICCV 2019), per sample: the mean of
    :func:`symmetric_cross_entropy_map` over the sample's labelled pixels :math:`\Omega_n` (0 if it has none),

    .. math::
        \mathrm{SCE}_n = \frac{1}{|\Omega_n|} \sum_{i \in \Omega_n} \alpha\,\mathrm{CE}_i + \beta\,\mathrm{RCE}_i,
        \quad \mathrm{CE} = -\log p_y, \quad \mathrm{RCE} = -A\,(1 - p_y)

    with ``A = log_zero`` standing for log 0 in the one-hot target.

    Args:
        logits: (N, K, *) scores.
        target: (N, *) long class indices, ``ignore_index`` for unlabelled pixels.
        alpha, beta: weights of CE and reverse CE (paper: 0.1 and 1.0 on CIFAR-10).
        log_zero: the value A that stands for log 0 (negative).
        reduction: ``"none"`` → :math:`\mathrm{SCE}_n` (N,); ``"mean"`` → :math:`\frac{1}{N}\sum_n
            \mathrm{SCE}_n`; ``"sum"`` → :math:`\sum_n \mathrm{SCE}_n` (:mod:`lightning_weakseg.losses`).

    Example:
        >>> logits = torch.zeros(1, 2, 1, 1)                         # p = (0.5, 0.5)
        >>> round(float(symmetric_cross_entropy(logits, torch.tensor([[[0]]]))), 4)  # 0.1 ln 2 + 4 * 0.5
        2.0693
    """
    check_reduction(reduction)
    per_pixel = symmetric_cross_entropy_map(logits, target, alpha, beta, log_zero, ignore_index)
    return reduce(_per_sample(per_pixel, target != ignore_index), reduction)


class GeneralizedCrossEntropyLoss(nn.Module):
    """Module form of :func:`generalized_cross_entropy`; stores ``q``, ``ignore_index``, ``reduction``."""

    def __init__(self, q: float = 0.7, ignore_index: int = 255, reduction: str = "sum"):
        super().__init__()
        if not 0.0 < float(q) <= 1.0:
            raise ValueError(f"GeneralizedCrossEntropyLoss: expected q in (0, 1], got {q}")
        self.q, self.ignore_index, self.reduction = float(q), ignore_index, check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return generalized_cross_entropy(logits, target, self.q, self.ignore_index, self.reduction)

    def extra_repr(self) -> str:
        return f"q={self.q}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class SymmetricCrossEntropyLoss(nn.Module):
    """Module form of :func:`symmetric_cross_entropy`; stores ``alpha``, ``beta``, ``log_zero``."""

    def __init__(self, alpha: float = 0.1, beta: float = 1.0, log_zero: float = -4.0, ignore_index: int = 255,
                 reduction: str = "sum"):
        super().__init__()
        self.alpha, self.beta, self.log_zero = float(alpha), float(beta), float(log_zero)
        self.ignore_index, self.reduction = ignore_index, check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return symmetric_cross_entropy(logits, target, self.alpha, self.beta, self.log_zero,
                                       self.ignore_index, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, log_zero={self.log_zero}, ignore_index={self.ignore_index}"
