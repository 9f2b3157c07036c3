"""Image-level tags: multiple-instance learning on the segmentation map, a classification head, and the two-stage
loop (tags → CAM pseudo-masks → segmentation).

Terms (over the samples that carry ``tags``; samples without tags contribute exactly 0):

* ``tags/mil`` — the softmax log-odds map of every class, log p_c − log(1 − p_c), pooled into one image logit
  per class (``tag_mil`` = max | mean | lse | topk | gem | attention, see
  :mod:`lightning_weakseg.losses.mil`), binary cross-entropy against the tags.
* ``tags/cls`` — binary cross-entropy of SMP's classification head (``out["cls_logits"]``) against the tags.
* ``tags/crf`` (``tag_crf=True``) — the gated CRF loss (:func:`~lightning_weakseg.losses.gated_crf_loss`) on the
  softmax: MIL says *that* a class is in the image, not how far it extends; the CRF term pulls the extent to the
  image's edges (as with scribbles).
* ``tags/size`` (``tag_size_bounds=(a, b)``) — each tagged foreground class fills between a and b of the image
  (:func:`~lightning_weakseg.losses.tag_size_constraint`, log-barrier penalty with t from ``self.barrier_t``,
  which :class:`~lightning_weakseg.callbacks.LogBarrierSchedule` grows each epoch; Kervadec et al. 2019).
* ``tags/pseudo`` — cross-entropy with ignore against ``batch["pseudo"]``, the pseudo-masks written into the data
  set by :class:`~lightning_weakseg.callbacks.PseudoLabelRefresh`, which calls ``make_pseudo_labels``; for the
  samples whose pseudo labels are the tag rule's (:class:`~lightning_weakseg.regimes.PseudoLabelMixin`: in a
  tags-only module every sample, in a mixed one the tagged samples without scribbles).

Stage 2 (:meth:`ImageLevelMixin.tag_pseudo_labels`, the ``"tags"`` pseudo-label rule): scores per tagged class — a CAM of the classification head
(``tag_pseudo_source="cam"``, any method of :mod:`lightning_weakseg.cam`) or the segmentation softmax
(``"mil"``) — optionally refined (dense CRF or affinity random walk, :mod:`lightning_weakseg.pseudo.cam_refine`),
then confident foreground / background with an ignore band (:func:`~lightning_weakseg.pseudo.cam_refine.
cam_to_pseudo`).

>>> from lightning_weakseg.regimes.tags import TagSegModule
>>> model = TagSegModule(num_classes=4, in_channels=1, tag_mil="lse", tag_cls=True)
"""
from __future__ import annotations

import torch

from .. import cam as cam_methods
from ..data.batch import content_mask
from ..losses.crf import gated_crf_loss
from ..losses.mil import POOLINGS, MILLoss, mil_loss, tag_size_constraint
from ..losses.partial import masked_cross_entropy
from ..module import WeakSegModule, on_subset
from ..pseudo.cam_refine import affinity_random_walk, cam_to_pseudo, crf_refine_cams
from ..data.batch import IGNORE_INDEX
from ._barrier import BarrierMixin
from ._pseudo import PseudoLabelMixin, PseudoLabelRule

__all__ = ["ImageLevelMixin", "TagSegModule", "CAM_METHODS"]

