"""Benchmark-only reference modules (not part of the library).

``OracleSelectionSegModule``: plain CE on the noisy mask with every WRONG pixel ignored — it needs the clean mask,
so no real method can do it: a perfect noise detector whose detections are dropped. It tells whether detecting the
wrong pixels is the hard part. (It is not an upper bound for co-teaching: it also drops every border pixel an
offset moved and the whole object of an image whose object vanished, so the foreground it keeps is the objects'
cores.)

``OracleCleanSubsetSegModule``: plain CE on the masks that equal the clean mask (the ideal per-sample selection).
Benchmark rows: ``benchmarks/noisy_regimes.py`` (``configs/full.yaml`` with ``class_path: oracle:...``).

``OracleTeacherSegModule``: the mean teacher whose consistency target is the true mask (one-hot) instead of the
teacher's softmax, with the same weight, ramp-up and strong view — a perfect teacher. The unlabelled slices carry
their true mask under ``noisy_mask`` (``noise_rate=0``), which no supervised term reads, and
``OracleTeacherDataModule`` counts only ``mask`` as a label, so the batches are those of the real mean-teacher row.
It tells whether the teacher's quality or the consistency term itself (its weight and budget) is the limit.
Benchmark rows: ``benchmarks/semi.py`` (``oracle_mask10``, ``oracle_mask5``).
"""
from __future__ import annotations

import torch

from lightning_weakseg import WeakSegModule
from lightning_weakseg.data import WeakSegDataModule
from lightning_weakseg.losses.partial import masked_cross_entropy
from lightning_weakseg.regimes.mean_teacher import MeanTeacherSegModule


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


class OracleTeacherSegModule(MeanTeacherSegModule):
    """:class:`MeanTeacherSegModule` with a perfect teacher: per sample the target is the one-hot of ``mask``
    (labelled slices) or ``noisy_mask`` (the true mask of an unlabelled slice); ignored pixels keep the EMA
    teacher's softmax. Validation still uses the EMA teacher, as in the real row."""

    def loss_terms(self, batch, out):
        self._oracle_batch = batch
        try:
            return super().loss_terms(batch, out)
        finally:
            self._oracle_batch = None

    def teacher_probs(self, x):
        probs = super().teacher_probs(x)
        batch = getattr(self, "_oracle_batch", None)
        if batch is None or "noisy_mask" not in batch:
            return probs
        truth = batch["noisy_mask"]
        if "mask" in batch:
            truth = torch.where(batch["has_mask"].view(-1, 1, 1), batch["mask"], truth)
        known = truth != self.ignore_index
        onehot = torch.nn.functional.one_hot(truth.clamp(0, probs.shape[1] - 1), probs.shape[1])
        onehot = onehot.permute(0, 3, 1, 2).to(probs.dtype)
        return torch.where(known.unsqueeze(1), onehot, probs)


class OracleTeacherDataModule(WeakSegDataModule):
    """Two-stream batches that count only ``mask`` as a label (the true masks of the unlabelled slices ride along
    under ``noisy_mask`` for :class:`OracleTeacherSegModule`)."""

    def labelled_flags(self) -> list[bool]:
        ds = self.train_dataset
        return ["mask" in ds.keys_for(ds.raw_index(i)) for i in range(len(ds))]
