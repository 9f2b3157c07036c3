"""Multiple-instance pooling of dense maps into image-level logits, and the tag loss.

A segmentation network gives a map s_c (B, K, *s) per class; an image-level tag says whether class c is
somewhere in the image. Pooling turns the map into one score per image and class; binary cross-entropy per
class compares it with the multi-hot tags. Pure tensor code: batched, device-agnostic, differentiable.

Example:
    >>> s = torch.tensor([[[[0.0, 4.0], [0.0, 0.0]]]])     # (B=1, K=1, 2, 2)
    >>> mil_pool(s, "max"), mil_pool(s, "mean")
    (tensor([[4.]]), tensor([[1.]]))
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._reduction import check_reduction, reduce
from .log_barrier import log_barrier, quadratic_penalty

__all__ = ["mil_max", "mil_mean", "mil_lse", "mil_topk", "mil_gem", "mil_pool", "softmax_log_odds", "mil_loss",
           "tag_size_constraint", "AttentionMIL", "MILPool", "MILLoss", "POOLINGS"]

POOLINGS = ("max", "mean", "lse", "topk", "gem", "attention")


def _check(s: Tensor, name: str = "maps") -> Tensor:
    if not isinstance(s, Tensor) or s.ndim < 3:
        shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"{name}: expected (B, K, *spatial) with at least one spatial dim, got {shape}")
    return s.flatten(2)


def _valid(flat: Tensor, valid: Tensor | None):
    """(B,1,N) bool mask of the positions that count and (B,1) their number; ``valid`` (B, *s) (e.g. the pixels of
    a letterboxed image that are not padding) or None for all."""
    if valid is None:
        return None, None
    m = valid.reshape(flat.shape[0], 1, -1).to(device=flat.device, dtype=torch.bool)
    if m.shape[2] != flat.shape[2]:
        raise ValueError(f"valid: expected {flat.shape[2]} positions per map, got {m.shape[2]}")
    return m, m.sum(2).clamp_min(1)


def mil_max(s: Tensor, valid: Tensor | None = None) -> Tensor:
    """max_ij s_ij: (B, K, *s) → (B, K); over the ``valid`` positions (B, *s) only when given."""
    flat = _check(s)
    m, _ = _valid(flat, valid)
    return (flat if m is None else flat.masked_fill(~m, float("-inf"))).amax(2)


def mil_mean(s: Tensor, valid: Tensor | None = None) -> Tensor:
    """(1/N) Σ_ij s_ij: (B, K, *s) → (B, K); over the ``valid`` positions (B, *s) only when given."""
    flat = _check(s)
    m, n = _valid(flat, valid)
    return flat.mean(2) if m is None else (flat * m).sum(2) / n


def mil_lse(s: Tensor, r: float = 5.0, valid: Tensor | None = None) -> Tensor:
    """Log-sum-exp pooling (1/r)·log((1/N) Σ_ij exp(r·s_ij)); r → ∞ gives max, r → 0 gives mean.

    Example:
        >>> s = torch.tensor([[[0.0, 1.0]]])
        >>> round(mil_lse(s, 1.0).item(), 4)   # log((1 + e)/2)
        0.6201
    """
    if r <= 0:
        raise ValueError(f"mil_lse: r must be > 0, got {r}")
    flat = _check(s)
    m, n = _valid(flat, valid)
    if m is None:
        big = (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r
        mean = flat.mean(2, keepdim=True)
    else:  # the mean over the valid positions only (padding contributes exp(-inf) = 0)
        big = (torch.logsumexp((r * flat).masked_fill(~m, float("-inf")), dim=2) - n.log()) / r
        mean = ((flat * m).sum(2) / n)[..., None]
    # small r: centre on the mean and use expm1/log1p, which keeps the r → 0 limit accurate in float32
    dev = (r * (flat - mean)).clamp(max=20.0)
    e = torch.expm1(dev)
    small = mean[..., 0] + torch.log1p(e.mean(2) if m is None else (e * m).sum(2) / n) / r
    top = flat.amax(2) if m is None else flat.masked_fill(~m, float("-inf")).amax(2)
    use_small = (r * (top - mean[..., 0])) < 20.0
    return torch.where(use_small, small, big)


def mil_topk(s: Tensor, k: int | float = 0.1, valid: Tensor | None = None) -> Tensor:
    """Mean of the k largest values; ``k`` an int count or a fraction in (0, 1] of the N positions.

    Example:
        >>> mil_topk(torch.tensor([[[1.0, 5.0, 3.0, 2.0]]]), 2)
        tensor([[4.]])
    """
    flat = _check(s)
    n = flat.shape[2]
    if isinstance(k, float) and not isinstance(k, bool):
        if not 0 < k <= 1:
            raise ValueError(f"mil_topk: a fractional k must lie in (0, 1], got {k}")
        kk = max(1, int(round(k * n)))
    else:
        kk = int(k)
        if not 1 <= kk <= n:
            raise ValueError(f"mil_topk: k must lie in [1, {n}], got {k}")
    m, nv = _valid(flat, valid)
    if m is None:
        return flat.topk(kk, dim=2).values.mean(2)
    # per image: the k largest of its valid positions (a fractional k of its valid count)
    kv = (k * nv).round().clamp_min(1) if isinstance(k, float) and not isinstance(k, bool) else \
        torch.full_like(nv, kk).minimum(nv)
    ranked = flat.masked_fill(~m, float("-inf")).sort(dim=2, descending=True).values
    take = torch.arange(n, device=flat.device)[None, None, :] < kv[..., None]
    return torch.where(take, ranked, torch.zeros_like(ranked)).sum(2) / kv


def mil_gem(q: Tensor, p: float = 3.0, eps: float = 1e-6, valid: Tensor | None = None) -> Tensor:
    """Generalised mean ((1/N) Σ_ij q_ij^p)^{1/p} of non-negative q (e.g. probabilities); p = 1 is the mean,
    p → ∞ the max. Values are clamped at ``eps`` (the p-th root has an infinite slope at 0).

    Example:
        >>> mil_gem(torch.tensor([[[0.0, 1.0]]]), p=1.0)
        tensor([[0.5000]])
    """
    if p <= 0:
        raise ValueError(f"mil_gem: p must be > 0, got {p}")
    flat = _check(q)
    if (flat < 0).any():
        raise ValueError("mil_gem expects non-negative maps (e.g. probabilities), got negative values")
    m, n = _valid(flat, valid)
    qp = flat.clamp_min(eps).pow(p)
    return (qp.mean(2) if m is None else (qp * m).sum(2) / n).pow(1.0 / p)


class AttentionMIL(nn.Module):
    """Attention-based MIL pooling (Ilse et al. 2018): a_i = softmax_i(wᵀ tanh(V h_i)), z = Σ_i a_i h_i.

    With ``gated=True``: a_i = softmax_i(wᵀ (tanh(V h_i) ⊙ sigmoid(U h_i))).

    Args:
        in_features: D, the feature size of an instance h_i (the channels of a (B, D, *s) map).
        hidden: L, the size of V h_i.

    ``forward(h)``: h (B, D, *s) maps (instances = positions) → z (B, D); ``bag(h)``: h (B, N, D) → z (B, D).
    The last attention weights (B, N) are kept in ``self.attention``.
    """

    def __init__(self, in_features: int, hidden: int = 64, gated: bool = False):
        super().__init__()
        self.in_features = in_features
        self.V = nn.Linear(in_features, hidden)
        self.U = nn.Linear(in_features, hidden) if gated else None
        self.w = nn.Linear(hidden, 1, bias=False)
        self.attention: Tensor | None = None

    def bag(self, inst: Tensor) -> Tensor:
        if inst.ndim != 3 or inst.shape[2] != self.in_features:
            raise ValueError(f"AttentionMIL.bag: expected (B, N, {self.in_features}), got {tuple(inst.shape)}")
        e = torch.tanh(self.V(inst))
        if self.U is not None:
            e = e * torch.sigmoid(self.U(inst))
        a = torch.softmax(self.w(e).squeeze(-1), dim=1)  # (B, N)
        self.attention = a
        return torch.einsum("bn,bnd->bd", a, inst)

    def forward(self, h: Tensor) -> Tensor:
        if h.ndim < 3 or h.shape[1] != self.in_features:
            raise ValueError(f"AttentionMIL: expected (B, {self.in_features}, *spatial), got {tuple(h.shape)}")
        return self.bag(h.flatten(2).transpose(1, 2))


def mil_pool(s: Tensor, method: str = "lse", *, r: float = 5.0, k: int | float = 0.1, p: float = 3.0,
             attention: AttentionMIL | None = None, valid: Tensor | None = None) -> Tensor:
    """Pool (B, K, *s) maps into (B, K) with ``method`` in max | mean | lse (r) | topk (k) | gem (p) | attention;
    with ``valid`` (B, *s) bool, over those positions only (padding of a letterboxed image is not part of the bag)."""
    if method == "max":
        return mil_max(s, valid)
    if method == "mean":
        return mil_mean(s, valid)
    if method == "lse":
        return mil_lse(s, r, valid)
    if method == "topk":
        return mil_topk(s, k, valid)
    if method == "gem":
        return mil_gem(s, p, valid=valid)
    if method == "attention":
        if attention is None:
            raise ValueError("mil_pool(method='attention') needs an AttentionMIL module")
        if valid is not None:
            raise ValueError("mil_pool(method='attention') does not take valid masks")
        return attention(s)
    raise ValueError(f"unknown MIL pooling {method!r}; expected one of {POOLINGS}")


def softmax_log_odds(logits: Tensor) -> Tensor:
    """Per-pixel log-odds of the softmax: log p_c − log(1 − p_c) = s_c − logsumexp_{k≠c} s_k, (B, K, *s).

    The binary logit of "pixel is class c" under a softmax network: max-pooling it gives the log-odds of the
    most confident pixel, which BCE against a tag can use directly.
    """
    k = logits.shape[1]
    if k < 2:
        raise ValueError(f"softmax_log_odds needs K >= 2 classes, got {k}")
    eye = torch.eye(k, dtype=torch.bool, device=logits.device).view(1, k, k, *([1] * (logits.ndim - 2)))
    others = logits.unsqueeze(1).expand(-1, k, -1, *logits.shape[2:]).masked_fill(eye, float("-inf"))
    return logits - torch.logsumexp(others, dim=2)


def mil_loss(image_scores: Tensor, tags: Tensor, *, probabilities: bool = False, classes: slice | None = None,
             reduction: str = "sum") -> Tensor:
    """Binary cross-entropy per class between pooled image scores (B, K) and multi-hot tags (B, K):

    L_b = (1/|C|) Σ_{c∈C} −[t_bc log σ(z_bc) + (1 − t_bc) log(1 − σ(z_bc))]  (z logits; or probabilities
    directly with ``probabilities=True``, e.g. after GeM on probabilities).

    ``classes``: the columns to supervise (e.g. ``slice(1, None)`` to leave out background).
    ``reduction``: ``"none"`` → L_b (B,), ``"mean"`` / ``"sum"`` → their mean / sum over the batch
    (:mod:`lightning_weakseg.losses`).

    Example:
        >>> z = torch.tensor([[0.0, 0.0]]); t = torch.tensor([[1.0, 0.0]])
        >>> round(mil_loss(z, t).item(), 4)   # log 2
        0.6931
    """
    check_reduction(reduction)
    if image_scores.ndim != 2 or image_scores.shape != tags.shape:
        raise ValueError(f"mil_loss: expected scores and tags of the same shape (B, K), got "
                         f"{tuple(image_scores.shape)} and {tuple(tags.shape)}")
    if classes is not None:
        image_scores, tags = image_scores[:, classes], tags[:, classes]
    tags = tags.to(image_scores.dtype)
    if probabilities:
        bce = F.binary_cross_entropy(image_scores.clamp(1e-6, 1 - 1e-6), tags, reduction="none")
    else:
        bce = F.binary_cross_entropy_with_logits(image_scores, tags, reduction="none")
    return reduce(bce.mean(1), reduction)


def tag_size_constraint(probs: Tensor, tags: Tensor, t: float | Tensor, a: float, b: float,
                        penalty: str = "log_barrier", reduction: str = "sum", valid: Tensor | None = None) -> Tensor:
    r"""Size bounds for the classes an image is tagged with (Kervadec et al., "Constrained-CNN losses for weakly
    supervised segmentation", MedIA 2019): :math:`a N \le \sum_i p_{ic} \le b N` for every tagged foreground
    class c, N the pixel count, as two penalised constraints divided by N:

    .. math::  L_b = \frac{1}{N}\sum_{c \ge 1,\, t_{bc}=1} \psi_t\big(aN - \textstyle\sum_i p_{ic}\big)
               + \psi_t\big(\textstyle\sum_i p_{ic} - bN\big)

    (ψ_t the log-barrier extension, or ``max(0, z)²`` with ``penalty="quadratic"``). MIL says *that* a class is
    present; the bounds say roughly how much of it, which stops both a single confident pixel (too small) and
    a class flooding the image (too large). Untagged classes are left to the MIL term.

    Args:
        probs: softmax probabilities (B, K, *spatial). tags: multi-hot (B, K); column 0 (background) is ignored.
        t: barrier parameter. a, b: bounds as fractions of the image, 0 <= a <= b <= 1.
        reduction: ``"none"`` → L_b (B,), ``"mean"`` / ``"sum"`` → their mean / sum over the batch
            (:mod:`lightning_weakseg.losses`).

    Example:
        >>> p = torch.tensor([[[[0.9, 0.9], [0.9, 0.9]], [[0.1, 0.1], [0.1, 0.1]]]])   # class 1: 0.4 of N = 4
        >>> tag_size_constraint(p, torch.tensor([[1.0, 1.0]]), 1.0, 0.2, 0.5, penalty="quadratic",
        ...                     reduction="none")                                     # (0.8-0.4)²/4
        tensor([0.0400])
    """
    check_reduction(reduction)
    if probs.ndim < 3 or tags.shape != probs.shape[:2]:
        raise ValueError(f"tag_size_constraint: expected probs (B, K, *spatial) and tags (B, K), got "
                         f"{tuple(probs.shape)} and {tuple(tags.shape)}")
    if not 0.0 <= a <= b <= 1.0:
        raise ValueError(f"tag_size_constraint: expected 0 <= a <= b <= 1, got a={a}, b={b}")
    if penalty not in ("log_barrier", "quadratic"):
        raise ValueError(f"penalty: expected 'log_barrier' or 'quadratic', got {penalty!r}")
    flat = probs.flatten(2)
    m, nv = _valid(flat, valid)
    n = probs[0, 0].numel() if m is None else nv                         # the image's pixels (padding not)
    size = (flat if m is None else flat * m).sum(2)[:, 1:]               # (B, K-1) soft pixel counts
    z = torch.stack([a * n - size, size - b * n], -1)
    pen = log_barrier(z, t) if penalty == "log_barrier" else quadratic_penalty(z)
    tagged = (tags[:, 1:] > 0.5).to(pen.dtype)
    return reduce((pen.sum(-1) * tagged).sum(1) / (n if m is None else n[:, 0]), reduction)


class MILPool(nn.Module):
    """Module form of :func:`mil_pool`; holds the AttentionMIL module when ``method="attention"``."""

    def __init__(self, method: str = "lse", num_classes: int | None = None, r: float = 5.0, k: int | float = 0.1,
                 p: float = 3.0, hidden: int = 64):
        super().__init__()
        if method not in POOLINGS:
            raise ValueError(f"unknown MIL pooling {method!r}; expected one of {POOLINGS}")
        self.method, self.r, self.k, self.p = method, r, k, p
        self.attention = None
        if method == "attention":
            if num_classes is None:
                raise ValueError("MILPool(method='attention') needs num_classes (the feature size)")
            self.attention = AttentionMIL(num_classes, hidden)

    def forward(self, s: Tensor, valid: Tensor | None = None) -> Tensor:
        return mil_pool(s, self.method, r=self.r, k=self.k, p=self.p, attention=self.attention, valid=valid)


class MILLoss(nn.Module):
    """Pool segmentation logits (B, K, *s) and apply :func:`mil_loss` against tags (B, K).

    Logits are turned into per-pixel softmax log-odds (``gem`` pools softmax probabilities instead and takes
    BCE on probabilities). ``background=False`` leaves column 0 out of the loss. ``reduction`` as in
    :func:`mil_loss`.
    """

    def __init__(self, method: str = "lse", num_classes: int | None = None, background: bool = False,
                 reduction: str = "sum", **kwargs):
        super().__init__()
        self.pool = MILPool(method, num_classes, **kwargs)
        self.background = background
        self.reduction = check_reduction(reduction)

    def image_scores(self, logits: Tensor, valid: Tensor | None = None) -> Tensor:
        if self.pool.method == "gem":
            return self.pool(logits.softmax(1), valid)
        return self.pool(softmax_log_odds(logits), valid)

    def forward(self, logits: Tensor, tags: Tensor, valid: Tensor | None = None) -> Tensor:
        """``valid`` (B,H,W) bool: pool over those pixels only (e.g. not over letterbox padding)."""
        if valid is not None and self.pool.method == "attention":
            valid = None  # attention pools learned features; padding is a constant region it learns to ignore
        return mil_loss(self.image_scores(logits, valid), tags, probabilities=self.pool.method == "gem",
                        classes=None if self.background else slice(1, None), reduction=self.reduction)
