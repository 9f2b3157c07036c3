"""The one ``reduction`` convention of :mod:`lightning_weakseg.losses` (see the package docstring)."""
from __future__ import annotations

from torch import Tensor

__all__ = ["REDUCTIONS", "check_reduction", "reduce"]

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str, name: str = "reduction") -> str:
    """``reduction`` if it is one of ``"none"``, ``"mean"``, ``"sum"``; a ``ValueError`` naming what came otherwise."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """Per-sample values (B,) as they are (``"none"``), their mean over the batch (``"mean"``) or their sum
    (``"sum"``).

    Example:
        >>> import torch
        >>> v = torch.tensor([1.0, 2.0, 6.0])
        >>> reduce(v, "none"), reduce(v, "mean"), reduce(v, "sum")
        (tensor([1., 2., 6.]), tensor(3.), tensor(9.))
    """
    check_reduction(reduction)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()
