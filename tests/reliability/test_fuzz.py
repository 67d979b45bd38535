"""Random ids, categories, meta values and form fields against the store and the HTTP API.

Invariants, whatever is thrown: no 500; every good row lands and every bad one is named;
no record twice; every hit can be fetched by its id (and its image by its URL).
"""

from __future__ import annotations

import json
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hiervec_core.names import FILTER_KEYWORDS, RESERVED_FIELDS
from milvus_store import CollectionSpec, HierStore, Record
from milvus_store.records import validate_records
from service import Service, ServiceSettings, create_app

from ..service.conftest import png_bytes

pytestmark = pytest.mark.lite

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=24)  # what a form can carry
ANY_TEXT = st.text(min_size=0, max_size=24)  # lone surrogates too: Python callers can pass them
NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), min_size=1, max_size=8)
GOOD_CATEGORY = st.lists(NAME, min_size=3, max_size=3).map("/".join)
CATEGORY = st.one_of(GOOD_CATEGORY, TEXT, st.lists(NAME, min_size=1, max_size=5).map("/".join))
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.integers(-2**70, 2**70)
                    | st.floats(allow_nan=False,
                                allow_infinity=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=12)
META_TEXT = st.one_of(st.dictionaries(TEXT, JSON, max_size=4).map(json.dumps), TEXT, JSON.map(json.dumps))
# level names a client may send: the filter language's words in any case, hiervec's own fields, odd text
LEVEL_NAME = st.one_of(st.sampled_from(FILTER_KEYWORDS).flatmap(lambda w: st.sampled_from([w, w.upper(), w.title()])),
                       st.sampled_from(RESERVED_FIELDS + ("conf_item", "vec_item", "$meta")), TEXT)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


@FUZZ
@given(rows=st.lists(st.tuples(ANY_TEXT, CATEGORY, st.dictionaries(ANY_TEXT, JSON, max_size=3)), min_size=1,
                     max_size=6))
def test_the_store_takes_every_good_row_and_names_every_bad_one(tmp_path_factory, rows):
    spec = CollectionSpec(("a", "b", "c"), dim=4)
    vector = np.full(4, 0.5, np.float32)
    records = [Record(category, vector, id=rid, meta=meta) for rid, category, meta in rows]
    good_rows, problems = validate_records(records, spec)
    assert len(good_rows) + len(problems) == len(records)
    assert len({r["id"] for r in good_rows}) == len(good_rows)  # never the same id twice in one write
    with HierStore(str(tmp_path_factory.mktemp("fuzz") / "s.db"), "s", spec=spec) as store:
        store.upsert_rows(good_rows)
        store.flush()
        assert store.count() == len(good_rows)
        found = {hit.id: hit for hit in store.get([r["id"] for r in good_rows])}
        assert set(found) == {r["id"] for r in good_rows}
        for row in good_rows:
            assert found[row["id"]].meta == row["meta"]


@pytest.fixture(scope="module")
def api(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-api")
    service = Service.open(ServiceSettings(lite_process=False, model=str(tiny_model), uri=str(folder / "f.db"),
                                           media_dir=str(folder / "media"), api_key="fuzz-k3y"))
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        yield client, {}


KEY = {"X-API-Key": "fuzz-k3y"}


@FUZZ
@given(uploads=st.lists(st.tuples(st.integers(0, 10_000), st.one_of(st.none(), TEXT), CATEGORY, META_TEXT),
                        min_size=1, max_size=3),
       k=st.one_of(st.integers(1, 12), st.integers(1, 12), st.integers(-2, 5000)),
       group=st.one_of(st.sampled_from([None, None, "department", "item", "colour"]), LEVEL_NAME),
       level=st.one_of(st.none(), st.none(), st.sampled_from(["department", "item"]), LEVEL_NAME),
       group_size=st.one_of(st.integers(1, 4), st.integers(1, 4), st.integers(-1, 3000)),
       where=st.lists(st.one_of(st.sampled_from(["department=clothing", "item=shirt", "category=clothing/tops"]),
                                TEXT, LEVEL_NAME.map(lambda name: f"{name}=clothing")), max_size=2),
       under=st.one_of(st.none(), st.none(), st.sampled_from(["clothing", "footwear/boots"]), TEXT))
def test_the_api_never_fails_with_500_and_keeps_what_it_says(api, uploads, k, group, level, group_size, where,
                                                              under):
    client, stored = api
    files = [("images", (f"{seed}.png", png_bytes((seed % 256, seed // 40 % 256, 90), seed), "image/png"))
             for seed, *_ in uploads]
    data = {"category": [c for _, _, c, _ in uploads], "meta": [m for *_, m in uploads]}
    if all(rid is not None for _, rid, _, _ in uploads):
        data["id"] = [rid for _, rid, _, _ in uploads]
    response = client.post("/images", headers=KEY, files=files, data=data)
    event(f"POST /images {response.status_code}")
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200 or "results" in body:
        for result in body["results"]:
            assert result["status"] in ("stored", "updated", "duplicate", "failed")
            if result["status"] in ("stored", "updated"):
                stored[result["id"]] = True
            if result["status"] == "failed":
                assert result["reason"]  # every bad row is named
    else:
        assert set(body) == {"error"} and body["error"]["status"] == response.status_code

    for rid in list(stored)[-5:]:  # every stored record can be fetched by its id
        record = client.get(f"/images/{quote(rid, safe='')}")
        assert record.status_code == 200 and record.json()["id"] == rid, (rid, record.text)
    count = client.get("/stats").json()["count"]
    assert count == len(stored)  # nothing lost, nothing twice

    form = {"k": str(k), "group_size": str(group_size), "where": where}
    if group is not None:
        form["group_by"] = group
    if level is not None:
        form["level"] = level
    if under is not None:
        form["under"] = under
    if stored:
        form["id"] = next(iter(stored))
    response = client.post("/search", data=form)
    event(f"POST /search {response.status_code}")
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        hits = response.json()["hits"]
        assert len({h["id"] for h in hits}) == len(hits)
        for hit in hits:
            assert client.get(f"/images/{quote(hit['id'], safe='')}").status_code == 200
            if hit["image_url"]:
                assert client.get(hit["image_url"]).status_code == 200
    else:
        assert set(response.json()) == {"error"}
