"""CRF losses used inside training: gated CRF (Obukhov et al. 2019) and a windowed dense-CRF regulariser
(Tang et al., ECCV 2018). Batched, device-agnostic, differentiable with respect to the probabilities.

Both sum a bilateral Gaussian affinity

    K_ij = exp(−‖P_i − P_j‖² / 2σ_xy² − ‖I_i − I_j‖² / 2σ_rgb²)

over pairs (i, j) of pixels in a (2r+1)×(2r+1) window. The pairs are visited one window offset at a time on
shifted views of the whole batch (each offset is one batched tensor operation), and because K and the pair term
are symmetric only half of the offsets are visited and doubled. Memory stays O(B·K·H·W) — an ``unfold`` of the
window would hold (2r+1)² copies of the probabilities.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._reduction import check_reduction, reduce

__all__ = ["gated_crf_loss", "dense_crf_loss", "GatedCRFLoss", "DenseCRFLoss"]


def _check(probs: Tensor, image: Tensor, valid: Tensor | None, kernel_radius: int, downscale: int):
    if probs.ndim != 4:
        raise ValueError(f"expected probs of shape (B, K, H, W), got {tuple(probs.shape)}")
    if image.ndim != 4 or image.shape[0] != probs.shape[0] or image.shape[-2:] != probs.shape[-2:]:
        raise ValueError(f"expected image of shape (B, C, H, W) = ({probs.shape[0]}, C, {probs.shape[2]}, "
                         f"{probs.shape[3]}) to match probs, got {tuple(image.shape)}")
    if valid is not None and (valid.ndim != 3 or valid.shape != probs.shape[:1] + probs.shape[2:]):
        raise ValueError(f"expected valid of shape (B, H, W) = {(probs.shape[0],) + tuple(probs.shape[2:])}, "
                         f"got {tuple(valid.shape)}")
    if int(kernel_radius) < 1:
        raise ValueError(f"kernel_radius must be >= 1, got {kernel_radius}")
    if int(downscale) < 1:
        raise ValueError(f"downscale must be an integer >= 1, got {downscale}")


def _half_offsets(r: int):
    """Offsets (dy, dx) of a (2r+1)² window with (dy, dx) > (0, 0) lexicographically: one of each ± pair."""
    return [(dy, dx) for dy in range(0, r + 1) for dx in range(-r, r + 1) if dy > 0 or dx > 0]


def _pair_sums(probs, image, valid, kernel_radius, sigma_xy, sigma_rgb, downscale):
    """Per sample: Σ_{i≠j in window} K_ij m_i m_j (Σ_a p_i^a)(Σ_b p_j^b) − K_ij m_i m_j Σ_a p_i^a p_j^a, i.e. the
    disagreement Σ_{a≠b} p_i^a p_j^b, and the number of valid ordered pairs Σ m_i m_j (both (B,))."""
    b = probs.shape[0]
    image = image.to(probs.dtype)
    m = torch.ones_like(probs[:, 0]) if valid is None else valid.to(probs.dtype)
    if downscale > 1:
        probs = F.avg_pool2d(probs, downscale, ceil_mode=True)
        image = F.avg_pool2d(image, downscale, ceil_mode=True)
        # a coarse pixel is valid when at least half of its fine pixels are
        m = (F.avg_pool2d(m[:, None], downscale, ceil_mode=True)[:, 0] >= 0.5).to(probs.dtype)
    sxy = sigma_xy / downscale  # offsets are counted in coarse pixels
    r = int(kernel_radius)
    h, w = probs.shape[-2:]
    total = probs.sum(1)  # (B,H,W): 1 for softmax outputs, kept for generality
    loss = probs.new_zeros(b)
    pairs = probs.new_zeros(b)
    for dy, dx in _half_offsets(r):
        if dy >= h or abs(dx) >= w:
            continue
        # i ranges over a[y0:y1, x0:x1], j = i + (dy, dx)
        x0, x1 = max(0, -dx), w - max(0, dx)
        pi, pj = probs[..., 0:h - dy, x0:x1], probs[..., dy:h, x0 + dx:x1 + dx]
        ii, ij = image[..., 0:h - dy, x0:x1], image[..., dy:h, x0 + dx:x1 + dx]
        mij = m[..., 0:h - dy, x0:x1] * m[..., dy:h, x0 + dx:x1 + dx]
        k = torch.exp(-(ii - ij).pow(2).sum(1) / (2 * sigma_rgb ** 2)) * (
            torch.exp(torch.tensor(-(dy * dy + dx * dx) / (2 * sxy ** 2), dtype=probs.dtype, device=probs.device)))
        km = k * mij
        disagree = total[..., 0:h - dy, x0:x1] * total[..., dy:h, x0 + dx:x1 + dx] - (pi * pj).sum(1)
        loss = loss + 2 * (km * disagree).flatten(1).sum(1)
        pairs = pairs + 2 * mij.flatten(1).sum(1)
    return loss, pairs


def gated_crf_loss(probs: Tensor, image: Tensor, kernel_radius: int = 5, sigma_xy: float = 6.0,
                   sigma_rgb: float = 0.1, valid: Tensor | None = None, downscale: int = 1,
                   reduction: str = "sum") -> Tensor:
    r"""Gated CRF loss (Obukhov et al., 2019), per sample b:

    .. math::
        L_b = \frac{\sum_i \sum_{j \in N(i), j \ne i} K_{ij}\, m_i m_j \sum_{a \ne b} p_i^a p_j^b}
                 {\sum_i \sum_{j \in N(i), j \ne i} m_i m_j},\qquad
        K_{ij} = \exp\Big(-\frac{\|P_i-P_j\|^2}{2\sigma_{xy}^2} - \frac{\|I_i-I_j\|^2}{2\sigma_{rgb}^2}\Big)

    N(i) is the (2r+1)×(2r+1) window around i (pixels outside the image are not pairs), m the validity gate,
    P pixel positions, I the image (in [0, 1]: σ_rgb = 0.1 as in WSL4MIS; the points paper uses 10/255 with
    σ_xy = 10). Σ_{a≠b} p_i^a p_j^b is computed as (Σ_a p_i^a)(Σ_b p_j^b) − Σ_a p_i^a p_j^a.

    Args:
        probs: (B, K, H, W) class probabilities (softmax); gradients flow into them.
        image: (B, C, H, W) float image, any C (grayscale or RGB).
        kernel_radius: r of the window.
        sigma_xy: spatial bandwidth in full-resolution pixels.
        sigma_rgb: colour bandwidth in image units.
        valid: optional (B, H, W) bool/float gate m (e.g. 0 outside the field of view, padding).
        downscale: average-pool probs, image and gate by this factor first (speed; the window then spans
            r·downscale full-resolution pixels; σ_xy keeps its full-resolution meaning).
        reduction: ``"none"`` → :math:`L_b` (B,), each sample normalised by its own valid pairs; ``"mean"`` →
            :math:`\frac{1}{B}\sum_b L_b` (every sample weighs the same, whatever its number of valid pairs);
            ``"sum"`` → :math:`\sum_b L_b` (:mod:`lightning_weakseg.losses`).

    Example:
        >>> p = torch.tensor([[[[1., 0.], [1., 0.]], [[0., 1.], [0., 1.]]]])   # left column class 0
        >>> img = torch.zeros(1, 1, 2, 2)                                     # flat image
        >>> round(float(gated_crf_loss(p, img, kernel_radius=1, sigma_xy=1e9)), 4)  # 8 of 12 pairs disagree
        0.6667
    """
    check_reduction(reduction)
    _check(probs, image, valid, kernel_radius, downscale)
    loss, pairs = _pair_sums(probs, image, valid, kernel_radius, sigma_xy, sigma_rgb, int(downscale))
    return reduce(loss / pairs.clamp_min(1), reduction)


def dense_crf_loss(probs: Tensor, image: Tensor, kernel_radius: int = 5, sigma_xy: float = 6.0,
                   sigma_rgb: float = 0.1, valid: Tensor | None = None, downscale: int = 1,
                   reduction: str = "sum") -> Tensor:
    r"""Dense-CRF regularised loss (Tang et al., ECCV 2018), windowed, per sample b:

    .. math::
        R_b(p) = \frac{1}{|\Omega_b|} \sum_k p_k^\top W (1 - p_k),\qquad W_{ij} = K_{ij} m_i m_j\ (i \ne j,\ j \in N(i))

    Tang et al. evaluate the fully connected W with a permutohedral lattice; here W is restricted to the
    (2r+1)² window (for softmax p, Σ_k p_i^k (1 − p_j^k) = Σ_{a≠b} p_i^a p_j^b, so the numerator equals the
    gated CRF's). Each sample is normalised by its own number of valid pixels |Ω_b|; ``reduction``: ``"none"`` →
    :math:`R_b` (B,), ``"mean"`` → :math:`\frac{1}{B}\sum_b R_b`, ``"sum"`` (default) → :math:`\sum_b R_b`
    (:mod:`lightning_weakseg.losses`).

    Example:
        >>> p = torch.tensor([[[[1., 0.], [1., 0.]], [[0., 1.], [0., 1.]]]])
        >>> float(dense_crf_loss(p, torch.zeros(1, 1, 2, 2), kernel_radius=1, sigma_xy=1e9))  # 8 pairs / 4 px
        2.0
    """
    check_reduction(reduction)
    _check(probs, image, valid, kernel_radius, downscale)
    ds = int(downscale)
    loss, _ = _pair_sums(probs, image, valid, kernel_radius, sigma_xy, sigma_rgb, ds)
    m = torch.ones_like(probs[:, 0]) if valid is None else valid.to(probs.dtype)
    if ds > 1:
        m = (F.avg_pool2d(m[:, None], ds, ceil_mode=True)[:, 0] >= 0.5).to(probs.dtype)
    n = m.flatten(1).sum(1)
    return reduce(loss / n.clamp_min(1), reduction)


class GatedCRFLoss(nn.Module):
    """Module form of :func:`gated_crf_loss`; stores the hyper-parameters."""

    def __init__(self, kernel_radius: int = 5, sigma_xy: float = 6.0, sigma_rgb: float = 0.1, downscale: int = 1,
                 reduction: str = "sum"):
        super().__init__()
        self.kernel_radius, self.sigma_xy, self.sigma_rgb = kernel_radius, sigma_xy, sigma_rgb
        self.downscale, self.reduction = downscale, check_reduction(reduction)

    def forward(self, probs: Tensor, image: Tensor, valid: Tensor | None = None) -> Tensor:
        return gated_crf_loss(probs, image, self.kernel_radius, self.sigma_xy, self.sigma_rgb, valid,
                              self.downscale, self.reduction)


class DenseCRFLoss(GatedCRFLoss):
    """Module form of :func:`dense_crf_loss`; stores the hyper-parameters."""

    def forward(self, probs: Tensor, image: Tensor, valid: Tensor | None = None) -> Tensor:
        return dense_crf_loss(probs, image, self.kernel_radius, self.sigma_xy, self.sigma_rgb, valid,
                              self.downscale, self.reduction)
