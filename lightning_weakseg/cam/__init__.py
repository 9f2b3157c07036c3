"""lightning_weakseg.cam"""
from .base import BaseCAM, ClassifierAdapter, logits_from_output, resolve_target_layer, default_target_layer
from .gradient import GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM
from .activation import CAM, ScoreCAM, EigenCAM
