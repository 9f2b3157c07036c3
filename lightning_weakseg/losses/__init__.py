"""Loss functions (tensors in, tensors out) and their ``nn.Module`` forms.

``reduction``, one meaning everywhere
-------------------------------------
Every loss here is defined per sample first: a value :math:`L_b` for each of the B images of the batch (its own
normalisation — labelled pixels, valid pairs, pixel count — is part of that definition and stated in each
function's formula). The ``reduction`` argument then says what comes back:

* ``"none"`` — the per-sample values, shape (B,);
* ``"mean"`` — their mean over the batch, :math:`\\frac{1}{B}\\sum_b L_b` (every sample weighs the same);
* ``"sum"`` — their sum, :math:`\\sum_b L_b`. **The default of every function and module.**

Anything else raises a ``ValueError``. The regimes ask for ``"none"`` and combine the per-sample values
themselves (:meth:`lightning_weakseg.WeakSegModule.batch_mean`: samples without the label count 0). Per-pixel
maps, where one is useful, are separate functions (:func:`generalized_cross_entropy_map`,
:func:`symmetric_cross_entropy_map`); elementwise penalties (:func:`log_barrier`, :func:`quadratic_penalty`) and
the per-sample building block :func:`soft_dice_loss` (always (B,)) have no ``reduction``, nor have the co-teaching
losses (:mod:`~lightning_weakseg.losses.coteaching`), which return means over the selected pixels or images.
A loss of your own follows the convention with :func:`check_reduction` and :func:`reduce`.
"""
from ._reduction import REDUCTIONS, check_reduction, reduce
from .crf import gated_crf_loss, dense_crf_loss, GatedCRFLoss, DenseCRFLoss
from .log_barrier import log_barrier, quadratic_penalty, LogBarrier, QuadraticPenalty
from .boxes import (tightness_prior, emptiness_constraint, emptiness_ce, box_size_constraint, box_coverage,
                    TightnessPrior, EmptinessConstraint, EmptinessCE, BoxSizeConstraint)
from .robust import (generalized_cross_entropy, symmetric_cross_entropy, generalized_cross_entropy_map,
                     symmetric_cross_entropy_map, GeneralizedCrossEntropyLoss, SymmetricCrossEntropyLoss)
from .coteaching import (coteaching_keep_ratio, small_loss_selection, coteaching_pair_loss, coteaching_losses,
                         peer_relabel_losses)
from .mil import (mil_max, mil_mean, mil_lse, mil_topk, mil_gem, mil_pool, softmax_log_odds, mil_loss,
                  tag_size_constraint, AttentionMIL, MILPool, MILLoss)
from .dice import soft_dice_loss
from .partial import (masked_cross_entropy, partial_cross_entropy, entropy_loss, total_variation_loss,
                      PartialCrossEntropyLoss, EntropyLoss, TotalVariationLoss)

__all__ = [
    "REDUCTIONS", "check_reduction", "reduce",
    "gated_crf_loss", "dense_crf_loss", "GatedCRFLoss", "DenseCRFLoss",
    "log_barrier", "quadratic_penalty", "LogBarrier", "QuadraticPenalty",
    "tightness_prior", "emptiness_constraint", "emptiness_ce", "box_size_constraint", "box_coverage",
    "TightnessPrior", "EmptinessConstraint", "EmptinessCE", "BoxSizeConstraint",
    "generalized_cross_entropy", "symmetric_cross_entropy", "generalized_cross_entropy_map",
    "symmetric_cross_entropy_map", "GeneralizedCrossEntropyLoss", "SymmetricCrossEntropyLoss",
    "coteaching_keep_ratio", "small_loss_selection", "coteaching_pair_loss", "coteaching_losses",
    "peer_relabel_losses",
    "mil_max", "mil_mean", "mil_lse", "mil_topk", "mil_gem", "mil_pool", "softmax_log_odds", "mil_loss",
    "tag_size_constraint", "AttentionMIL", "MILPool", "MILLoss",
    "soft_dice_loss",
    "masked_cross_entropy", "partial_cross_entropy", "entropy_loss", "total_variation_loss",
    "PartialCrossEntropyLoss", "EntropyLoss", "TotalVariationLoss",
]
