"""Gradient-based CAM methods: Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM.

Notation: A^k the target layer's channel k (B, C, *s), g^k = ∂y^c/∂A^k with y^c the class logit.
Every method returns ReLU(map), then ``__call__`` upsamples to the input size and min–max normalises.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import BaseCAM, spatial_sum, weighted_sum

__all__ = ["GradCAM", "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "HiResCAM"]


class GradCAM(BaseCAM):
    """Grad-CAM (Selvaraju et al. 2017): α_k = mean_ij g^k_ij, M = ReLU(Σ_k α_k A^k).

    Example:
        >>> import segmentation_models_pytorch as smp, torch
        >>> net = smp.create_model("Unet", "resnet18", encoder_weights=None, classes=2, aux_params={"classes": 3})
        >>> GradCAM(net)(torch.rand(2, 3, 64, 64), class_idx=1).shape
        torch.Size([2, 64, 64])
    """

    def raw_cam(self, x: Tensor, act: Tensor, grad: Tensor, idx: Tensor) -> Tensor:
        return weighted_sum(grad.mean(dim=tuple(range(2, grad.ndim))), act)


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ (Chattopadhay et al. 2018), first-order form (as pytorch-grad-cam):

    α^k_ij = g²/(2g² + Σ_ab A^k_ab · g³ + ε) (0 where g = 0), w_k = Σ_ij α^k_ij ReLU(g^k_ij),
    M = ReLU(Σ_k w_k A^k), ε = 1e-6.
    """

    eps = 1e-6

    def raw_cam(self, x: Tensor, act: Tensor, grad: Tensor, idx: Tensor) -> Tensor:
        g2 = grad * grad
        g3 = g2 * grad
        alpha = g2 / (2 * g2 + spatial_sum(act, keepdim=True) * g3 + self.eps)
        alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
        return weighted_sum(spatial_sum(alpha * torch.relu(grad)), act)


class XGradCAM(BaseCAM):
    """XGrad-CAM (Fu et al. 2020): w_k = Σ_ij (A^k_ij / (Σ_ab A^k_ab + ε)) g^k_ij, M = ReLU(Σ_k w_k A^k), ε = 1e-7."""

    eps = 1e-7

    def raw_cam(self, x: Tensor, act: Tensor, grad: Tensor, idx: Tensor) -> Tensor:
        weights = spatial_sum(grad * act / (spatial_sum(act, keepdim=True) + self.eps))
        return weighted_sum(weights, act)


class LayerCAM(BaseCAM):
    """LayerCAM (Jiang et al. 2021): M = ReLU(Σ_k ReLU(g^k) ⊙ A^k) (element-wise weights)."""

    def raw_cam(self, x: Tensor, act: Tensor, grad: Tensor, idx: Tensor) -> Tensor:
        return (torch.relu(grad) * act).sum(1)


class HiResCAM(BaseCAM):
    """HiResCAM (Draelos & Carin 2020): M = ReLU(Σ_k g^k ⊙ A^k)."""

    def raw_cam(self, x: Tensor, act: Tensor, grad: Tensor, idx: Tensor) -> Tensor:
        return (grad * act).sum(1)
