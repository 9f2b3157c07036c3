"""lightning-weakseg: train segmentation-models-pytorch models from weak labels with PyTorch Lightning."""
from .module import WeakSegModule
from . import audit  # label quality: lightning_weakseg.audit.label_quality_scores, weakseg audit
from .errors import (NonFiniteLossError, PseudoLabelCacheError, PseudoLabelCacheMismatch, WeakSegDataError,
                     WeakSegError)

__version__ = "0.1.0"
__all__ = ["WeakSegModule", "WeakSegDataError", "WeakSegError", "NonFiniteLossError", "PseudoLabelCacheError",
           "PseudoLabelCacheMismatch", "audit", "__version__"]
