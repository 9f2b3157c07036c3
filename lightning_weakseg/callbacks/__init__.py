"""lightning_weakseg.callbacks"""
from .log_barrier_schedule import LogBarrierSchedule
from .pseudo_label_refresh import PseudoLabelRefresh
from .forget_rate_schedule import ForgetRateSchedule
from .image_logger import SegmentationImageLogger
from .pseudo_label_refresh import PseudoLabelCacheError, PseudoLabelCacheMismatch, dataset_fingerprint
