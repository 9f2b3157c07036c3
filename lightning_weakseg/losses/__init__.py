"""lightning_weakseg.losses"""
from .crf import gated_crf_loss, dense_crf_loss, GatedCRFLoss, DenseCRFLoss
from .log_barrier import log_barrier, quadratic_penalty, LogBarrier, QuadraticPenalty
from .boxes import tightness_prior, emptiness_constraint, emptiness_ce, box_size_constraint, box_coverage, TightnessPrior, EmptinessConstraint, EmptinessCE, BoxSizeConstraint
from .robust import generalized_cross_entropy, symmetric_cross_entropy, GeneralizedCrossEntropyLoss, SymmetricCrossEntropyLoss
from .coteaching import coteaching_keep_ratio, small_loss_selection, coteaching_pair_loss, coteaching_losses, peer_relabel_losses
from .mil import mil_max, mil_mean, mil_lse, mil_topk, mil_gem, mil_pool, softmax_log_odds, mil_loss, tag_size_constraint, AttentionMIL, MILPool, MILLoss
from .dice import soft_dice_loss
from .partial import partial_cross_entropy, entropy_loss, total_variation_loss, PartialCrossEntropyLoss, EntropyLoss, TotalVariationLoss
