"""Benchmark-only reference modules (not part of the library).

``OracleSelectionSegModule``: plain CE on the noisy mask with every WRONG pixel ignored — it needs the clean mask,
so no real method can do it. It bounds what any pixel-selection method (co-teaching and variants) can reach on a
given noisy training set and budget: the gap between it and clean supervision is the part of the noise that
selection cannot undo (objects that vanished leave their pixels unlabelled, not relabelled).
"""
from __future__ import annotations

from lightning_weakseg.module import WeakSegModule


class OracleSelectionSegModule(WeakSegModule):
    """``mask_key`` = the noisy mask; pixels where it differs from ``batch["mask"]`` become ignore (255)."""

    def loss_terms(self, batch, out):
        key = self.hparams.mask_key
        if key in batch and "mask" in batch:
            batch = dict(batch)
            noisy = batch[key].clone()
            noisy[noisy != batch["mask"]] = self.ignore_index
            batch[key] = noisy
        return super().loss_terms(batch, out)
