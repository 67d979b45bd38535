"""Issue: unlabelled ingest dropped the images the model was surest about.

float32 sums of path probabilities came out at 1.0000001 for the most confident
predictions, and the store refused the record (`confidence at 'shape' must be in [0, 1]`).
Whatever logits the classifiers produce, prediction must yield probabilities the store
accepts.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embedder import Hierarchy, decode_paths
from milvus_store import CollectionSpec, Record
from milvus_store.records import to_rows

pytestmark = pytest.mark.unit

PATHS = ["a/x/1", "a/x/2", "a/y/3", "b/z/4", "b/z/5", "b/w/6", "c/v/7"]
HIERARCHY = Hierarchy.from_paths(PATHS, ("top", "mid", "leaf"))
SPEC = CollectionSpec(HIERARCHY.level_names, dim=4)
LOGIT = st.floats(-1e4, 1e4, allow_nan=False, width=32)


def store_rows(predictions) -> list[dict]:
    records = [Record(p.path, np.full(4, 0.5, np.float32), id=f"r{i}", predicted=True, confidence=p.probabilities)
               for i, p in enumerate(predictions)]
    return to_rows(records, SPEC)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_every_prediction_is_a_probability_the_store_accepts(data):
    n = data.draw(st.integers(1, 6))
    log_probs = []
    for classes in HIERARCHY.num_classes:
        logits = torch.from_numpy(data.draw(arrays(np.float32, (n, classes), elements=LOGIT)))
        scale = data.draw(st.sampled_from([1.0, 16.0, 1e3]))
        log_probs.append(torch.log_softmax(logits * scale, dim=1))
    predictions = decode_paths(dict(zip(HIERARCHY.level_names, log_probs)), HIERARCHY)
    for p in predictions:
        assert all(0.0 <= v <= 1.0 for v in p.probabilities.values()), p.probabilities
        assert all(0.0 <= q <= 1.0 for _, q in p.alternatives)
    assert len(store_rows(predictions)) == n

