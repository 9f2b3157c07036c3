"""Benchmark-only reference modules (not part of the library).

``OracleSelectionSegModule``: plain CE on the noisy mask with every WRONG pixel ignored — it needs the clean mask,
so no real method can do it: a perfect noise detector whose detections are dropped. It tells whether detecting the
wrong pixels is the hard part. (It is not an upper bound for co-teaching: it also drops every border pixel an
offset moved and the whole object of an image whose object vanished, so the foreground it keeps is the objects'
cores.)

``OracleCleanSubsetSegModule``: plain CE on the masks that equal the clean mask (the ideal per-sample selection).
Benchmark rows: ``benchmarks/noisy_regimes.py`` (``configs/full.yaml`` with ``class_path: oracle:...``).
"""
from __future__ import annotations

from lightning_weakseg import WeakSegModule
from lightning_weakseg.losses.partial import masked_cross_entropy


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


class OracleCleanSubsetSegModule(WeakSegModule):
    """The ideal per-sample selection: plain CE on the noisy masks that equal the clean mask, the corrupted
    images left out. Under ``--noise-fraction f`` this trains on the clean share of the masks only — what per-sample
    co-teaching with τ = f would train on if its ranking were perfect (not a method: it reads the clean mask). As in
    co-teaching the mean is over the kept images (not over the batch), so the step size does not shrink. It tells
    whether the data left after dropping the corrupted images, rather than the ranking, is the limit."""

    def loss_terms(self, batch, out):
        key = self.hparams.mask_key
        terms = {}
        if key in batch and "mask" in batch:
            noisy, has = batch[key], batch[f"has_{key}"]
            keep = has & ~(noisy != batch["mask"]).flatten(1).any(1)  # (B,) labelled and not corrupted
            ce = masked_cross_entropy(out["logits"], noisy, self.ignore_index, reduction="none")  # (B,)
            terms["seg/ce"] = (ce * keep).sum() / keep.sum().clamp_min(1)
        return terms
