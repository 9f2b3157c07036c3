"""Semi-supervised cross pseudo supervision (Chen, Yuan, Zeng & Wang, "Semi-Supervised Semantic Segmentation with
Cross Pseudo Supervision", CVPR 2021), for unlabelled images beside any weak label.

Two networks of the same architecture, differently initialised (the peer network of co-teaching,
:class:`~lightning_weakseg.regimes._peer.PeerNetworkMixin`), see the same image. Each is trained on the other's
hard pseudo-label ŷ = argmax p (no gradient through the label) by cross-entropy:
L_cps = CE(p_a, argmax p_b) + CE(p_b, argmax p_a), on the pixels that carry no dense label (``"unlabelled"``,
default: every pixel of an unlabelled image, the unscribbled pixels of a scribbled one) or on every pixel
(``"all"``, the paper). Both networks also learn from every supervised term of the composition: the peer's copy of
a term ``<name>`` is ``peer/<name>``, weighted like ``<name>``.

>>> from lightning_weakseg.regimes.cps import CPSSegModule
>>> model = CPSSegModule(in_channels=1, num_classes=4)
"""
from __future__ import annotations

from typing import Any

import torch

from ..data.batch import IGNORE_INDEX, MASK_KEYS
from ..inference import class_map
from ..losses.partial import masked_cross_entropy
from ..module import WeakSegModule
from ._peer import PeerNetworkMixin
from .mean_teacher import ConsistencyRamp

__all__ = ["CrossPseudoSupervisionMixin", "CPSSegModule"]


class CrossPseudoSupervisionMixin(PeerNetworkMixin):
    """Cross pseudo supervision (Chen et al., CVPR 2021): adds ``semi/cps`` and the peer's copies ``peer/<name>`` of
    the supervised terms; composes with any weak regime by inheritance, in any order of the bases
    (``class ScribbleCPS(ScribbleMixin, CrossPseudoSupervisionMixin, WeakSegModule)``).

    ``semi/cps`` = w(step) · Σ_i (pCE_i(z_a, argmax z_b) + pCE_i(z_b, argmax z_a)) / B, pCE_i the mean
    cross-entropy over the selected pixels of sample i (:func:`~lightning_weakseg.losses.masked_cross_entropy`), w
    the sigmoid ramp-up of :class:`~lightning_weakseg.regimes.mean_teacher.ConsistencyRamp`.

    Args:
        cps_on: ``"unlabelled"`` (pixels without a label in any dense label map of the batch: ``mask``,
            ``noisy_mask``, ``scribble``, ``pseudo``) or ``"all"``.
        consistency_rampup_steps / consistency_rampup_epochs: the ramp-up's length (steps, or epochs when steps is
            ``None``); the full weight is ``loss_weights["semi/cps"]`` (default 1.0; the paper's λ is 1.5 on
            Cityscapes).
        inference: ``"average"`` (default), ``"a"`` or ``"b"``; peer_arch, peer_encoder, peer_model_kwargs: the
            peer network (:class:`~lightning_weakseg.regimes._peer.PeerNetworkMixin`).
    """

    default_loss_weights = {"semi/cps": 1.0}
    peer_average_in_training = False  # the main network's logits feed the supervised terms
    peer_regime_name = "cross pseudo supervision"
    PEER_PREFIX = "peer/"

    def __init__(self, *, cps_on: str = "unlabelled", consistency_rampup_steps: int | None = None,
                 consistency_rampup_epochs: float | None = 5.0, inference: str = "average",
                 peer_arch: str | None = None, peer_encoder: str | None = None,
                 peer_model_kwargs: dict[str, Any] | None = None, **kwargs):
        if cps_on not in ("unlabelled", "all"):
            raise ValueError(f"cps_on: expected 'unlabelled' or 'all', got {cps_on!r}")
        self._cps_ramp = ConsistencyRamp(consistency_rampup_steps, consistency_rampup_epochs)
        super().__init__(inference=inference, peer_arch=peer_arch, peer_encoder=peer_encoder,
                         peer_model_kwargs=peer_model_kwargs, **kwargs)
        self._peer_pass = False

    def term_weight(self, name: str) -> float:
        if name.startswith(self.PEER_PREFIX):
            overrides = self.hparams.get("loss_weights") or {}
            return float(overrides[name]) if name in overrides else super().term_weight(name[len(self.PEER_PREFIX):])
        return super().term_weight(name)

    def cps_weight(self) -> float:
        """The ramp-up factor w(step) in [0, 1]."""
        return self._cps_ramp(self)

    def loss_terms(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, out)
        if self._peer_pass or "logits_b" not in out or not self.training:
            return terms
        logits_a, logits_b = out["logits_a"], out["logits_b"]
        # the peer learns from every supervised term of the composition: the whole chain, from the most derived
        # class, on the peer's outputs (whatever the position of this mixin among the bases)
        peer_out = {"logits": logits_b, "probs": logits_b.softmax(1)}
        self._peer_pass = True
        try:
            peer_terms = self.loss_terms(batch, peer_out)
        finally:
            self._peer_pass = False
        terms.update({f"{self.PEER_PREFIX}{k}": v for k, v in peer_terms.items()})
        with torch.no_grad():
            pseudo_a, pseudo_b = class_map(logits_a), class_map(logits_b)
            if self.hparams.cps_on == "unlabelled":
                labelled = dense_labelled_pixels(batch)
                if labelled is not None:
                    fill = torch.full_like(pseudo_a, IGNORE_INDEX)
                    pseudo_a = torch.where(labelled, fill, pseudo_a)
                    pseudo_b = torch.where(labelled, fill, pseudo_b)
        cps = (masked_cross_entropy(logits_a, pseudo_b, IGNORE_INDEX, reduction="none")
               + masked_cross_entropy(logits_b, pseudo_a, IGNORE_INDEX, reduction="none"))
        w = self.cps_weight()
        terms["semi/cps"] = w * self.batch_mean(cps)
        if self._trainer is not None:
            self.log("train/cps_rampup", w, on_step=False, on_epoch=True, batch_size=cps.shape[0])
        return terms


def dense_labelled_pixels(batch: dict) -> torch.Tensor | None:
    """bool (B,H,W): pixels with a label in some dense label map of the batch (``mask``, ``noisy_mask``,
    ``scribble``, ``pseudo``) of a sample flagged as carrying it; ``None`` when the batch has none."""
    out = None
    for key in MASK_KEYS:
        if key not in batch:
            continue
        m = batch[key]
        has = batch.get(f"has_{key}")
        lab = m != IGNORE_INDEX
        if has is not None:
            lab = lab & has.to(m.device).view(-1, 1, 1)
        out = lab if out is None else out | lab
    return out


class CPSSegModule(CrossPseudoSupervisionMixin, WeakSegModule):
    """``WeakSegModule`` + :class:`CrossPseudoSupervisionMixin`: masks (or any ``mask_key``) for the labelled
    samples, cross pseudo supervision on the unlabelled pixels (``configs/semi_cps.yaml``)."""
