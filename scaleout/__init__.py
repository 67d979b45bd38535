"""Scale-out engines over the library: the ingest pipeline's steps on Ray Data (`RayExecutor`).

A room of its own: it imports `hiervec_app`, `embedder` and `milvus_store` (downward only), and the CLI
calls it, as it calls the library. Ray is an optional extra (`pip install 'hiervec[ray]'`);
importing this package never imports Ray.
"""

from hiervec_core.lazy import lazy_exports

_EXPORTS = {
    "EngineMissingError": ".errors",
    "ScaleOutError": ".errors",
    "EmbedderRecipe": ".options",
    "RayExecutor": ".ray_engine",
    "RayOptions": ".options",
    "ray_ingest": ".ray_engine",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["EmbedderRecipe", "EngineMissingError", "RayExecutor", "RayOptions", "ScaleOutError", "ray_ingest"]
