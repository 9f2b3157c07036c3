"""lightning-weakseg: train segmentation-models-pytorch models from weak labels with PyTorch Lightning."""
from .module import WeakSegModule
from .errors import (NonFiniteLossError, PseudoLabelCacheError, PseudoLabelCacheMismatch, WeakSegDataError,
                     WeakSegError)

__version__ = "0.1.0"
__all__ = ["WeakSegModule", "WeakSegDataError", "WeakSegError", "NonFiniteLossError", "PseudoLabelCacheError",
           "PseudoLabelCacheMismatch", "__version__"]
