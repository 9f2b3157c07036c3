"""Data layer: the batch contract, data sets (folder, NIfTI volumes, synthetic), the weak-label simulator, the data
module."""
from .batch import IGNORE_INDEX, LABEL_KEYS, MASK_KEYS, collate, validate_batch, validate_sample
from .dataset import WeakSegDataset
from .datamodule import WeakSegDataModule, assign_labels, group_split
from .folder import FolderDataset
from .predict import PredictDataset, predict_collate
from .synthetic import SyntheticDataset
from .tiles import TiledDataset
from .volumes import VolumeDataset, check_volumes
from . import weakify
from ..errors import WeakSegDataError

__all__ = ["IGNORE_INDEX", "LABEL_KEYS", "MASK_KEYS", "collate", "validate_batch", "validate_sample",
           "WeakSegDataset", "WeakSegDataModule", "assign_labels", "group_split", "FolderDataset",
           "SyntheticDataset", "TiledDataset", "VolumeDataset", "check_volumes", "PredictDataset", "predict_collate",
           "weakify", "WeakSegDataError"]
