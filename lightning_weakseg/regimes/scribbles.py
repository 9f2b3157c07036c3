"""Scribble supervision: partial cross-entropy on the scribbled pixels plus label-free regularisers.

The WSL4MIS recipes (Luo et al., MICCAI 2022, and its technical report) as named, switchable terms:

* ``scribble/pce`` — :func:`~lightning_weakseg.losses.partial_cross_entropy` (the masked cross-entropy) on
  ``batch["scribble"]``.
* ``scribble/crf`` — :func:`~lightning_weakseg.losses.gated_crf_loss` (Obukhov et al. 2019) on the softmax.
* ``scribble/entropy`` — :func:`~lightning_weakseg.losses.entropy_loss` (Grandvalet & Bengio 2004).
* ``scribble/tv`` — :func:`~lightning_weakseg.losses.total_variation_loss`.
* ``scribble/pseudo`` — with ``scribble_self_training=True``: partial CE on ``batch["pseudo"]``, the labels of
  :meth:`ScribbleMixin.scribble_pseudo_labels` (the ``"scribble"`` pseudo-label rule) written by
  :class:`~lightning_weakseg.callbacks.PseudoLabelRefresh`.

>>> from lightning_weakseg.regimes.scribbles import ScribbleSegModule
>>> model = ScribbleSegModule(in_channels=1, num_classes=4, scribble_terms=("pce", "entropy"))
"""
from __future__ import annotations

from operator import attrgetter
from typing import Sequence

import torch

from ..data.batch import content_mask
from ..losses.crf import gated_crf_loss
from ..losses.partial import entropy_loss, partial_cross_entropy, total_variation_loss
from ..module import WeakSegModule, on_subset
from ..data.batch import IGNORE_INDEX
from ._pseudo import PseudoLabelMixin, PseudoLabelRule

SCRIBBLE_TERMS = ("pce", "crf", "entropy", "tv")

__all__ = ["ScribbleMixin", "ScribbleSegModule", "SCRIBBLE_TERMS"]


