"""Memory a Milvus query node needs per million images, by index and collection layout (arithmetic, no server).

    .venv/bin/python bench/memory.py                       # the default model: 3 levels x 64-d, image vector 192-d
    .venv/bin/python bench/memory.py --level-dims 64,64,64,64 --images 10000000

Per vector of d float32 dimensions, what the index keeps in memory (Milvus 2.5 / knowhere):
FLAT the raw vector (4d bytes); HNSW the raw vector plus the base layer's 2M neighbour ids
(4 bytes each; M=16, hiervec's build parameter) and about 1/M of that again for the upper
layers; IVF_SQ8 one byte per dimension plus the 8-byte id in its list; DISKANN keeps only its
PQ codes in memory (1/8 of the raw size, `pq_code_budget_gb_ratio` 0.125) and the rest on
local disk (raw vectors + a 64-neighbour graph). Scalar fields are loaded too: the content-hash
id (64 characters), the URI (about 80), one category path per level (about 30 each), the
predicted flag and one confidence per level, and the meta JSON (taken as 100 bytes here).
"""

from __future__ import annotations

import argparse
import sys

HNSW_M = 16
DISKANN_DEGREE = 64
SCALAR_BYTES = {"id": 64, "uri": 80, "meta": 100}
CATEGORY_BYTES, CONFIDENCE_BYTES = 30, 4


def index_bytes(index: str, dim: int) -> tuple[float, float]:
    """(memory, local disk) bytes per vector of `dim` float32 dimensions."""
    raw = 4 * dim
    if index == "FLAT":
        return raw, 0
    if index == "HNSW":
        links = 2 * HNSW_M * 4
        return raw + links * (1 + 1 / HNSW_M), 0
    if index == "IVF_SQ8":
        return dim + 8, 0
    if index == "DISKANN":
        return raw / 8, raw + 4 * DISKANN_DEGREE
    raise ValueError(f"index must be FLAT, HNSW, IVF_SQ8 or DISKANN, got {index!r}")


def per_image(index: str, level_dims: list[int], level_vectors: bool) -> dict[str, float]:
    """Bytes per image: vectors (memory, disk) and scalars, for one collection layout."""
    dims = [sum(level_dims)] + (list(level_dims) if level_vectors else [])
    memory = sum(index_bytes(index, d)[0] for d in dims)
    disk = sum(index_bytes(index, d)[1] for d in dims)
    scalars = sum(SCALAR_BYTES.values()) + len(level_dims) * (CATEGORY_BYTES + CONFIDENCE_BYTES) + 1
    return {"vectors": memory, "disk": disk, "scalars": scalars}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level-dims", default="64,64,64", help="the model's level vector sizes")
    parser.add_argument("--images", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    dims = [int(d) for d in args.level_dims.split(",")]
    command = "python bench/memory.py" + (f" --level-dims {args.level_dims}" if args.level_dims != "64,64,64" else "") + (
        f" --images {args.images}" if args.images != 1_000_000 else "")
    print(f"# query-node memory for {args.images:,} images, levels {dims} (image vector {sum(dims)}-d), one replica\n\n"
          f"command: {command}\n")
    print("| index | layout | vector fields | vectors GB | scalars GB | total in memory GB | local disk GB |")
    print("|---|---|---|---|---|---|---|")
    for index in ("FLAT", "HNSW", "IVF_SQ8", "DISKANN"):
        for level_vectors in (False, True):
            b = per_image(index, dims, level_vectors)
            gb = {k: v * args.images / 1e9 for k, v in b.items()}
            layout = "every level's vector (default)" if level_vectors else "image vector only"
            print(f"| {index} | {layout} | {1 + len(dims) * level_vectors} | {gb['vectors']:.2f} | {gb['scalars']:.2f} | "
                  f"{gb['vectors'] + gb['scalars']:.2f} | {gb['disk']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