CAM_METHODS = ("CAM", "GradCAM", "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "HiResCAM", "ScoreCAM", "EigenCAM")
REFINERS = ("none", "crf", "random_walk")


class ImageLevelMixin(BarrierMixin, PseudoLabelMixin):
    """Image-level tag regime. See the module docstring for the terms.

    Args:
        tag_mil: MIL pooling of the segmentation map for ``tags/mil`` (one of max, mean, lse, topk, gem,
            attention) or ``None`` (no MIL term).
        tag_mil_kwargs: pooling options (``r`` for lse, ``k`` for topk, ``p`` for gem, ``hidden`` for attention).
        tag_cls: add the ``tags/cls`` term; switches SMP's classification head on (``cls_head=True`` whatever
            was passed).
        tag_background: supervise column 0 (background present) too; off by default, since nearly every image has
            background and the column then only teaches the network to predict it everywhere.
        tag_pseudo_source: ``"cam"`` (CAM of the classification head; needs ``tag_cls``) or ``"mil"`` (the
            segmentation network's softmax) for :meth:`make_pseudo_labels`.
        tag_cam: CAM method name (``GradCAM``, ``GradCAMPlusPlus``, ``XGradCAM``, ``LayerCAM``, ``HiResCAM``,
            ``ScoreCAM``, ``EigenCAM``, ``CAM``); ``tag_cam_layer`` its target layer (dotted name of the module,
            e.g. ``"model.encoder.layer3"``; ``None`` = last encoder stage); ``tag_cam_kwargs`` extra options.
        tag_refine: ``"none"``, ``"crf"`` (pydensecrf2) or ``"random_walk"``; ``tag_refine_kwargs`` their options
            (:func:`~lightning_weakseg.pseudo.cam_refine.crf_refine_cams`,
            :func:`~lightning_weakseg.pseudo.cam_refine.affinity_random_walk`).
        tag_fg_threshold, tag_bg_threshold: scores ≥ fg are foreground, < bg background, between: ignored (255).
        tag_crf: add the ``tags/crf`` term (weight 0.1 by default, as ``scribble/crf``); ``tag_crf_kwargs`` its
            options (``kernel_radius`` 5, ``sigma_xy`` 6, ``sigma_rgb`` 0.1, ``downscale`` 1).
        tag_size_bounds: ``(a, b)`` fractions of the image that a tagged foreground class fills (``tags/size``),
            or ``None`` (no size term). ``tag_t0``: the barrier t when no schedule sets ``barrier_t``
            (:class:`~lightning_weakseg.regimes.BarrierMixin`: one t per module).
    """

    default_loss_weights = {"tags/mil": 1.0, "tags/cls": 1.0, "tags/pseudo": 1.0, "tags/crf": 0.1, "tags/size": 1.0}
    pseudo_label_rule = PseudoLabelRule("tags", key="tags", make="tag_pseudo_labels", priority=20)

    def __init__(self, *, tag_mil: str | None = "lse", tag_mil_kwargs: dict | None = None, tag_cls: bool = True,
                 tag_background: bool = False, tag_pseudo_source: str = "cam", tag_cam: str = "GradCAM",
                 tag_cam_layer: str | None = None, tag_cam_kwargs: dict | None = None,
                 tag_refine: str = "random_walk", tag_refine_kwargs: dict | None = None,
                 tag_fg_threshold: float = 0.4, tag_bg_threshold: float = 0.15, tag_crf: bool = False,
                 tag_crf_kwargs: dict | None = None, tag_size_bounds: tuple[float, float] | None = None,
                 tag_t0: float = 5.0, **kwargs):
        if tag_mil is not None and tag_mil not in POOLINGS:
            raise ValueError(f"tag_mil: expected one of {POOLINGS} or None, got {tag_mil!r}")
        if tag_pseudo_source not in ("cam", "mil"):
            raise ValueError(f"tag_pseudo_source: expected 'cam' or 'mil', got {tag_pseudo_source!r}")
        if tag_cam not in CAM_METHODS:
            raise ValueError(f"tag_cam: expected one of {CAM_METHODS}, got {tag_cam!r}")
        if tag_refine not in REFINERS:
            raise ValueError(f"tag_refine: expected one of {REFINERS}, got {tag_refine!r}")
        if not 0.0 <= tag_bg_threshold <= tag_fg_threshold <= 1.0:
            raise ValueError(f"expected 0 <= tag_bg_threshold <= tag_fg_threshold <= 1, got "
                             f"{tag_bg_threshold}, {tag_fg_threshold}")
        if tag_size_bounds is not None:
            a, b = (float(v) for v in tag_size_bounds)
            if not 0.0 <= a <= b <= 1.0:
                raise ValueError(f"tag_size_bounds: expected fractions 0 <= a <= b <= 1, got {tag_size_bounds}")
            tag_size_bounds = (a, b)
        if tag_pseudo_source == "cam" and not tag_cls:
            raise ValueError("tag_pseudo_source='cam' needs the classification head: set tag_cls=True "
                             "(or use tag_pseudo_source='mil')")
        if tag_cls:
            kwargs["cls_head"] = True  # the CLI passes every default explicitly: cls_head=False cannot mean "no head"
        super().__init__(**kwargs)
        self.tag_mil = tag_mil
        self.tag_cls, self.tag_background = bool(tag_cls), bool(tag_background)
        self.tag_pseudo_source, self.tag_cam, self.tag_cam_layer = tag_pseudo_source, tag_cam, tag_cam_layer
        self.tag_cam_kwargs = dict(tag_cam_kwargs or {})
        self.tag_refine, self.tag_refine_kwargs = tag_refine, dict(tag_refine_kwargs or {})
        self.tag_fg_threshold, self.tag_bg_threshold = float(tag_fg_threshold), float(tag_bg_threshold)
        self.tag_crf = bool(tag_crf)
        self.tag_size_bounds = tag_size_bounds
        self.start_barrier_t("tag_t0", tag_t0)
        self.tag_crf_kwargs = {"kernel_radius": 5, "sigma_xy": 6.0, "sigma_rgb": 0.1, "downscale": 1,
                               **dict(tag_crf_kwargs or {})}
        # a module attribute, so that attention pooling's parameters are trained and checkpointed
        self.tag_mil_loss = (MILLoss(tag_mil, self.hparams.num_classes, background=self.tag_background,
                                     reduction="none", **dict(tag_mil_kwargs or {})) if tag_mil is not None else None)

    # ------------------------------------------------------------------ terms
    def _tag_columns(self):
        return None if self.tag_background else slice(1, None)

    def loss_terms(self, batch, out):
        terms = super().loss_terms(batch, out)
        if "tags" in batch and batch["has_tags"].any():
            tags, has = batch["tags"], batch["has_tags"]
            if self.tag_mil_loss is not None:
                terms["tags/mil"] = self.batch_mean(self.tag_mil_loss(out["logits"].float(), tags,
                                                                      valid=content_mask(batch)), has)
            if self.tag_cls:
                cls = mil_loss(out["cls_logits"].float(), tags, classes=self._tag_columns(), reduction="none")
                terms["tags/cls"] = self.batch_mean(cls, has)
            if self.tag_crf:
                valid = content_mask(batch)
                valid = (torch.ones_like(out["probs"][:, 0], dtype=torch.bool) if valid is None
                         else valid.to(out["probs"].device))
                crf = on_subset(lambda p, x, v: gated_crf_loss(p, x, reduction="none", valid=v, **self.tag_crf_kwargs),
                                has, out["probs"].float(), batch["image"].to(out["probs"].device), valid)
                terms["tags/crf"] = self.batch_mean(crf, has)
            if self.tag_size_bounds is not None:
                size = tag_size_constraint(out["probs"].float(), tags, self.barrier_t, *self.tag_size_bounds,
                                           reduction="none", valid=content_mask(batch))
                terms["tags/size"] = self.batch_mean(size, has)
        if "pseudo" in batch and batch["has_pseudo"].any():
            # only the samples whose pseudo labels the tag rule makes; the others' belong to other regimes' terms
            which = batch["has_pseudo"] & self.pseudo_label_owners(batch)["tags"].to(batch["has_pseudo"].device)
            if which.any():
                terms["tags/pseudo"] = self.batch_mean(
                    masked_cross_entropy(out["logits"], batch["pseudo"], reduction="none"), which)
        return terms

    # ------------------------------------------------------------------ stage 2
    def cam_method(self):
        """The configured CAM method on this module (target layer by name, default: last encoder stage)."""
        cls = getattr(cam_methods, self.tag_cam)
        return cls(self, self.tag_cam_layer, **self.tag_cam_kwargs)

    def tag_scores(self, image: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) scores in [0, 1] of the tagged foreground classes (0 elsewhere and in column 0)."""
        b, k = tags.shape
        scores = torch.zeros(b, k, *image.shape[2:], dtype=torch.float32, device=image.device)
        if self.tag_pseudo_source == "mil":
            with torch.no_grad():
                probs = self(image)["probs"].float()
            return probs * (tags > 0.5)[:, :, None, None] * (torch.arange(k, device=image.device) > 0).view(1, k, 1, 1)
        pairs = (tags[:, 1:] > 0.5).nonzero()
        if len(pairs):
            bi, ci = pairs[:, 0], pairs[:, 1] + 1
            # one batched call over every (image, tagged class) pair
            scores[bi, ci] = self.cam_method()(image[bi], ci).detach().float()
        return scores

    def refine_scores(self, scores: torch.Tensor, image: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        if self.tag_refine == "crf":
            return crf_refine_cams(scores, image, tags, **self.tag_refine_kwargs)
        if self.tag_refine == "random_walk":
            return affinity_random_walk(scores, image, tags=tags, **self.tag_refine_kwargs)
        return scores

    def tag_pseudo_labels(self, batch) -> torch.Tensor:
        """The ``"tags"`` pseudo-label rule, long (B, H, W) (class ids, 255 = ignore): scores of the tagged classes
        → refinement → confident thresholds. Samples without tags are 255 everywhere."""
        image = batch["image"].to(self.device)
        b, h, w = image.shape[0], *image.shape[2:]
        if "tags" not in batch:
            return torch.full((b, h, w), IGNORE_INDEX, dtype=torch.long, device=image.device)
        tags = batch["tags"].to(image.device).float()
        has = batch["has_tags"].to(image.device)
        tags = tags * has[:, None]  # no tags: cam_to_pseudo leaves the sample at 255
        scores = self.refine_scores(self.tag_scores(image, tags), image, tags)
        return cam_to_pseudo(scores, tags, self.tag_fg_threshold, self.tag_bg_threshold)


class TagSegModule(ImageLevelMixin, WeakSegModule):
    """``WeakSegModule`` + :class:`ImageLevelMixin`, ready for LightningCLI configs (``configs/tags.yaml``)."""
