"""Names and defaults that more than one room uses: the one place they are written.

The library validates against these and the CLI builds its choices and help from them;
`tests/test_defaults.py` checks that the registries behind them (torchvision backbones,
Milvus index builders) cover exactly these names.
"""

from __future__ import annotations

DEFAULT_URI = "./hiervec.db"  # a Milvus Lite file, the embedded default
DEFAULT_COLLECTION = "images"

BACKBONES = ("mobilenet_v2", "mobilenet_v3_large", "resnet18", "resnet50")  # embedder.backbones builds each
DEFAULT_BACKBONE = "mobilenet_v2"

# Milvus Lite accepts IVF_PQ, DISKANN and SCANN but fails when loading them.
LITE_INDEXES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW")
SERVER_INDEXES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW", "DISKANN")
DEFAULT_INDEX = "HNSW"
MAX_TOPK = 16384  # Milvus's limit on the hits of one search; `HierStore.search_iter` goes past it

# A leaf label needs this many images (median) for its softmax to help retrieval; below it
# (product-like leaves) the leaf level trains with the contrastive loss alone.
LEAF_SOFTMAX_MIN_IMAGES = 20

# Fine-tuning defaults (embedder.training explains and measures them; the CLI shows them).
BACKBONE_LR_SCALE = 1.0  # the backbone's learning rate, as a share of the new layers'
PROBE_EPOCHS = 0  # epochs of linear probe (backbone frozen) before fine-tuning
HEAD_INITS = ("backbone", "random")  # how the new layers start: as the backbone's principal components, or random
HEAD_INIT = "backbone"
HEAD_INIT_SAMPLE = 2000  # training images whose pooled features set the backbone start (a seeded sample)
PATIENCE = 3  # epochs without a better validation score before training stops
IMAGE_SIZE_RANGE = (64, 224)  # the default input size is read from the data, within these bounds
VAL_MAX = 2000  # validation embeds at most this many held-out images (a seeded sample)

RUNTIMES = ("torch", "onnxruntime", "openvino")  # what runs the model's vector part (embedder.runtimes)
EXPORT_FORMATS = ("onnx", "openvino")  # `hiervec export --format`

FUSIONS = ("rrf", "weighted")  # how a hybrid search fuses the level vectors' rankings
PREDICTED_CHOICES = ("include", "exclude", "only")  # stored images whose category the model predicted

# A folder of models every machine names its own way: collections also record their model's path
# relative to it (milvus_store.HierStore.record_model), and searches look for it there.
MODEL_ROOT_ENV = "HIERVEC_MODEL_ROOT"
