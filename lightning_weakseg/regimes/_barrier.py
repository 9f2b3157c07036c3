"""The log-barrier parameter t of a module: one value, one owner, shared by every constraint term.

Kervadec et al., "Constrained deep networks: Lagrangian optimization via log-barrier extensions" (2019): the
constraint terms use :math:`\\psi_t`, and t grows during training
(:class:`~lightning_weakseg.callbacks.LogBarrierSchedule`).
"""
from __future__ import annotations

import math

__all__ = ["BarrierMixin", "DEFAULT_BARRIER_T0"]

DEFAULT_BARRIER_T0 = 5.0
CHECKPOINT_KEY = "weakseg_barrier_t"


class BarrierMixin:
    """Owns ``barrier_t``, the t of the log-barrier extension that every constraint term of the module reads
    (``box/tightness``, ``box/emptiness`` with ``"barrier"``, ``box/size``, ``tags/size``).

    A module has one t and one schedule, whatever regimes it composes: the regimes that read t derive from this
    mixin (it appears once in any composition) and ask for their starting value with :meth:`start_barrier_t`
    under their hyper-parameter's name (``box_t0``, ``tag_t0``). Two regimes of one composition that ask for
    different starting values are an error, not a question of which base comes first.

    ``barrier_t`` is a float that :class:`~lightning_weakseg.callbacks.LogBarrierSchedule` sets each epoch. It is
    also part of the checkpoint (``checkpoint["weakseg_barrier_t"]``) and restored on load, so a module loaded
    or resumed without the schedule goes on with its last t.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._barrier_t0: dict[str, float] = {}
        self.barrier_t = DEFAULT_BARRIER_T0

    def start_barrier_t(self, name: str, t0: float) -> None:
        """Set the starting t on behalf of the hyper-parameter ``name``; raises a ``ValueError`` if another
        regime of this module asked for a different one."""
        t0 = float(t0)
        if not (math.isfinite(t0) and t0 > 0):
            raise ValueError(f"{name}: expected a finite barrier t > 0, got {t0}")
        other = {n: v for n, v in self._barrier_t0.items() if n != name and v != t0}
        if other:
            given = ", ".join(f"{n}={v}" for n, v in other.items())
            raise ValueError(f"{name}={t0} and {given} both set the starting log-barrier t of "
                             f"{type(self).__name__}, which has one t for all its constraint terms: give them "
                             "the same value")
        self._barrier_t0[name] = t0
        self.barrier_t = t0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = float(self.barrier_t)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if CHECKPOINT_KEY in checkpoint:
            self.barrier_t = float(checkpoint[CHECKPOINT_KEY])
