"""Fully connected CRF refinement of a probability map (Krähenbühl & Koltun 2011) with pydensecrf2.

Offline only (NumPy in, NumPy out): used to refine CAM seeds (image tags) and model predictions (points
self-training) before they become pseudo labels.
"""
from __future__ import annotations

import numpy as np

from ..errors import WeakSegDataError

__all__ = ["dense_crf"]


def dense_crf(image, probs, iterations: int = 5, sxy_gaussian: float = 3, compat_gaussian: float = 3,
              sxy_bilateral: float = 50, srgb: float = 13, compat_bilateral: float = 10,
              eps: float = 1e-8) -> np.ndarray:
    """Mean-field inference of a dense CRF with unary −log p, a Gaussian (smoothness) kernel and a bilateral
    (appearance) kernel exp(−‖P_i−P_j‖²/2·sxy² − ‖I_i−I_j‖²/2·srgb²) with Potts compatibilities.

    Args:
        image: (H, W) or (H, W, C) uint8; grayscale (or C = 1) is replicated to 3 channels, C > 3 keeps the
            first 3.
        probs: (K, H, W) float probabilities (each pixel sums to 1; clipped at ``eps`` before the log).
        iterations: mean-field iterations (5–10).
        sxy_gaussian, compat_gaussian: smoothness kernel (pixels, weight).
        sxy_bilateral, srgb, compat_bilateral: appearance kernel (pixels, grey levels, weight).

    Returns:
        (K, H, W) float32 refined probabilities.

    Example:
        >>> img = np.zeros((8, 8), np.uint8); img[:, 4:] = 255
        >>> p = np.full((2, 8, 8), 0.5, np.float32); p[1, :, 4:] = 0.6; p[0, :, 4:] = 0.4
        >>> q = dense_crf(img, p)
        >>> bool(q[1, :, 4:].mean() > 0.6)
        True
    """
    import pydensecrf.densecrf as dcrf

    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    if hasattr(probs, "detach"):
        probs = probs.detach().cpu().numpy()
    img = np.asarray(image)
    p = np.asarray(probs)
    if img.dtype != np.uint8:
        raise WeakSegDataError(f"expected a uint8 image, got {img.dtype}", field="image")
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3:
        raise WeakSegDataError(f"expected image (H, W) or (H, W, C), got shape {tuple(np.shape(image))}",
                               field="image")
    if img.shape[2] < 3:
        img = np.repeat(img[..., :1], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3])
    if p.ndim != 3 or p.shape[1:] != img.shape[:2]:
        raise ValueError(f"expected probs of shape (K, H, W) = (K, {img.shape[0]}, {img.shape[1]}), "
                         f"got {tuple(p.shape)}")
    k, h, w = p.shape
    if k < 2:
        raise ValueError(f"expected at least 2 classes, got K = {k}")
    unary = np.ascontiguousarray(-np.log(np.clip(p.astype(np.float32), eps, 1.0)).reshape(k, -1))
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=sxy_gaussian, compat=compat_gaussian)
    crf.addPairwiseBilateral(sxy=sxy_bilateral, srgb=srgb, rgbim=img, compat=compat_bilateral)
    q = crf.inference(int(iterations))
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)
