"""CAM family: one class per method over a shared hook base; ``Method(model, target_layer)(x, class_idx)``."""
from .base import BaseCAM, ClassifierAdapter, logits_from_output, resolve_target_layer, default_target_layer
from .gradient import GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM
from .activation import CAM, ScoreCAM, EigenCAM

__all__ = ["BaseCAM", "ClassifierAdapter", "logits_from_output", "resolve_target_layer", "default_target_layer",
           "GradCAM", "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "HiResCAM", "CAM", "ScoreCAM", "EigenCAM"]
