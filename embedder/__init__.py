"""The pyramid embedder: hierarchy, model, losses, training and inference (torch only).

>>> from embedder import Hierarchy, EmbedderConfig, PyramidEmbedder, Embedder  # doctest: +SKIP
"""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import EmbedderConfig
from .data import Failure, SourceItem, SourceListing, decode_image, load_images, read_folder_tree, read_manifest, read_source
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DistributedError,
    EmbedderError,
    HierarchyError,
    ImageDecodeError,
    WeightsNotFoundError,
)
from .hierarchy import Hierarchy
from hiervec_core.vectors import LevelVectors

from .inference import Embedder
from .losses import ContrastiveLoss, HierarchicalLoss, LevelCrossEntropy, LossWeights
from .model import PyramidEmbedder, PyramidOutput
from .prediction import Prediction, calibrate, decode_paths, expected_calibration_error, fit_temperature
from .training import TrainConfig, TrainResult, evaluate, train

__all__ = [
    "Checkpoint", "CheckpointError", "ConfigError", "ContrastiveLoss", "DataError", "DistributedError", "Embedder",
    "EmbedderConfig", "EmbedderError", "Failure", "LevelVectors", "HierarchicalLoss", "Hierarchy",
    "HierarchyError", "ImageDecodeError", "LevelCrossEntropy", "LossWeights", "PyramidEmbedder",
    "Prediction", "PyramidOutput", "SourceItem", "SourceListing", "TrainConfig", "TrainResult", "WeightsNotFoundError",
    "calibrate", "decode_image", "decode_paths", "evaluate", "expected_calibration_error", "fit_temperature", "load_checkpoint", "load_images", "read_folder_tree", "read_manifest",
    "read_source", "save_checkpoint", "train",
]
