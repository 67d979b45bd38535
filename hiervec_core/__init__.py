"""What every room of hiervec shares, importing nothing heavier than numpy.

- `hiervec_core.names`: names and defaults (collection, backbones, indexes, fusions), read
  by the library and by the CLI's options, so each is written once and `hiervec --help`
  reads them without importing torch or pymilvus;
- `hiervec_core.vectors`: `LevelVectors`, the one vector bundle from the model to the store
  and back.

`embedder` (torch), `milvus_store` (pymilvus), the CLI and the service import from here,
never sideways from each other's rooms.
"""
