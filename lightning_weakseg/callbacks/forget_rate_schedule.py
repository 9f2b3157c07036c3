"""The co-teaching forget-rate schedule (Han et al., NeurIPS 2018) as a callback whose state lives in the checkpoint."""
from __future__ import annotations

from typing import Any

import lightning as L

from ..losses.coteaching import coteaching_keep_ratio

__all__ = ["ForgetRateSchedule"]


class ForgetRateSchedule(L.Callback):
    r"""Sets ``pl_module.keep_ratio`` = :math:`R(T) = 1 - \min(T^c / T_k \cdot \tau, \tau)` at the start of every
    training epoch (``T`` the 0-based epoch) and logs it as ``train/keep_ratio``.

    Args:
        forget_rate: τ, or a list of τ per class (then ``keep_ratio`` is a tuple, logged per class as
            ``train/keep_ratio_c{c}``); ``None`` takes the module's ``hparams.forget_rate``.
        num_gradual: T_k in epochs; ``None`` takes ``hparams.num_gradual``.
        exponent: c; ``None`` takes ``hparams.exponent``.

    The resolved τ, T_k, c, the last epoch and keep ratio go into the checkpoint; on resume the checkpoint
    wins over the constructor arguments (as EarlyStopping restores its patience), so a resumed run continues
    the schedule it started with.

    Example:
        >>> cb = ForgetRateSchedule(forget_rate=0.5, num_gradual=4, exponent=1.0)
        >>> [cb.keep_ratio_at(t) for t in range(6)]
        [1.0, 0.875, 0.75, 0.625, 0.5, 0.5]
    """

    def __init__(self, forget_rate: float | list[float] | None = None, num_gradual: int | None = None,
                 exponent: float | None = None):
        super().__init__()
        self.forget_rate, self.num_gradual, self.exponent = forget_rate, num_gradual, exponent
        if None not in (forget_rate, num_gradual, exponent):
            coteaching_keep_ratio(0, forget_rate, num_gradual, exponent)
        self.epoch: int | None = None
        self.keep_ratio: float | None = None

    def _resolve(self, pl_module: L.LightningModule) -> None:
        hp = getattr(pl_module, "hparams", {}) or {}
        for name, default in (("forget_rate", 0.3), ("num_gradual", 10), ("exponent", 1.0)):
            if getattr(self, name) is None:
                setattr(self, name, hp.get(name, default))
        coteaching_keep_ratio(0, self.forget_rate, self.num_gradual, self.exponent)

    def keep_ratio_at(self, epoch: int) -> float | tuple[float, ...]:
        if None in (self.forget_rate, self.num_gradual, self.exponent):
            raise RuntimeError("ForgetRateSchedule: forget_rate/num_gradual/exponent not resolved yet "
                               "(they come from the module at fit start)")
        return coteaching_keep_ratio(epoch, self.forget_rate, self.num_gradual, self.exponent)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve(pl_module)
        self.epoch = int(trainer.current_epoch)
        self.keep_ratio = self.keep_ratio_at(self.epoch)
        pl_module.keep_ratio = self.keep_ratio
        if isinstance(self.keep_ratio, tuple):  # one forget rate per class
            for c, r in enumerate(self.keep_ratio):
                pl_module.log(f"train/keep_ratio_c{c}", r, on_step=False, on_epoch=True)
        else:
            pl_module.log("train/keep_ratio", self.keep_ratio, on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        def plain(v):  # lists of floats in the checkpoint (torch.load with weights_only accepts them)
            return [float(x) for x in v] if isinstance(v, (list, tuple)) else v
        return {"forget_rate": plain(self.forget_rate), "num_gradual": self.num_gradual, "exponent": self.exponent,
                "epoch": self.epoch, "keep_ratio": plain(self.keep_ratio)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("forget_rate", "num_gradual", "exponent", "epoch", "keep_ratio"):
            if key in state_dict:
                v = state_dict[key]
                setattr(self, key, tuple(v) if key == "keep_ratio" and isinstance(v, list) else v)
