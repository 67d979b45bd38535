"""The one ingest pipeline (`hiervec_app.ingest`): every item's outcome, the rules applied whatever
the batch size, on_present, the check and uri hooks, sinks, and the model location recorded.

A model without torch (bytes -> seeded vectors) over Milvus Lite in tmp_path."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest

from hiervec_app import IngestItem, ItemOutcome, ThreadExecutor, UpsertSink, run_ingest
from hiervec_app.ingest import IngestRun
from hiervec_core.vectors import LevelVectors
from milvus_store import CollectionSpec, HierStore, QueryError, content_id

pytestmark = pytest.mark.lite

LEVELS = ("department", "category", "item")
LEAF = "d0/c00/i000"


class BytesEmbedder:
    """Vectors are a function of the bytes; b"broken..." does not decode; predicts LEAF when asked."""

    level_names, level_dims, dim, fingerprint = LEVELS, (4, 4, 8), 16, "bytes-model"
    categories = {"department": {"d0"}, "category": {"d0/c00"}, "item": {LEAF}}

    def __init__(self, location: str | None = None):
        self.location = location

    def prepare(self, image):
        data = image if isinstance(image, bytes) else open(image, "rb").read()
        if data.startswith(b"broken"):
            raise ValueError("cannot identify image file")
        return hashlib.sha256(data).digest()

    def embed(self, prepared) -> LevelVectors:
        rows = np.stack([np.frombuffer(p, dtype=np.uint8)[:16].astype(np.float32) / 255 + 0.01 for p in prepared])
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return LevelVectors({name: rows[:, :d] for name, d in zip(LEVELS, self.level_dims)}, rows)

    def predict_vectors(self, vectors):
        @dataclass
        class Guess:
            path: str
            probabilities: dict

        return [Guess(LEAF, {level: 0.9 for level in LEVELS}) for _ in range(len(vectors))]


class FlatNoPredictor(BytesEmbedder):
    """The same model without category prediction."""

    predict_vectors = None  # not a CategoryPredictor

    def __getattribute__(self, name):
        if name in ("predict_vectors", "categories"):
            raise AttributeError(name)
        return super().__getattribute__(name)


@pytest.fixture
def store(tmp_path):
    spec = CollectionSpec(LEVELS, dim=16, level_dims=(4, 4, 8), index="FLAT")
    with HierStore(str(tmp_path / "p.db"), "images", spec=spec, fingerprint="bytes-model") as opened:
        yield opened


def listing(tmp_path) -> list[IngestItem]:
    """good a, a copy of a, broken, a copy of broken, good b (unlabelled), a missing file, an id Milvus refuses."""
    files = {"a.png": b"image a", "a-copy.png": b"image a", "broken.png": b"broken bytes",
             "broken-copy.png": b"broken bytes", "b.png": b"image b"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [IngestItem(tmp_path / "a.png", LEAF, uri="a"), IngestItem(tmp_path / "a-copy.png", LEAF, uri="a-copy"),
            IngestItem(tmp_path / "broken.png", LEAF, uri="broken"),
            IngestItem(tmp_path / "broken-copy.png", LEAF, uri="broken-copy"),
            IngestItem(tmp_path / "b.png", None, uri="b"), IngestItem(tmp_path / "gone.png", LEAF, uri="gone"),
            IngestItem(b"image c", LEAF, id="x" * 70_000, uri="c")]


def summary(outcomes: list[ItemOutcome]) -> list[tuple]:
    return [(o.position, o.status, o.same_as, o.stage) for o in outcomes]


EXPECTED = [(0, "stored", None, None), (1, "duplicate", 0, None), (2, "failed", None, "decode"),
            (3, "failed", None, "decode"), (4, "stored", None, None), (5, "failed", None, "read"),
            (6, "failed", None, "invalid")]


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_every_item_has_one_outcome_whatever_the_batch_size(tmp_path, store, batch_size):
    items = listing(tmp_path)
    progress = []
    report = run_ingest(items, BytesEmbedder(), store, executor=ThreadExecutor(batch_size), progress=progress.append)
    assert summary(report.items) == EXPECTED
    a, b = content_id(b"image a"), content_id(b"image b")
    assert [o.id for o in report.items[:5]] == [a, a, content_id(b"broken bytes"), content_id(b"broken bytes"), b]
    assert report.items[3].reason == report.items[2].reason == "cannot identify image file"  # the same bytes fail alike
    assert report.items[4].category == LEAF and report.items[4].predicted and not report.items[0].predicted
    assert "does not exist" in report.items[5].reason
    assert (report.seen, report.stored, report.predicted, report.skipped_present) == (7, 2, 1, 0)
    assert [d.source for d in report.duplicates] == ["a-copy"] and report.duplicates[0].same_as == "a"
    assert [f.source for f in report.failed] == ["broken", "broken-copy", "gone", "c"]
    assert report.ids == [a, b] and sum(progress) == 7 and store.count() == 2

    again = run_ingest(items, BytesEmbedder(), store, executor=ThreadExecutor(batch_size))
    assert summary(again.items)[:2] == [(0, "present", None, None), (1, "duplicate", 0, None)]
    assert again.items[4].status == "present" and (again.stored, again.skipped_present) == (0, 2)


def test_replace_embeds_present_ids_again_and_says_so(tmp_path, store):
    items = listing(tmp_path)[:2]
    run_ingest(items[:1], BytesEmbedder(), store)
    report = run_ingest(items, BytesEmbedder(), store, on_present="replace")
    assert [(o.status, o.replaced) for o in report.items] == [("stored", True), ("duplicate", False)]
    with pytest.raises(QueryError, match="on_present must be one of skip, replace, got 'keep'"):
        IngestRun(items, store, on_present="keep")


def test_an_item_without_a_category_fails_when_the_model_cannot_predict(tmp_path, store):
    report = run_ingest(listing(tmp_path)[4:5], FlatNoPredictor(), store)
    [outcome] = report.items
    assert (outcome.status, outcome.stage, outcome.id) == ("failed", "invalid", content_id(b"image b"))
    assert "cannot predict" in outcome.reason


def test_the_check_refuses_items_and_uri_of_names_where_they_are_stored(tmp_path, store):
    items = [IngestItem(b"image a", LEAF), IngestItem(b"image big", LEAF), IngestItem(b"image a", LEAF)]

    def check(item, data):
        return ("too_large", "too many pixels") if b"big" in data else None

    report = run_ingest(items, BytesEmbedder(), store, check=check, uri_of=lambda item, rid: f"/media/{rid[:8]}")
    assert [(o.status, o.stage, o.reason) for o in report.items] == [
        ("stored", None, None), ("failed", "too_large", "too many pixels"), ("duplicate", None, None)]
    rid = content_id(b"image a")
    assert report.items[0].uri == f"/media/{rid[:8]}" and store.get([rid])[0].uri == f"/media/{rid[:8]}"


def test_rows_go_to_the_sink_and_the_model_location_is_recorded(tmp_path, store):
    class Recording(UpsertSink):
        def __init__(self, store):
            super().__init__(store)
            self.written, self.finished = [], 0

        def write(self, rows):
            self.written += [row["id"] for row in rows]
            return super().write(rows)

        def finish(self):
            self.finished += 1
            return {"rows": len(self.written)}

    sink = Recording(store)
    report = run_ingest(listing(tmp_path), BytesEmbedder(location="/models/m.pt"), store, sink=sink)
    assert sink.written == report.ids and sink.finished == 1 and report.sink == {"rows": 2}
    assert report.model_recorded == "/models/m.pt" and store.model_location == "/models/m.pt"
    with HierStore(store.settings.uri, "images", create=False) as reopened:
        assert reopened.model_location == "/models/m.pt"


def test_the_executor_bounds_its_sizes():
    with pytest.raises(QueryError, match="batch_size must be in"):
        ThreadExecutor(0)
    with pytest.raises(QueryError, match="workers must be in"):
        ThreadExecutor(8, workers=10_000)
