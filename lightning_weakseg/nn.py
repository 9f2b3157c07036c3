"""Small model utilities."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["replace_batchnorm"]


def replace_batchnorm(module: nn.Module, norm: str = "group", groups: int = 8) -> nn.Module:
    """Replace every BatchNorm2d/3d in ``module`` (in place) by a batch-independent normalisation.

    ``"group"``: GroupNorm with ``gcd(groups, C)`` groups; ``"instance"``: GroupNorm with C groups (instance norm
    with affine parameters); ``"frozen"``: keep BatchNorm but always use running statistics (eval mode, no update).
    Batch-independent norms make a 2-process DDP step equal a 1-process step on the same global batch
    (BatchNorm statistics are per rank, and SyncBatchNorm has no CPU kernel)."""
    import math

    if norm == "batch":
        return module
    if norm not in ("group", "instance", "frozen"):
        raise ValueError(f"norm must be 'batch', 'group', 'instance' or 'frozen', got {norm!r}")
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.BatchNorm2d, nn.BatchNorm3d)):
            c = child.num_features
            if norm == "frozen":
                child.track_running_stats = True
                child.momentum = 0.0  # running statistics never move
                child.forward = _frozen_forward(child)
            else:
                g = c if norm == "instance" else math.gcd(groups, c)
                setattr(module, name, nn.GroupNorm(g, c, affine=True))
        else:
            replace_batchnorm(child, norm, groups)
    return module


def _frozen_forward(bn):
    import torch.nn.functional as F

    def forward(x):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return forward
