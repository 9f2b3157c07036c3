"""``LogBarrierSchedule``: grow the log-barrier parameter t geometrically with the epoch."""
from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["LogBarrierSchedule"]


class LogBarrierSchedule(Callback):
    r"""Set :math:`t = \min(t_0 \mu^{e}, t_{max})` on the module at the start of every training epoch e.

    Kervadec et al. start at :math:`t_0 = 5` and multiply by :math:`\mu = 1.1` per epoch, so the barrier
    :math:`\psi_t` tightens toward the hard constraint as training goes on.

    * **Same t on every DDP rank**: t is a pure function of ``trainer.current_epoch`` (identical on all ranks),
      no communication needed.
    * **Checkpoints**: ``state_dict`` holds ``t0``, ``mu``, ``t_max`` and the last t; when a run resumes, the
      restored values replace the constructor's (as Lightning's own callbacks do) and, because the epoch
      counter is restored too, t continues where it stopped.
    * **Visible to the mixins**: the value is written to ``pl_module.<attr>`` (default ``barrier_t``, owned by
      :class:`~lightning_weakseg.regimes.BarrierMixin` and read by every constraint term: boxes, tag sizes) and
      logged as ``train/barrier_t``.

    Args:
        t0: initial t (> 0).
        mu: factor per epoch (>= 1).
        t_max: optional cap.
        attr: module attribute to set.

    Example:
        >>> LogBarrierSchedule(t0=5, mu=1.1).t_at(2)
        6.050000000000001
    """

    def __init__(self, t0: float = 5.0, mu: float = 1.1, t_max: float | None = None, attr: str = "barrier_t"):
        super().__init__()
        if not (math.isfinite(t0) and t0 > 0):
            raise ValueError(f"LogBarrierSchedule: expected t0 > 0, got {t0}")
        if not (math.isfinite(mu) and mu >= 1):
            raise ValueError(f"LogBarrierSchedule: expected mu >= 1, got {mu}")
        if t_max is not None and t_max < t0:
            raise ValueError(f"LogBarrierSchedule: expected t_max >= t0, got t_max={t_max}, t0={t0}")
        self.t0, self.mu, self.t_max, self.attr = float(t0), float(mu), t_max, attr
        self.t = float(t0)

    def t_at(self, epoch: int) -> float:
        t = self.t0 * self.mu ** int(epoch)
        return min(t, float(self.t_max)) if self.t_max is not None else t

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        self.t = self.t_at(trainer.current_epoch)
        setattr(pl_module, self.attr, self.t)
        return self.t

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning restored its loops: a run resumed in the middle of an epoch gets no
        # on_train_epoch_start for that epoch, and at on_fit_start the epoch counter is not restored yet
        self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        t = self._apply(trainer, pl_module)
        pl_module.log("train/barrier_t", t, on_step=False, on_epoch=True, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"t0": self.t0, "mu": self.mu, "t_max": self.t_max, "t": self.t}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.t0 = float(state_dict["t0"])
        self.mu = float(state_dict["mu"])
        self.t_max = state_dict.get("t_max")
        self.t = float(state_dict["t"])
