"""Bounding-box regime (Kervadec et al., MIDL 2020): tightness prior + emptiness + box size.

>>> from lightning_weakseg.regimes.boxes import BoxSegModule
>>> model = BoxSegModule(num_classes=2, box_band_width=5)
"""
from __future__ import annotations

import torch

from ..data.batch import content_mask
from ..losses.boxes import box_size_constraint, emptiness_ce, emptiness_constraint, tightness_prior
from ..module import WeakSegModule
from ._barrier import BarrierMixin

__all__ = ["BoxTightnessMixin", "BoxSegModule"]


class BoxTightnessMixin(BarrierMixin):
    """Adds ``box/tightness``, ``box/emptiness`` and ``box/size`` for samples that carry ``boxes``.

    Terms (per image, then :meth:`batch_mean` over the batch — samples without boxes count 0):

    * ``box/tightness`` — :func:`~lightning_weakseg.losses.tightness_prior` of each box on its own class's
      softmax channel, bands of ``box_band_width`` lines, penalty ψ_t.
    * ``box/emptiness`` — with ``box_emptiness="ce"`` (default) :func:`~lightning_weakseg.losses.emptiness_ce`:
      outside the boxes of class c, class c is not allowed (plain background CE outside every box, mean over
      those pixels). With ``"barrier"``: :func:`~lightning_weakseg.losses.emptiness_constraint`,
      ψ_t(Σ_outside p_c). CE is the default because Σ_outside p_c >= 0 always, so the barrier never leaves its
      linear branch: it is t·Σp, whose scale grows with t and with the image, while CE is a mean over the outside
      pixels with the well-conditioned (p − y) gradient and needs no schedule (docs/regimes/boxes.md).
    * ``box/size`` — :func:`~lightning_weakseg.losses.box_size_constraint`,
      ``a·|box| <= Σ_box p <= b·|box|`` with ``box_size_bounds = (a, b)``; ``None`` switches it off.

    The sums of ``box/tightness`` and ``box/size`` are divided by the pixel count H·W of the image, so that a
    violated constraint pulls each of its pixels with slope t/(H·W), the scale of a mean CE, and term weights do
    not depend on the image size. Box annotations are assumed complete: an image with boxes but none of class c
    has no c; an image with an empty box list is all background.

    t comes from ``self.barrier_t``, owned by :class:`~lightning_weakseg.regimes.BarrierMixin` (one t for every
    constraint term of the module; set each epoch by :class:`~lightning_weakseg.callbacks.LogBarrierSchedule`,
    ``box_t0`` until then).

    Args:
        box_band_width: lines per band of the tightness prior.
        box_t0: barrier t used when no schedule sets one.
        box_emptiness: ``"ce"`` or ``"barrier"``.
        box_size_bounds: ``(a, b)`` fractions of the box area, or ``None`` (no size term).
        box_penalty: ``"log_barrier"`` or ``"quadratic"`` (``max(0, z)²``, ignores t).
    """

    default_loss_weights = {"box/tightness": 1.0, "box/emptiness": 1.0, "box/size": 1.0}

    def __init__(self, *, box_band_width: int = 5, box_t0: float = 5.0, box_emptiness: str = "ce",
                 box_size_bounds: tuple[float, float] | None = (0.5, 0.9), box_penalty: str = "log_barrier",
                 **kwargs):
        super().__init__(**kwargs)
        if box_emptiness not in ("ce", "barrier"):
            raise ValueError(f"box_emptiness: expected 'ce' or 'barrier', got {box_emptiness!r}")
        if box_penalty not in ("log_barrier", "quadratic"):
            raise ValueError(f"box_penalty: expected 'log_barrier' or 'quadratic', got {box_penalty!r}")
        if not isinstance(box_band_width, int) or box_band_width < 1:
            raise ValueError(f"box_band_width: expected an integer >= 1, got {box_band_width!r}")
        if box_size_bounds is not None:
            a, b = (float(v) for v in box_size_bounds)
            if not 0 <= a <= b:
                raise ValueError(f"box_size_bounds: expected 0 <= a <= b, got {box_size_bounds}")
            box_size_bounds = (a, b)
        self.box_band_width, self.box_emptiness = box_band_width, box_emptiness
        self.box_size_bounds, self.box_penalty = box_size_bounds, box_penalty
        self.start_barrier_t("box_t0", box_t0)

    def loss_terms(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, out)
        if "boxes" not in batch or not batch["has_boxes"].any():
            return terms
        has = batch["has_boxes"]
        boxes = batch["boxes"]
        probs = out["probs"].float()
        t = self.barrier_t
        hw = probs.shape[-2] * probs.shape[-1]
        tight = tightness_prior(probs, boxes, t, self.box_band_width, self.box_penalty, reduction="none")
        terms["box/tightness"] = self.batch_mean(tight / hw, has)
        valid = content_mask(batch)  # padding of a letterboxed image: no label, not "outside the boxes"
        if self.box_emptiness == "ce":
            empty = emptiness_ce(out["logits"].float(), boxes, reduction="none", valid=valid)
        else:
            empty = emptiness_constraint(probs, boxes, t, self.box_penalty, reduction="none", valid=valid) / hw
        terms["box/emptiness"] = self.batch_mean(empty, has)
        if self.box_size_bounds is not None:
            a, b = self.box_size_bounds
            size = box_size_constraint(probs, boxes, t, a, b, self.box_penalty, reduction="none")
            terms["box/size"] = self.batch_mean(size / hw, has)
        return terms


class BoxSegModule(BoxTightnessMixin, WeakSegModule):
    """``WeakSegModule`` + :class:`BoxTightnessMixin`, ready for LightningCLI configs (``configs/boxes.yaml``)."""