class ScribbleMixin(PseudoLabelMixin):
    """Adds the scribble terms (module docstring) for the samples that carry ``batch[scribble_key]``.

    Every term is a per-sample value reduced with :meth:`WeakSegModule.batch_mean`
    (Σ_i has_i · v_i / B): samples without scribbles contribute exactly 0 and no gradient, so the mixin composes
    with full masks (base ``seg/ce`` on ``mask``), boxes, points in one batch. The regularisers act on the whole
    image of each scribbled sample (``scribble_entropy_on="unlabelled"`` restricts the entropy to the pixels
    without a scribble).

    Args:
        scribble_key: the batch key of the scribble map (long (B,H,W), 255 = unlabelled). Its own key, so that a
            model can also learn from ``mask`` through the base module.
        scribble_terms: which of ``"pce"``, ``"crf"``, ``"entropy"``, ``"tv"`` are on. Weights by name in
            ``loss_weights`` (defaults in ``default_loss_weights``).
        scribble_crf_kernel_radius, scribble_crf_sigma_xy, scribble_crf_sigma_rgb, scribble_crf_downscale: the
            gated CRF (WSL4MIS: radius 5, σ_xy = 6, σ_rgb = 0.1 on images in [0, 1]).
        scribble_entropy_on: ``"all"`` pixels (WSL4MIS) or ``"unlabelled"`` ones.
        scribble_reg_start_epoch: first epoch with the regularisers (crf, entropy, tv); pCE always runs.
        scribble_self_training: add ``scribble/pseudo`` (partial CE on ``batch["pseudo"]``) for the samples that
            carry both scribbles and pseudo labels; pair it with a ``PseudoLabelRefresh`` callback.
        scribble_confidence: pixels of :meth:`scribble_pseudo_labels` whose top probability is below this are
            unknown.
    """

    default_loss_weights = {"scribble/pce": 1.0, "scribble/crf": 0.1, "scribble/entropy": 0.1,
                            "scribble/tv": 0.1, "scribble/pseudo": 0.5}
    pseudo_label_rule = PseudoLabelRule("scribble", key=attrgetter("scribble_key"), make="scribble_pseudo_labels",
                                        priority=30)

    def __init__(self, *, scribble_key: str = "scribble", scribble_terms: Sequence[str] = ("pce", "crf"),
                 scribble_crf_kernel_radius: int = 5, scribble_crf_sigma_xy: float = 6.0,
                 scribble_crf_sigma_rgb: float = 0.1, scribble_crf_downscale: int = 1,
                 scribble_entropy_on: str = "all", scribble_reg_start_epoch: int = 0,
                 scribble_self_training: bool = False, scribble_confidence: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        if isinstance(scribble_terms, str):
            scribble_terms = (scribble_terms,)
        unknown = [t for t in scribble_terms if t not in SCRIBBLE_TERMS]
        if unknown:
            raise ValueError(f"scribble_terms: expected a subset of {SCRIBBLE_TERMS}, got unknown {unknown}")
        if scribble_entropy_on not in ("all", "unlabelled"):
            raise ValueError(f"scribble_entropy_on: expected 'all' or 'unlabelled', got {scribble_entropy_on!r}")
        if not 0.0 <= scribble_confidence <= 1.0:
            raise ValueError(f"scribble_confidence: expected a probability in [0, 1], got {scribble_confidence}")
        self.scribble_key = scribble_key
        self.scribble_terms = tuple(dict.fromkeys(scribble_terms))
        self.scribble_crf = dict(kernel_radius=int(scribble_crf_kernel_radius), sigma_xy=float(scribble_crf_sigma_xy),
                                 sigma_rgb=float(scribble_crf_sigma_rgb), downscale=int(scribble_crf_downscale))
        self.scribble_entropy_on = scribble_entropy_on
        self.scribble_reg_start_epoch = int(scribble_reg_start_epoch)
        self.scribble_self_training = bool(scribble_self_training)
        self.scribble_confidence = float(scribble_confidence)

    # ------------------------------------------------------------------ terms
    def loss_terms(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, out)
        key = self.scribble_key
        if key not in batch or not batch[f"has_{key}"].any():
            return terms
        logits = out["logits"]
        has = batch[f"has_{key}"].to(logits.device)
        scribble = batch[key].to(logits.device)
        on = self.scribble_terms
        if "pce" in on:
            pce = on_subset(lambda z, y: partial_cross_entropy(z.float(), y, IGNORE_INDEX, reduction="none"),
                            has, logits, scribble)
            terms["scribble/pce"] = self.batch_mean(pce, has)
        if self.current_epoch >= self.scribble_reg_start_epoch:
            probs = out["probs"].float()
            valid = content_mask(batch)  # padding of a letterboxed image: left out of every regularizer
            valid = (torch.ones_like(probs[:, 0], dtype=torch.bool) if valid is None else valid.to(probs.device))
            if "crf" in on:
                image = batch["image"].to(probs.device)
                crf = on_subset(lambda p, x, v: gated_crf_loss(p, x, reduction="none", valid=v, **self.scribble_crf),
                                has, probs, image, valid)
                terms["scribble/crf"] = self.batch_mean(crf, has)
            if "entropy" in on:
                if self.scribble_entropy_on == "unlabelled":
                    ent = on_subset(lambda p, y, v: entropy_loss(p, (y == IGNORE_INDEX) & v, reduction="none"), has, probs,
                                    scribble, valid)
                else:
                    ent = on_subset(lambda p, v: entropy_loss(p, v, reduction="none"), has, probs, valid)
                terms["scribble/entropy"] = self.batch_mean(ent, has)
            if "tv" in on:
                tv = on_subset(lambda p, v: total_variation_loss(p, reduction="none", valid=v), has, probs, valid)
                terms["scribble/tv"] = self.batch_mean(tv, has)
        if self.scribble_self_training and "pseudo" in batch:
            both = has & batch["has_pseudo"].to(logits.device)
            if bool(both.any()):
                pseudo = batch["pseudo"].to(logits.device)
                pl = on_subset(lambda z, y: partial_cross_entropy(z.float(), y, IGNORE_INDEX, reduction="none"),
                               both, logits, pseudo)
                terms["scribble/pseudo"] = self.batch_mean(pl, both)
        return terms

    # ------------------------------------------------------------------ self-training
    def scribble_pseudo_labels(self, batch: dict) -> torch.Tensor:
        """The ``"scribble"`` pseudo-label rule, long (B, H, W): the model's prediction where its top probability
        reaches ``scribble_confidence`` (else 255), with every scribbled pixel set to its scribble class."""
        image = batch["image"].to(self.device)
        with torch.no_grad():
            probs = self(image)["probs"].float()
        conf, lab = probs.max(1)
        lab = torch.where(conf >= self.scribble_confidence, lab, torch.full_like(lab, IGNORE_INDEX))
        key = self.scribble_key
        if batch.get(key) is not None:
            has = batch.get(f"has_{key}")
            has = torch.ones_like(lab[:, 0, 0], dtype=torch.bool) if has is None else has.to(lab.device)
            scr = batch[key].to(lab.device)
            lab = torch.where(has[:, None, None] & (scr != IGNORE_INDEX), scr, lab)
        return lab.long()


class ScribbleSegModule(ScribbleMixin, WeakSegModule):
    """``WeakSegModule`` + :class:`ScribbleMixin`, ready for LightningCLI configs (``configs/scribbles.yaml``)."""
