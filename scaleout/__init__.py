"""Scale-out engines over the library: ingest on Ray Data (`ray_ingest`).

A room of its own: it imports `embedder` and `milvus_store` (downward only), and the CLI
calls it, as it calls the library. Ray is an optional extra (`pip install 'hiervec[ray]'`);
importing this package never imports Ray.
"""

from .errors import EngineMissingError, ScaleOutError
from .ray_ingest import EmbedderRecipe, RayOptions, ray_ingest

__all__ = ["EmbedderRecipe", "EngineMissingError", "RayOptions", "ScaleOutError", "ray_ingest"]
