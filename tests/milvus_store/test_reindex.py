"""Reindex on every store target: the stored rows as items (`stored_items`) into a new collection of
another model; ids, given categories and meta kept, the new model's vectors, a rerun skips everything,
files that moved read from a new root."""

import hashlib
import shutil

import numpy as np

from hiervec_core.vectors import LevelVectors
from milvus_store import Aliases, HierStore
from hiervec_app import ImageIndex, IngestItem
from hiervec_app.reindex import stored_items, stored_root

from .conftest import fresh_collection
from .helpers import LEAVES, LEVELS


class HashEmbedder:
    """A model without torch: an image's vectors are a seeded function of its bytes."""

    level_names, level_dims, dim = LEVELS, (4, 4, 8), 16

    def __init__(self, seed: int, level_vectors: bool):
        self.seed, self.fingerprint = seed, f"hash-model-{seed}"
        self.level_dims = (4, 4, 8) if level_vectors else ()

    def prepare(self, image):
        data = image if isinstance(image, bytes) else open(image, "rb").read()
        return hashlib.sha256(data + bytes([self.seed])).digest()

    def embed(self, prepared) -> LevelVectors:
        rows = np.stack([np.frombuffer(p, dtype=np.uint8)[:16].astype(np.float32) / 255 for p in prepared])
        levels = {name: rows[:, :d] for name, d in zip(LEVELS, self.level_dims)}
        return LevelVectors(levels, rows)


def test_a_reindex_keeps_ids_categories_and_meta_with_the_new_models_vectors(target, tmp_path):
    files = tmp_path / "old-place"
    items = []
    for i, leaf in enumerate(LEAVES[:6]):
        path = files / leaf / f"{i}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(f"image {i}".encode())
        items.append(IngestItem(path, leaf, meta={"n": i}, uri=str(path)))
    old, new = HashEmbedder(0, target.level_vectors), HashEmbedder(1, target.level_vectors)
    first, second = fresh_collection(), fresh_collection()
    with ImageIndex.open(old, target.uri, first) as index:
        assert index.ingest(items).stored == 6
    with HierStore(target.uri, first, create=False) as source:
        assert stored_root(source) == str(files)
        shutil.move(files, tmp_path / "new-place")  # the files moved: read them from their new root
        with ImageIndex.open(new, target.uri, second) as index:
            report = index.ingest(stored_items(source, source=tmp_path / "new-place"))
            assert (report.stored, report.failed) == (6, [])
            again = index.ingest(stored_items(source, source=tmp_path / "new-place"))
            assert (again.stored, again.skipped_present) == (0, 6)  # a rerun resumes: nothing is embedded twice
        before = {h.id: h for h in source.iterate()}
    with HierStore(target.uri, second, create=False) as store:
        after = {h.id: h for h in store.iterate()}
        assert after.keys() == before.keys() and store.fingerprint == new.fingerprint
        stored = store.embeddings(list(after))  # one query (each read waits a second on Milvus 2.3)
        assert list(stored.ids) == list(after)
        for (rid, hit), vector in zip(after.items(), stored.concat):
            assert (hit.categories, hit.meta) == (before[rid].categories, before[rid].meta)
            assert hit.uri.startswith(str(tmp_path / "new-place") + "/")
            expected = new.embed([new.prepare(hit.uri)]).concat[0]
            np.testing.assert_allclose(vector, expected, atol=1e-6)
    alias = fresh_collection() + "_live"
    with Aliases(target.uri) as aliases:
        aliases.set(alias, first)
        assert aliases.set(alias, second).previous == first
    with HierStore(target.uri, alias, create=False) as live:
        assert (live.target, live.count(), live.fingerprint) == (second, 6, new.fingerprint)
