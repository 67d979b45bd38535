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
DEFAULT_RUNTIME = "auto"  # what the CLI, the service and Ray actors run: the fastest installed on CPUs, torch on GPUs
DEFAULT_DEVICE = "auto"  # CUDA if available, else MPS, else the CPU (embedder.devices.resolve_device)
EXPORT_FORMATS = ("onnx", "openvino")  # `hiervec export --format`

FUSIONS = ("rrf", "weighted")  # how a hybrid search fuses the level vectors' rankings
PREDICTED_CHOICES = ("include", "exclude", "only")  # stored images whose category the model predicted

# A folder of models every machine names its own way: collections also record their model's path
# relative to it (milvus_store.HierStore.record_model), and searches look for it there.
MODEL_ROOT_ENV = "HIERVEC_MODEL_ROOT"

# -- level names -----------------------------------------------------------------------------
# A level's name is a Milvus field name and a word in Milvus's filter language, so one rule,
# applied wherever a hierarchy is made (training, ingest, the HTTP API): an identifier of at
# most 63 characters that is neither a field hiervec writes itself nor a word of the filter
# language (Milvus's Plan.g4 keywords, in any case: `category == "x" or ...` must parse).
LEVEL_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
RESERVED_FIELDS = ("id", "uri", "meta", "vec", "predicted")
RESERVED_PREFIXES = ("vec_", "conf_")
FILTER_KEYWORDS = (
    "and", "or", "not", "in", "like", "exists", "is", "null", "true", "false",
    "json_contains", "json_contains_all", "json_contains_any",
    "array_contains", "array_contains_all", "array_contains_any", "array_length", "element_filter",
    "text_match", "phrase_match", "random_sample", "match_all", "match_any", "match_least", "match_most",
    "match_exact", "minimum_should_match", "threshold", "interval", "iso",
    "st_equals", "st_touches", "st_overlaps", "st_crosses", "st_contains", "st_intersects", "st_within",
    "st_dwithin", "st_isvalid",
)


def level_name_problem(name) -> str | None:
    """Why `name` cannot name a level, or None when it can. The reasons list what is reserved."""
    import re

    if not isinstance(name, str) or not re.match(LEVEL_NAME_PATTERN, name):
        return (f"level name {name!r} must be an identifier: a letter or underscore, then letters, digits or "
                f"underscores, at most 63 in all")
    if name in RESERVED_FIELDS or name.startswith(RESERVED_PREFIXES):
        return (f"level name {name!r} is reserved: hiervec's own fields are {', '.join(RESERVED_FIELDS)} and "
                f"the fields starting with {' or '.join(RESERVED_PREFIXES)}")
    if name.lower() in FILTER_KEYWORDS:
        return (f"level name {name!r} is a word of Milvus's filter language (in any case), so no filter could "
                f"name the level; reserved: {', '.join(FILTER_KEYWORDS)}")
    return None
