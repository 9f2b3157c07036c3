"""Callbacks: schedules and loops that live across epochs; their state is in the checkpoint."""
from .log_barrier_schedule import LogBarrierSchedule
from .pseudo_label_refresh import PseudoLabelRefresh
from .forget_rate_schedule import ForgetRateSchedule
from .image_logger import SegmentationImageLogger
from .mask_writer import MaskWriter
from .pseudo_label_refresh import PseudoLabelCacheError, PseudoLabelCacheMismatch, dataset_fingerprint

__all__ = ["LogBarrierSchedule", "PseudoLabelRefresh", "ForgetRateSchedule", "SegmentationImageLogger", "MaskWriter",
           "PseudoLabelCacheError", "PseudoLabelCacheMismatch", "dataset_fingerprint"]
