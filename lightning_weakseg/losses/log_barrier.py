"""Log-barrier extension and quadratic penalty for inequality constraints ``z <= 0``.

Kervadec et al., "Constrained deep networks: Lagrangian optimization via log-barrier extensions".
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["log_barrier", "quadratic_penalty", "LogBarrier", "QuadraticPenalty"]


def _check_t(t) -> None:
    if isinstance(t, Tensor):
        # A tensor t is allowed (e.g. a per-constraint schedule); only cheap host-side checks here.
        if t.device.type == "cpu" and not bool((t > 0).all()):
            raise ValueError(f"log_barrier: expected t > 0, got a tensor with min {t.min().item()}")
    elif not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"log_barrier: expected a finite number t > 0, got {t!r}")


def log_barrier(z: Tensor, t: float | Tensor) -> Tensor:
    r"""Elementwise log-barrier extension :math:`\psi_t(z)` of the constraint :math:`z \le 0`.

    .. math::

        \psi_t(z) = \begin{cases}
            -\frac{1}{t}\log(-z) & z \le -\frac{1}{t^2} \\
            t z - \frac{1}{t}\log\frac{1}{t^2} + \frac{1}{t} & \text{otherwise}
        \end{cases}

    The two branches meet at :math:`z = -1/t^2` with equal value and equal derivative (:math:`t`), so
    :math:`\psi_t` is C¹ and defined for every real z (a violated constraint gets the linear branch, whose
    slope t grows with the schedule). The logarithm is evaluated on a guarded argument so that
    ``torch.where`` never back-propagates a NaN/inf from the branch it does not select.

    Args:
        z: constraint values, any shape, floating point.
        t: barrier parameter (> 0), a number or a tensor broadcastable to ``z``.

    Returns:
        Tensor of the shape of ``z`` (broadcast with ``t``).

    Example:
        >>> z = torch.tensor([-1.0, -0.04, 0.0, 2.0])
        >>> log_barrier(z, 5.0)
        tensor([-0.0000,  0.6438,  0.8438, 10.8438])
    """
    if not isinstance(z, Tensor):
        raise TypeError(f"log_barrier: expected z to be a Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"log_barrier: expected a floating point z, got dtype {z.dtype}")
    _check_t(t)
    if not isinstance(t, Tensor):
        t = torch.tensor(float(t), dtype=z.dtype, device=z.device)
    else:
        t = t.to(device=z.device, dtype=z.dtype)
    junction = -1.0 / (t * t)
    on_log_branch = z <= junction
    # Guard: outside the log branch feed log() a harmless value (the junction point), not z.
    safe_neg_z = torch.where(on_log_branch, -z, -junction)
    log_branch = -torch.log(safe_neg_z) / t
    linear_branch = t * z - torch.log(-junction) / t + 1.0 / t
    return torch.where(on_log_branch, log_branch, linear_branch)


def quadratic_penalty(z: Tensor) -> Tensor:
    r"""Elementwise quadratic penalty :math:`\max(0, z)^2` of the constraint :math:`z \le 0`.

    The classic penalty alternative to :func:`log_barrier`: zero (and zero gradient) when the constraint
    holds, growing quadratically with the violation. It has no parameter to schedule.

    Example:
        >>> quadratic_penalty(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
        tensor([0.0000, 0.0000, 0.2500, 4.0000])
    """
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise TypeError(f"quadratic_penalty: expected a floating point Tensor, got {type(z).__name__}")
    return torch.relu(z).square()


class LogBarrier(nn.Module):
    """Module form of :func:`log_barrier`; ``t`` is an attribute that a schedule may change."""

    def __init__(self, t: float = 5.0) -> None:
        super().__init__()
        _check_t(t)
        self.t = float(t)

    def forward(self, z: Tensor) -> Tensor:
        return log_barrier(z, self.t)

    def extra_repr(self) -> str:
        return f"t={self.t}"


class QuadraticPenalty(nn.Module):
    """Module form of :func:`quadratic_penalty`."""

    def forward(self, z: Tensor) -> Tensor:
        return quadratic_penalty(z)
