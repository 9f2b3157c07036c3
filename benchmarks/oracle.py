"""Benchmark-only reference modules (not part of the library).

``OracleSelectionSegModule``: plain CE on the noisy mask with every WRONG pixel ignored — it needs the clean mask,
so no real method can do it: a perfect noise detector whose detections are dropped. It tells whether detecting the
wrong pixels is the hard part. (It is not an upper bound for co-teaching: it also drops every border pixel an
offset moved and the whole object of an image whose object vanished, so the foreground it keeps is the objects'
cores; on Kvasir at rate 0.5 it scored below class-balanced co-teaching on both seeds.)
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
