"""The pyramid embedder: hierarchy, model, losses, training and inference (torch only).

>>> from embedder import Hierarchy, EmbedderConfig, PyramidEmbedder, Embedder  # doctest: +SKIP
"""

from hiervec_core.lazy import lazy_exports

_EXPORTS = {
    "Checkpoint": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "EmbedderConfig": ".config",
    "Failure": ".data",
    "SourceItem": ".data",
    "SourceListing": ".data",
    "decode_image": ".data",
    "load_images": ".data",
    "read_folder_tree": ".data",
    "read_manifest": ".data",
    "read_source": ".data",
    "CheckpointError": ".errors",
    "ConfigError": ".errors",
    "DataError": ".errors",
    "DistributedError": ".errors",
    "EmbedderError": ".errors",
    "HierarchyError": ".errors",
    "ImageDecodeError": ".errors",
    "WeightsNotFoundError": ".errors",
    "Hierarchy": ".hierarchy",
    "LevelVectors": "hiervec_core.vectors",
    "Embedder": ".inference",
    "ContrastiveLoss": ".losses",
    "HierarchicalLoss": ".losses",
    "LevelCrossEntropy": ".losses",
    "LossWeights": ".losses",
    "PyramidEmbedder": ".model",
    "PyramidOutput": ".model",
    "Prediction": ".prediction",
    "calibrate": ".prediction",
    "decode_paths": ".prediction",
    "expected_calibration_error": ".prediction",
    "fit_temperature": ".prediction",
    "TrainConfig": ".train_config",
    "TrainResult": ".training",
    "evaluate": ".training",
    "train": ".training",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "Checkpoint", "CheckpointError", "ConfigError", "ContrastiveLoss", "DataError", "DistributedError", "Embedder",
    "EmbedderConfig", "EmbedderError", "Failure", "LevelVectors", "HierarchicalLoss", "Hierarchy",
    "HierarchyError", "ImageDecodeError", "LevelCrossEntropy", "LossWeights", "PyramidEmbedder",
    "Prediction", "PyramidOutput", "SourceItem", "SourceListing", "TrainConfig", "TrainResult", "WeightsNotFoundError",
    "calibrate", "decode_image", "decode_paths", "evaluate", "expected_calibration_error", "fit_temperature", "load_checkpoint", "load_images", "read_folder_tree", "read_manifest",
    "read_source", "save_checkpoint", "train",
]
