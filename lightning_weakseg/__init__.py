"""lightning-weakseg: train segmentation-models-pytorch models from weak labels with PyTorch Lightning."""
from .module import WeakSegModule
from .errors import WeakSegDataError, WeakSegError, NonFiniteLossError

__version__ = "0.1.0"
__all__ = ["WeakSegModule", "WeakSegDataError", "WeakSegError", "NonFiniteLossError", "__version__"]
