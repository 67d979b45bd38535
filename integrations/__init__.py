"""hiervec inside the tools image-search people already use: each module is an optional extra.

- `integrations.llamaindex`: `HiervecEmbedding`, a LlamaIndex `MultiModalEmbedding` (``hiervec[llamaindex]``).
- `integrations.fiftyone`: a FiftyOne model and the ``hiervec`` similarity backend (``hiervec[fiftyone]``).

timm backbones are not here: they are backbones like torchvision's (`embedder.timm_backbones`).
"""
