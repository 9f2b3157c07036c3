"""Activation-based CAM methods (no gradient needed): CAM, Score-CAM, Eigen-CAM."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BaseCAM, logits_from_output, weighted_sum

__all__ = ["CAM", "ScoreCAM", "EigenCAM"]


class CAM(BaseCAM):
    """CAM (Zhou et al. 2016): M = Σ_k w_k^c A^k, w^c the row of the linear layer that follows global
    average pooling of the target layer.

    Args:
        fc_layer: that linear layer (module or dotted name); ``None`` picks the last ``nn.Linear`` of the
            model whose ``in_features`` equals the target layer's channel count.
    """

    uses_gradients = False

    def __init__(self, model: nn.Module, target_layer: nn.Module | str | None = None, *,
                 fc_layer: nn.Module | str | None = None, differentiable: bool = False, eval_mode: bool = True):
        super().__init__(model, target_layer, differentiable=differentiable, eval_mode=eval_mode)
        if isinstance(fc_layer, str):
            fc_layer = model.get_submodule(fc_layer)
        if fc_layer is not None and not isinstance(fc_layer, nn.Linear):
            raise TypeError(f"fc_layer must be an nn.Linear, got {type(fc_layer).__name__}")
        self.fc_layer = fc_layer

    def _fc(self, channels: int) -> nn.Linear:
        if self.fc_layer is not None:
            fc = self.fc_layer
        else:
            cands = [m for m in self.model.modules() if isinstance(m, nn.Linear) and m.in_features == channels]
            if not cands:
                raise ValueError(f"CAM found no nn.Linear with in_features={channels} (the target layer's channels); "
                                 "pass fc_layer")
            fc = cands[-1]
        if fc.in_features != channels:
            raise ValueError(f"fc_layer has in_features={fc.in_features}, expected the target layer's {channels} channels")
        return fc

    def raw_cam(self, x: Tensor, act: Tensor, grad: None, idx: Tensor) -> Tensor:
        weight = self._fc(act.shape[1]).weight
        if not self.differentiable:
            weight = weight.detach()
        return weighted_sum(weight[idx].to(act.dtype), act)


class ScoreCAM(BaseCAM):
    """Score-CAM (Wang et al. 2020): H^k = minmax(upsample(A^k)) (bilinear, align_corners=True, as
    pytorch-grad-cam), s_k = y^c(x ⊙ H^k) the raw class logit, M = ReLU(Σ_k softmax_k(s) A^k).

    Batched: all (sample, channel) masked inputs go through the model ``batch_size`` at a time, under
    inference mode. Two savings:

    * exact — a constant channel (e.g. all zero after ReLU) gives the all-zero mask, whose score is
      computed once; the softmax normalisation is a per-sample constant that min–max removes anyway.
    * approximate, ``mass_tol > 0`` — per sample, channels are sorted by their activation mass Σ_ij A^k_ij
      and only the smallest set holding a fraction ≥ 1 − mass_tol of the total mass is scored; the other
      channels get weight 0. ``mass_tol=0`` (default) reproduces Score-CAM.
    """

    uses_gradients = False
    supports_differentiable = False

    def __init__(self, model: nn.Module, target_layer: nn.Module | str | None = None, *, batch_size: int = 64,
                 mass_tol: float = 0.0, eval_mode: bool = True):
        super().__init__(model, target_layer, eval_mode=eval_mode)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= mass_tol < 1.0:
            raise ValueError(f"mass_tol must lie in [0, 1), got {mass_tol}")
        self.batch_size = batch_size
        self.mass_tol = mass_tol
        self.last_num_forward = 0  # masked forward passes of the last call (for benchmarks)

    def selected_channels(self, act: Tensor) -> Tensor:
        """(B, C) bool: channels that are scored (non-constant and within the kept activation mass)."""
        flat = act.flatten(2)
        keep = (flat.amax(2) - flat.amin(2)) > 0
        if self.mass_tol > 0:
            mass = flat.abs().sum(2)
            order = mass.argsort(1, descending=True)
            sorted_mass = mass.gather(1, order)
            before = sorted_mass.cumsum(1) - sorted_mass  # mass of the strictly larger channels
            needed = before < (1 - self.mass_tol) * mass.sum(1, keepdim=True)
            keep_mass = torch.zeros_like(keep).scatter(1, order, needed)
            keep &= keep_mass
        return keep

    def raw_cam(self, x: Tensor, act: Tensor, grad: None, idx: Tensor) -> Tensor:
        b, c = act.shape[:2]
        size = tuple(x.shape[2:])
        mode = "bilinear" if len(size) == 2 else "trilinear"
        flat = act.flatten(2)
        lo, span = flat.amin(2), flat.amax(2) - flat.amin(2)
        scored = self.selected_channels(act)
        constant = span <= 0
        scores = torch.full((b, c), float("-inf"), dtype=act.dtype, device=act.device)
        n_forward = 0
        with torch.inference_mode():
            if constant.any():  # mask ≡ 0: one forward of a zero image serves every such channel
                zero_logits = logits_from_output(self.model(torch.zeros_like(x[:1])))[0]
                scores = torch.where(constant, zero_logits[idx][:, None].to(act.dtype), scores)
                n_forward += 1
            pairs = scored.nonzero()
            for chunk in pairs.split(self.batch_size):
                bi, ki = chunk[:, 0], chunk[:, 1]
                up = F.interpolate(act[bi, ki].unsqueeze(1), size=size, mode=mode, align_corners=True)
                shape = (-1, 1, *([1] * len(size)))
                mask = (up - lo[bi, ki].view(shape)) / (span[bi, ki].view(shape) + 1e-8)
                logits = logits_from_output(self.model(x[bi] * mask))
                scores[bi, ki] = logits.gather(1, idx[bi][:, None])[:, 0].to(act.dtype)
                n_forward += len(chunk)
        self.last_num_forward = n_forward
        # channels neither scored nor constant (skipped by mass_tol) keep -inf → weight 0
        weights = torch.softmax(scores, dim=1)
        weights = torch.nan_to_num(weights, nan=0.0)
        return weighted_sum(weights.clone(), act)


class EigenCAM(BaseCAM):
    """Eigen-CAM (Muhammad & Yeasin 2020), class-agnostic: A reshaped to (HW, C), centred over HW,
    projected on its first right singular vector. The SVD's sign is arbitrary; it is fixed so that the map
    correlates positively with the channel-mean activation (pytorch-grad-cam leaves it free: compare up
    to sign). ``class_idx`` is accepted and ignored.
    """

    uses_gradients = False

    def raw_cam(self, x: Tensor, act: Tensor, grad: None, idx: Tensor) -> Tensor:
        feats = torch.nan_to_num(act).flatten(2).transpose(1, 2)  # (B, N, C)
        feats = feats - feats.mean(1, keepdim=True)
        _, _, vh = torch.linalg.svd(feats, full_matrices=False)
        proj = (feats @ vh[:, 0, :, None])[..., 0]  # (B, N)
        mean_act = act.flatten(2).mean(1)
        corr = ((proj - proj.mean(1, keepdim=True)) * (mean_act - mean_act.mean(1, keepdim=True))).sum(1)
        sign = torch.where(corr < 0, -1.0, 1.0).to(proj.dtype)
        return (proj * sign[:, None]).view(act.shape[0], *act.shape[2:])
