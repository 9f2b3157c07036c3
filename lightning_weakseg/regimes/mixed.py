"""Mixed supervision: one model, one batch, whatever label each image carries.

>>> from lightning_weakseg.regimes.mixed import MixedSegModule
>>> model = MixedSegModule(num_classes=2, scribble_terms=("pce",))
"""
from __future__ import annotations

from ..module import WeakSegModule
from .boxes import BoxTightnessMixin
from .points import PointVoronoiMixin
from .scribbles import ScribbleMixin
from .tags import ImageLevelMixin

__all__ = ["MixedSegModule"]


class MixedSegModule(ScribbleMixin, ImageLevelMixin, BoxTightnessMixin, PointVoronoiMixin, WeakSegModule):
    """Full masks, scribbles, boxes and points in one batch (pair with ``WeakSegDataModule(label_fractions=...)``).

    Terms, each applied only to the samples whose ``has_<key>`` flag is set:

    ============== ======================================== ==============================================
    label          terms                                    from
    ============== ======================================== ==============================================
    ``mask``       ``seg/ce`` (+ ``seg/dice``)              :class:`~lightning_weakseg.WeakSegModule`
    ``scribble``   ``scribble/pce|crf|entropy|tv|pseudo``   :class:`~.scribbles.ScribbleMixin`
    ``boxes``      ``box/tightness|emptiness|size``         :class:`~.boxes.BoxTightnessMixin`
    ``points``     ``point/voronoi|cluster|crf``            :class:`~.points.PointVoronoiMixin`
    ``tags``       ``tags/mil|cls|pseudo``                  :class:`~.tags.ImageLevelMixin`
    ============== ======================================== ==============================================

    **Normalisation.** Every term is a per-sample value v_i reduced by
    :meth:`~lightning_weakseg.WeakSegModule.batch_mean`, Σ_i has_i · v_i / B, with B the *batch size*, not the
    number of samples that carry the label. So:

    * a sample's weight in the loss is 1/B for each of its terms whatever the other samples carry: the gradient
      a box image contributes is the same in an all-box batch and in a batch of 9 masks + 1 box image;
    * the loss of a mixed batch is exactly the mean over its samples of the single-sample losses (tested), so
      the objective over an epoch is Σ_samples loss(sample) / N for every mix, and the expected value of a term
      is (fraction of samples with that label) × (its mean per-sample value);
    * a term cannot blow up when few samples in a batch carry its label (dividing by the count would give a
      lone box image in a batch of masks the weight of all the masks together, and a weight that jumps from
      batch to batch with the random mix).

    The price: a label type that covers 10% of the images contributes about 10% of the gradient; to re-balance
    label types, set ``loss_weights`` (e.g. ``{"seg/ce": 5.0}`` to up-weight a 10% mask subset), which then holds
    for every batch.

    Point-cluster labels are computed at fit start only when the data module's training labels include
    ``points``. The self-training labels (``make_pseudo_labels``,
    :class:`~lightning_weakseg.regimes.PseudoLabelMixin`) follow each sample's label, whatever the order of the
    bases: the scribble rule for scribbled samples, then the tag rule (MIL softmax or CAM of the tagged classes,
    thresholded) for tagged ones, then the point rule (Voronoi-constrained, dense-CRF refined) for the others.
    ``tags/pseudo`` trains on the samples whose labels are the tag rule's.
    """

    def __init__(self, *, tag_cls: bool = False, tag_pseudo_source: str = "mil", tag_refine: str = "none",
                 **kwargs):
        """Tags default to MIL on the segmentation map only (``tags/mil``): no classification head, so a mixed
        model without tags has exactly the parameters of the plain model. ``tag_cls=True`` adds SMP's head and
        ``tags/cls``; ``tag_pseudo_source="cam"`` (needs the head) makes CAM pseudo-masks for self-training."""
        super().__init__(tag_cls=tag_cls, tag_pseudo_source=tag_pseudo_source, tag_refine=tag_refine, **kwargs)
