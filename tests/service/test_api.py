"""Every endpoint and error path of the HTTP API, through FastAPI's test client on Milvus Lite."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from milvus_store import CollectionSpec, HierStore
from service import Service, ServiceSettings, create_app

from .conftest import LEAVES, PER_LEAF, ingest_catalogue, png_bytes

pytestmark = pytest.mark.lite
TOTAL = len(LEAVES) * PER_LEAF


def open_service(catalogue, tmp_path, **overrides) -> Service:
    settings = ServiceSettings(lite_process=False, model=str(catalogue.model), uri=str(tmp_path / "api.db"),
                               media_dir=str(tmp_path / "media"), image_roots=(str(catalogue.tree),), **overrides)
    return Service.open(settings)


@pytest.fixture(scope="module")
def filled(catalogue, tmp_path_factory):
    service = open_service(catalogue, tmp_path_factory.mktemp("api"), max_upload_bytes=64 * 1024)
    ingest_catalogue(service, catalogue)
    with TestClient(create_app(service)) as client:
        yield service, client


@pytest.fixture
def empty(catalogue, tmp_path):
    service = open_service(catalogue, tmp_path, api_key="k3y-for-writes")
    with TestClient(create_app(service)) as client:
        yield service, client


def error_of(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"} and body["error"]["status"] == status and body["error"]["code"] == code
    assert "Traceback" not in response.text
    return body["error"]["message"]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- search ------------------------------------------------------------------------------
def test_search_by_upload_matches_the_library(filled, catalogue):
    service, client = filled
    query = catalogue.files["clothing/tops/shirt"][0]
    response = client.post("/search", files={"image": (query.name, query.read_bytes(), "image/png")}, data={"k": 6})
    assert response.status_code == 200, response.text
    body = response.json()
    hits = body["hits"]
    from hiervec_app import SearchRequest

    expected = service.index(None).search(SearchRequest(k=6), [query])[0].hits
    assert [h["id"] for h in hits] == [h.id for h in expected]
    assert np.allclose([h["distance"] for h in hits], [h.distance for h in expected], atol=1e-4)
    assert hits[0]["id"] == sha(query) and hits[0]["distance"] < 1e-5
    assert hits[0]["category"] == "clothing/tops/shirt"
    assert hits[0]["categories"] == {"department": "clothing", "category": "clothing/tops",
                                     "item": "clothing/tops/shirt"}
    assert hits[0]["image_url"].endswith(f"/media/{sha(query)}")
    assert body["query"] == {"filename": query.name} and body["level"] is None


def test_search_by_id_excludes_the_query_and_filters_by_hierarchy(filled, catalogue):
    _, client = filled
    query_id = sha(catalogue.files["clothing/tops/shirt"][1])
    hits = client.post("/search", data={"id": query_id, "k": 50}).json()["hits"]
    assert len(hits) == TOTAL - 1 and query_id not in {h["id"] for h in hits}
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)

    boots = client.post("/search", data={"id": query_id, "k": 50, "where": "department=footwear"}).json()["hits"]
    assert len(boots) == PER_LEAF and {h["category"] for h in boots} == {"footwear/boots/boot"}

    tops = client.post("/search", data={"id": query_id, "k": 50, "under": "clothing/tops",
                                         "where": ["item=coat"]}).json()  # a unique bare name resolves
    assert {h["category"] for h in tops["hits"]} == {"clothing/tops/coat"}
    assert tops["filter"] == {"where": ["item=coat"], "under": "clothing/tops", "group_by": None}

    either = client.post("/search", data={"id": query_id, "k": 50,
                                           "where": ["item=coat", "item=clothing/bottoms/trouser"]}).json()["hits"]
    assert {h["category"] for h in either} == {"clothing/tops/coat", "clothing/bottoms/trouser"}


def test_search_on_a_level_vector_and_grouped(filled, catalogue):
    service, client = filled
    query = catalogue.files["footwear/boots/boot"][0]
    body = client.post("/search", data={"id": sha(query), "k": 4, "level": "department"}).json()
    stored = service.index(None).store.vectors([sha(query)], level="department")[sha(query)]
    expected = service.index(None).store.search(stored[None], 5, level="department")[0]
    assert body["level"] == "department"
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected if h.id != sha(query)][:4]

    grouped = client.post("/search", data={"id": sha(query), "k": 10, "group_by": "item"}).json()["hits"]
    categories = [h["category"] for h in grouped]
    assert len(categories) == len(set(categories)) == len(LEAVES)


@pytest.mark.parametrize("data, files, status, code, message", [
    ({}, None, 422, "bad_query", "exactly one of an uploaded `image` or a stored `id`"),
    ({"id": "x"}, {"image": ("a.png", png_bytes((1, 2, 3), 0))}, 422, "bad_query", "exactly one"),
    ({"id": "nope"}, None, 404, "not_found", "no image with id 'nope'"),
    ({"id": "x", "k": 0}, None, 422, "invalid_request", "k: Input should be greater than or equal to 1"),
    ({"id": "x", "k": "ten"}, None, 422, "invalid_request", "k: Input should be a valid integer"),
    ({"id": "x", "k": 5000}, None, 422, "bad_query", "k must be at most 1000, got 5000"),
    ({"id": "x", "min_confidence": "nan"}, None, 422, "invalid_request", "min_confidence: Input should be a finite"),
    ({"id": "x", "min_label_confidence": "inf"}, None, 422, "invalid_request", "Input should be a finite number"),
    ({"id": "x", "k": 1000, "group_by": "item", "group_size": 100000}, None, 422, "bad_query",
     "k x group_size must be at most 1000 hits, got 1000 x 100000 = 100000000"),
    ({"id": "x", "level": "colour"}, None, 400, "unknown_level", "unknown level 'colour' for level; levels are "
                                                                 "department, category, item"),
    ({"id": "x", "group_by": "size"}, None, 400, "unknown_level", "unknown level 'size' for group_by"),
    ({"id": "x", "where": "colour=red"}, None, 400, "unknown_level", "unknown level 'colour' in where"),
    ({"id": "x", "where": "department=cars"}, None, 400, "bad_filter", "unknown category 'cars' at level "
                                                                       "'department'; known: clothing, footwear"),
    ({"id": "x", "where": "department"}, None, 400, "bad_filter", "where must be LEVEL=CATEGORY, got 'department'"),
    ({"id": "x", "where": 'department=clothing" or 1==1 or "'}, None, 400, "bad_filter", "unknown category 'clothing"),
    ({"id": "x", "under": "clothing\\\" or 1==1"}, None, 400, "bad_filter", "for under"),
    ({"id": "x", "under": "clothing/hats"}, None, 400, "bad_filter", "unknown category 'clothing/hats' for under"),
    ({"id": "x", "under": "a/b/c/d"}, None, 400, "bad_filter", "not a category path of at most 3 levels"),
    ({}, {"image": ("notes.jpg", b"plain text, not a picture")}, 415, "not_an_image", "notes.jpg is not an image"),
    ({}, {"image": ("empty.png", b"")}, 415, "not_an_image", "empty.png is empty"),
    ({}, {"image": ("big.png", b"\x89PNG" + bytes(70_000))}, 413, "too_large",
     "big.png is larger than the 65536 byte limit"),
    ({"id": "x", "collection": "other"}, None, 404, "no_collection", "other"),
])
def test_search_errors_are_json_naming_the_problem(filled, data, files, status, code, message):
    _, client = filled
    assert message in error_of(client.post("/search", data=data, files=files), status, code)


def test_two_query_images_or_ids_in_one_search_are_refused_not_dropped(filled):
    _, client = filled
    two = [("image", ("a.png", png_bytes((1, 2, 3), 0), "image/png")),
           ("image", ("b.png", png_bytes((3, 2, 1), 1), "image/png"))]
    assert "one `image` per search, got 2" in error_of(client.post("/search", files=two), 422, "bad_query")
    ids = client.post("/search", data={"id": ["x", "y"]})
    assert "one `id` per search, got 2" in error_of(ids, 422, "bad_query")


def test_a_collection_of_another_model_is_a_409_and_untouched(filled, tmp_path):
    service, client = filled
    other = CollectionSpec(("a", "b"), dim=4, level_dims=(2, 2), index="FLAT")
    with HierStore(service.settings.uri, "foreign", spec=other, fingerprint="0123456789abcdef") as store:
        before, recorded = store.count(), store.spec
    assert recorded == other.resolved(index="FLAT", partition_key="")  # Lite: every level kept, no key
    message = error_of(client.post("/search", data={"id": "x", "collection": "foreign"}), 409, "model_mismatch")
    assert "foreign" in message and "do not match" in message
    message = error_of(client.post("/images", data={"category": "clothing/tops/shirt", "collection": "foreign"},
                                   files={"images": ("a.png", png_bytes((1, 2, 3), 1))}), 409, "model_mismatch")
    with HierStore(service.settings.uri, "foreign") as store:
        assert store.count() == before == 0 and store.spec == recorded


def test_body_over_the_limit_is_refused_before_it_is_read(filled):
    _, client = filled
    big = b"x" * (400 * 1024)
    response = client.post("/search", content=big, headers={"content-type": "multipart/form-data; boundary=x"})
    assert "over the 65536 byte upload limit" in error_of(response, 413, "too_large")


def test_chunked_bodies_unknown_paths_and_methods_answer_in_the_documented_shape(filled):
    _, client = filled

    def chunks():  # no content-length: the limit is only seen while the body streams in
        for _ in range(100):
            yield b"x" * 4096

    response = client.post("/images", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert "over the 65536 byte upload limit" in error_of(response, 413, "too_large")
    assert error_of(client.get("/no/such/page"), 404, "not_found") == "no endpoint /no/such/page"
    assert error_of(client.put("/search"), 405, "method_not_allowed") == "PUT is not allowed on /search"


def test_per_request_sizes_are_bounded(empty):
    _, client = empty
    many = [("images", (f"{i}.png", png_bytes((i, 2 * i, 3 * i), i), "image/png")) for i in range(65)]
    assert "at most 64 images per request, got 65" in error_of(
        client.post("/images", headers=KEY, files=many, data={"category": "clothing/tops/shirt"}), 413, "too_many_files")
    deep = "[" * 5000 + "]" * 5000
    assert "meta #1 is nested too deeply" in error_of(
        client.post("/images", headers=KEY, files=many[:1], data={"category": "clothing/tops/shirt", "meta": deep}),
        422, "bad_request")
    nested = '{"a": ' * 40 + "1" + "}" * 40  # parses, but deeper than the store keeps
    response = client.post("/images", headers=KEY, files=many[:2], data={
        "category": "clothing/tops/shirt", "meta": [nested, '{"ok": true}']})
    body = response.json()
    assert response.status_code == 200 and body["stored"] == 1 and body["failed"] == 1
    assert "nested more than 32 levels deep" in body["results"][0]["reason"]
    response = client.post("/images", headers=KEY, files=many[2:4], data={  # one record Milvus could not hold
        "category": "clothing/tops/shirt", "meta": ['{"sku": 18446744073709551616}', '{"sku": 7}']})
    body = response.json()
    assert response.status_code == 200 and body["stored"] == 1 and body["failed"] == 1
    assert "meta holds an integer 18446744073709551616 at meta[\"sku\"]" in body["results"][0]["reason"]


def test_images_with_more_pixels_than_the_budget_are_refused_before_decoding(catalogue, tmp_path):
    service = open_service(catalogue, tmp_path, max_pixels=40 * 40, api_key="k")
    big, small = png_bytes((200, 30, 30), 1, size=41), png_bytes((30, 30, 200), 2, size=40)
    with TestClient(create_app(service)) as client:
        message = error_of(client.post("/search", files={"image": ("big.png", big)}), 413, "too_many_pixels")
        assert message == "big.png is 41x41 = 1681 pixels; this service decodes at most 1600"
        body = client.post("/images", headers={"X-API-Key": "k"}, data={"category": "clothing/tops/shirt"},
                           files=[("images", ("big.png", big, "image/png")), ("images", ("ok.png", small, "image/png"))])
        results = body.json()["results"]
        assert body.status_code == 200 and [r["status"] for r in results] == ["failed", "stored"]
        assert results[0]["stage"] == "too_large" and "at most 1600" in results[0]["reason"]
        error_of(client.post("/images", headers={"X-API-Key": "k"}, data={"category": "clothing/tops/shirt"},
                             files={"images": ("big.png", big, "image/png")}), 413, "too_many_pixels")
        budget = client.get("/stats").json()["memory_budget_bytes"]
        assert budget == service.memory_budget
        assert budget["bodies"] == 64 * (service.settings.max_upload_bytes + 64 * 1024)
        assert budget["total"] == budget["bodies"] + budget["query_decoding"] + budget["write_decoding"]


def test_query_images_are_decoded_at_most_one_per_cpu_at_a_time(catalogue, tmp_path, monkeypatch):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor


    service = open_service(catalogue, tmp_path)
    busy, peak, lock = [0], [0], threading.Lock()
    prepare = service.embedder.prepare

    def slow_prepare(data):
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.05)
        with lock:
            busy[0] -= 1
        return prepare(data)

    monkeypatch.setattr(service.embedder, "prepare", slow_prepare)
    image = png_bytes((1, 2, 3), 3)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: service.prepare(image, "q.png"), range(32)))
    assert 1 <= peak[0] <= service.decode_slots
    service.close()


def test_an_unexpected_fault_is_a_json_500_without_a_traceback(catalogue, tmp_path, monkeypatch):
    service = open_service(catalogue, tmp_path)
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        monkeypatch.setattr(service.index(None).store, "embeddings", lambda *a, **k: 1 / 0)
        message = error_of(client.post("/search", data={"id": "x"}), 500, "internal")
    assert message == "internal error; the server log has the details"


def test_a_value_error_from_a_bug_is_a_500_with_its_traceback_logged(catalogue, tmp_path, monkeypatch, caplog):
    """Only the library's own errors are the client's fault: a ValueError from numpy or torch deep
    inside a search is a bug, answered 500 (never 422) with the traceback in the log."""
    service = open_service(catalogue, tmp_path)
    query = {"image": ("q.png", png_bytes((1, 2, 3), 0))}

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together with shapes (1,8) (1,9)")

    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        monkeypatch.setattr(service.index(None).store, "search", broken)
        with caplog.at_level("ERROR", logger="hiervec.service"):
            message = error_of(client.post("/search", files=query), 500, "internal")
    assert "broadcast" not in message
    [record] = [r for r in caplog.records if r.name == "hiervec.service"]
    assert record.exc_info[0] is ValueError and "POST /search" in record.getMessage()


def test_fused_search_and_search_by_id_match_the_library(filled, catalogue):
    from hiervec_app import SearchRequest

    service, client = filled
    query = sha(catalogue.files["footwear/boots/boot"][1])
    for form, request in (({"fuse": "rrf"}, SearchRequest(k=5, fusion="rrf")),
                          ({"level_weights": "category=1,item=3"},
                           SearchRequest(k=5, level_weights={"category": 1, "item": 3})),
                          ({"fuse": "weighted", "level_weights": "item=2", "under": "footwear"},
                           SearchRequest(k=5, level_weights={"item": 2}, under="footwear"))):
        body = client.post("/search", data={"id": query, "k": 5, **form}).json()
        [expected] = service.index(None).search(SearchRequest(**{**request.__dict__, "ids": (query,)}))
        assert [h["id"] for h in body["hits"]] == [h.id for h in expected.hits] and query not in \
            [h["id"] for h in body["hits"]], form
        assert np.allclose([h["distance"] for h in body["hits"]], [h.distance for h in expected.hits])
        assert body["request"]["fusion"] == request.fusion and body["query"] == {"id": query}


@pytest.mark.parametrize("form, status, code, message", [
    ({"fuse": "mean"}, 422, "invalid_request", "fuse: String should match pattern"),
    ({"fuse": "rrf", "level": "item"}, 422, "bad_query", "fusion searches every level's vector at once"),
    ({"fuse": "rrf", "group_by": "item"}, 422, "bad_query", "takes neither level nor group_by"),
    ({"level_weights": "item"}, 422, "bad_query", "level weights must be LEVEL=WEIGHT,..., got 'item'"),
    ({"level_weights": "colour=2"}, 400, "unknown_level", "unknown level 'colour' for level_weights"),
    ({"level_weights": "item=0"}, 422, "bad_query", "the weight of level 'item' must be a positive number"),
])
def test_bad_fusion_requests_name_the_problem(filled, catalogue, form, status, code, message):
    _, client = filled
    query = sha(catalogue.files["footwear/boots/boot"][1])
    assert message in error_of(client.post("/search", data={"id": query, **form}), status, code)


def test_the_openapi_document_lists_every_error_response(filled):
    _, client = filled
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            documented = {int(status) for status in operation["responses"] if status != "200"}
            assert {422, 500, 503} <= documented, (method, path)
            for status in documented:
                content = operation["responses"][str(status)]["content"]["application/json"]["schema"]
                assert content == {"$ref": "#/components/schemas/ErrorOut"} or \
                    content.get("$ref", "").endswith("HTTPValidationError"), (method, path, status)
    writes = [(m, p) for p, ops in schema["paths"].items() for m in ops if m in ("post", "delete") and p != "/search"]
    assert writes and all("401" in schema["paths"][p][m]["responses"] for m, p in writes)
    assert "Prediction" not in schema["components"]["schemas"]  # no dead models


# -- images ------------------------------------------------------------------------------
KEY = {"X-API-Key": "k3y-for-writes"}


def test_add_get_file_update_and_delete(empty, tmp_path):
    service, client = empty
    red, blue = png_bytes((220, 40, 40), 1), png_bytes((40, 40, 220), 2)
    response = client.post("/images", headers=KEY, files=[("images", ("red.png", red, "image/png")),
                                                          ("images", ("blue.png", blue, "image/png"))],
                           data={"category": ["clothing/tops/shirt", "clothing/bottoms/trouser"],
                                 "id": ["sku-1", "sku-2"], "meta": ['{"price": 10}', '{"price": 20}']})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["stored"], body["updated"], body["failed"], body["count"]) == (2, 0, 0, 2)
    assert [(r["filename"], r["id"], r["status"]) for r in body["results"]] == [
        ("red.png", "sku-1", "stored"), ("blue.png", "sku-2", "stored")]

    record = client.get("/images/sku-2").json()
    assert record["category"] == "clothing/bottoms/trouser" and record["meta"] == {"price": 20}
    file = client.get(record["image_url"])
    assert file.status_code == 200 and file.content == blue and file.headers["content-type"] == "image/png"

    again = client.post("/images", headers=KEY, files={"images": ("blue.png", blue, "image/png")},
                        data={"category": "footwear/boots/boot", "id": "sku-2", "meta": '{"price": 25}'}).json()
    assert (again["stored"], again["updated"], again["count"]) == (0, 1, 2)
    record = client.get("/images/sku-2").json()
    assert record["category"] == "footwear/boots/boot" and record["meta"] == {"price": 25}

    hits = client.post("/search", files={"image": ("q.png", blue)}, data={"k": 1}).json()["hits"]
    assert hits[0]["id"] == "sku-2" and hits[0]["distance"] < 1e-5

    assert client.delete("/images/sku-1", headers=KEY).json() == {"deleted": "sku-1", "count": 1}
    error_of(client.get("/images/sku-1"), 404, "not_found")
    error_of(client.delete("/images/sku-1", headers=KEY), 404, "not_found")


def gif_with_a_script() -> bytes:
    """A valid GIF whose bytes also hold an HTML script (a polyglot a browser would run as text/html)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(buffer, format="GIF", comment=b"<script>alert(1)</script>")
    return buffer.getvalue() + b"<html><script>alert(document.cookie)</script></html>"


def test_media_is_served_as_the_image_it_is_never_as_its_name_says(empty):
    _, client = empty
    page = gif_with_a_script()
    body = client.post("/images", headers=KEY, files={"images": ("catalog.html", page, "text/html")},
                       data={"category": "clothing/tops/shirt", "id": "xss"}).json()
    assert body["stored"] == 1, body
    record = client.get("/images/xss").json()
    assert not record["uri"].endswith(".html")
    served = client.get(record["image_url"])
    assert served.status_code == 200 and served.content == page
    assert served.headers["content-type"] == "image/gif"
    assert served.headers["x-content-type-options"] == "nosniff"
    assert served.headers["content-security-policy"] == "default-src 'none'; sandbox"


def test_the_search_page_runs_only_its_own_script(filled):
    _, client = filled
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "script-src 'sha256-" in policy
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"


def test_media_follows_its_record_on_reupload_and_delete(empty, tmp_path):
    service, client = empty
    red, blue = png_bytes((220, 40, 40), 1), png_bytes((40, 40, 220), 2)
    client.post("/images", headers=KEY, files={"images": ("a.png", red, "image/png")},
                data={"category": "clothing/tops/shirt", "id": "sku-9"})
    first = client.get("/images/sku-9", headers=KEY).json()  # with the key: the server's own paths
    again = client.post("/images", headers=KEY, files={"images": ("a.jpg", blue, "image/jpeg")},
                        data={"category": "clothing/tops/shirt", "id": "sku-9"}).json()
    assert again["updated"] == 1
    record = client.get("/images/sku-9", headers=KEY).json()
    assert client.get(record["image_url"]).content == blue  # not the first upload's bytes
    media = [p for p in (tmp_path / "media").rglob("*") if p.is_file()]
    assert [str(p) for p in media] == [record["uri"]] == [first["uri"]]  # one file per id, replaced
    assert client.delete("/images/sku-9", headers=KEY).status_code == 200
    assert not [p for p in (tmp_path / "media").rglob("*") if p.is_file()]  # gone with its record


ODD_IDS = ["brand/sku-1", "a/../b", "/leading", "trailing/", "q?x=1#frag", "100% wool", "space id", "ünï/cødé",
           "dots..", "a//b", "file", "two\nlines", "cr\r\nlf\n"]


def test_every_id_round_trips_through_every_endpoint(empty):
    from urllib.parse import quote

    _, client = empty
    colours = [(20 * i, 200 - 15 * i, 90) for i in range(len(ODD_IDS))]
    files = [("images", (f"{i}.png", png_bytes(c, 50 + i), "image/png")) for i, c in enumerate(colours)]
    body = client.post("/images", headers=KEY, files=files,
                       data={"category": "clothing/tops/shirt", "id": ODD_IDS}).json()
    assert body["stored"] == len(ODD_IDS), body
    for i, odd in enumerate(ODD_IDS):
        path = quote(odd, safe="")
        record = client.get(f"/images/{path}")
        assert record.status_code == 200 and record.json()["id"] == odd, (odd, record.text)
        hits = client.post("/search", data={"id": odd, "k": 20}).json()["hits"]
        assert {h["id"] for h in hits} == set(ODD_IDS[i + 1:])  # the others not yet deleted below
        for hit in hits:  # every hit's image URL leads to its own file
            served = client.get(hit["image_url"])
            assert served.status_code == 200, (hit["id"], hit["image_url"])
            assert served.content == files[ODD_IDS.index(hit["id"])][1][1]
        assert client.delete(f"/images/{path}", headers=KEY).json()["deleted"] == odd
        error_of(client.get(f"/images/{path}"), 404, "not_found")


def test_the_same_image_twice_in_one_request_is_one_record_and_says_so(empty):
    _, client = empty
    red = png_bytes((220, 40, 40), 1)
    body = client.post("/images", headers=KEY, files=[("images", ("a.png", red, "image/png")),
                                                      ("images", ("b.png", red, "image/png"))],
                       data={"category": ["clothing/tops/shirt", "footwear/boots/boot"]}).json()
    assert (body["stored"], body["duplicates"], body["failed"], body["count"]) == (1, 1, 0, 1)
    assert [r["status"] for r in body["results"]] == ["stored", "duplicate"]
    assert "as upload #1 (a.png), which is the one stored" in body["results"][1]["reason"]
    assert client.get(f"/images/{body['results'][0]['id']}").json()["category"] == "clothing/tops/shirt"


def test_same_content_is_the_same_record(empty):
    _, client = empty
    image = png_bytes((1, 200, 1), 3)
    first = client.post("/images", headers=KEY, files={"images": ("a.png", image)}, data={"category": "a/b/c"}).json()
    second = client.post("/images", headers=KEY, files={"images": ("copy.png", image)},
                         data={"category": "a/b/c"}).json()
    assert first["results"][0]["id"] == second["results"][0]["id"] == hashlib.sha256(image).hexdigest()
    assert (first["stored"], second["updated"], second["count"]) == (1, 1, 1)


def test_bad_images_fail_alone_and_valid_ones_land(empty):
    _, client = empty
    response = client.post("/images", headers=KEY, data={"category": ["clothing/tops/shirt", "clothing/tops/coat",
                                                                       "clothing/tops"]},
                           files=[("images", ("ok.png", png_bytes((5, 5, 5), 4))),
                                  ("images", ("broken.jpg", b"\xff\xd8\xff\xe0 truncated")),
                                  ("images", ("short.png", png_bytes((7, 7, 7), 5)))])
    body = response.json()
    assert response.status_code == 200 and (body["stored"], body["failed"], body["count"]) == (1, 2, 1)
    ok, broken, short = body["results"]
    assert ok["status"] == "stored"
    assert broken["status"] == "failed" and broken["stage"] == "decode" and broken["reason"].startswith("not an image")
    assert short["status"] == "failed" and short["stage"] == "invalid" and "clothing/tops" in short["reason"]

    only_bad = client.post("/images", headers=KEY, data={"category": "a/b/c"},
                           files={"images": ("text.jpg", b"hello")})
    assert "not a recognised image format" in error_of(only_bad, 415, "not_an_image")
    assert only_bad.json()["results"][0]["filename"] == "text.jpg"


@pytest.mark.parametrize("data, message", [
    ({"category": ["a/b/c", "a/b/c", "a/b/c"]}, "category: expected 1 or 2 values for 2 images, got 3"),
    ({"category": "a/b/c", "id": "only-one"}, "id: expected 2 values for 2 images, got 1"),
    ({"category": "a/b/c", "meta": "[1, 2]"}, "meta #1 must be a JSON object, got list"),
    ({"category": "a/b/c", "meta": "{oops"}, "meta #1 is not valid JSON"),
])
def test_add_rejects_malformed_requests_and_writes_nothing(empty, data, message):
    service, client = empty
    files = [("images", ("a.png", png_bytes((1, 1, 1), 6))), ("images", ("b.png", png_bytes((2, 2, 2), 7)))]
    assert message in error_of(client.post("/images", headers=KEY, data=data, files=files), 422, "bad_request")
    assert service.index(None).store.count() == 0


def test_api_key_guards_writes_only(empty):
    _, client = empty
    files, data = {"images": ("a.png", png_bytes((3, 3, 3), 8))}, {"category": "a/b/c", "id": "p1"}
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        assert "X-API-Key" in error_of(client.post("/images", files=files, data=data, headers=headers),
                                       401, "unauthorized")
    assert client.post("/images", files=files, data=data, headers={"Authorization": "Bearer k3y-for-writes"}
                       ).status_code == 200
    error_of(client.delete("/images/p1"), 401, "unauthorized")
    assert client.post("/search", data={"id": "p1"}).status_code == 200  # reads need no key
    assert client.delete("/images/p1", headers=KEY).status_code == 200


def test_hits_link_a_file_exactly_when_it_is_served(catalogue, tmp_path):
    """`shows_file` (remembered, one lstat per file) agrees with `servable_file` (a realpath),
    and forgets what it remembered when the service writes."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    inside, secret = root / "sub" / "in.png", outside / "secret.png"
    inside.write_bytes(b"x")
    secret.write_bytes(b"x")
    (root / "leak.png").symlink_to(secret)  # a link inside the root to a file outside it
    (outside / "back.png").symlink_to(inside)  # a link outside the root to a file inside it
    (root / "up").symlink_to(outside, target_is_directory=True)  # a folder link out of the root
    settings = ServiceSettings(lite_process=False, model=str(catalogue.model), uri=str(tmp_path / "files.db"), media_dir=None,
                               image_roots=(str(root),))
    service = Service.open(settings)
    try:
        uris = {str(inside): True, f"file://{inside}": True, str(secret): False, str(root / "leak.png"): False,
                str(outside / "back.png"): True, str(root / "up" / "secret.png"): False,
                str(root / "sub" / ".." / "sub" / "in.png"): True, str(root / "missing.png"): False,
                str(root / "sub"): False, "https://example.com/in.png": False, "": False}
        for uri, shown in uris.items():
            assert service.shows_file(uri) is shown, uri
            assert (service.servable_file(uri) is not None) is shown, uri
        inside.unlink()
        assert service.shows_file(str(inside))  # remembered for FILE_CHECK_CACHE_S
        service.changed(None)  # a write forgets
        assert not service.shows_file(str(inside))
    finally:
        service.close()


def test_files_outside_the_image_roots_are_not_served(empty, tmp_path):
    service, client = empty
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes((0, 0, 0), 9))
    from hiervec_app import IngestItem

    service.index(None).ingest([IngestItem(secret, "a/b/c", id="outside", uri=str(secret))])
    record = client.get("/images/outside", headers=KEY).json()
    assert record["uri"] == str(secret) and record["image_url"] is None
    assert f"lives at '{secret}' where" in error_of(client.get("/media/outside", headers=KEY), 404, "no_file")
    # anonymous clients see no server paths: the file's name in hits, none in errors
    assert client.get("/images/outside").json()["uri"] == "secret.png"
    message = error_of(client.get("/media/outside"), 404, "no_file")
    assert "does not serve" in message and str(tmp_path) not in message


def test_anonymous_clients_see_no_server_paths(catalogue, tmp_path):
    service = open_service(catalogue, tmp_path, api_key="adm1n")
    ingest_catalogue(service, catalogue)
    with TestClient(create_app(service)) as client:
        anonymous, admin = client.get("/stats").json(), client.get("/stats", headers={"X-API-Key": "adm1n"}).json()
        assert str(tmp_path) not in json.dumps(anonymous) and anonymous["uri"] == "<server path>"
        assert admin["uri"] == str(tmp_path / "api.db")
        query = catalogue.files["clothing/tops/coat"][0]
        hits = client.post("/search", files={"image": ("q.png", query.read_bytes())}, data={"k": 3}).json()["hits"]
        assert hits and all("/" not in h["uri"] for h in hits) and hits[0]["uri"] == query.name
        assert str(catalogue.tree) not in json.dumps(hits)
        error = client.post("/search", data={"id": "x", "collection": "missing"}).json()["error"]["message"]
        assert str(tmp_path) not in error


# -- hierarchy, health, stats, page, schema ----------------------------------------------
def test_categories_tree_with_counts(filled):
    _, client = filled
    body = client.get("/categories").json()
    assert body["levels"] == ["department", "category", "item"] and body["total"] == TOTAL
    clothing, footwear = body["tree"]
    assert (clothing["path"], clothing["count"], footwear["path"], footwear["count"]) == (
        "clothing", 3 * PER_LEAF, "footwear", PER_LEAF)
    tops = next(c for c in clothing["children"] if c["name"] == "tops")
    assert [(i["path"], i["level"], i["count"]) for i in tops["children"]] == [
        ("clothing/tops/coat", "item", PER_LEAF), ("clothing/tops/shirt", "item", PER_LEAF)]


def test_health_and_stats(filled):
    service, client = filled
    assert client.get("/healthz").json() == {"status": "ok", "model": service.embedder.fingerprint,
                                             "store": "reachable", "count": TOTAL, "collection": "images"}
    client.post("/search", files={"image": ("q.png", png_bytes((9, 90, 9), 10))})
    stats = client.get("/stats").json()
    assert stats["count"] == TOTAL and stats["levels"] == ["department", "category", "item"]
    assert stats["dim"] == 24 and stats["level_dims"] == [8, 8, 8]
    assert stats["model"]["fingerprint"] == service.embedder.fingerprint
    assert stats["requests"]["POST /search"] >= 1 and stats["embedding"]["items"] >= 1


def test_health_reports_an_unreachable_store(catalogue, tmp_path):
    service = open_service(catalogue, tmp_path)
    with TestClient(create_app(service)) as client:
        service.index(None).store.close()
        body = client.get("/healthz")
    assert body.status_code == 503 and body.json()["status"] == "unavailable"


def test_page_and_openapi_schema(filled):
    _, client = filled
    page = client.get("/")
    assert page.status_code == 200 and "<title>hiervec search</title>" in page.text
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/search", "/images", "/images/{image_id}", "/media/{image_id}",
                                    "/categories", "/healthz", "/stats", "/aliases", "/categories/move", "/sync"}
    search = schema["paths"]["/search"]["post"]
    form = search["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    fields = schema["components"]["schemas"][form]["properties"]
    assert {"image", "id", "k", "level", "where", "under", "group_by", "group_size", "collection", "auto",
            "min_confidence", "predicted", "min_label_confidence"} <= set(fields)
    assert {"200", "400", "404", "413", "415", "422"} <= set(search["responses"])
    assert set(schema["components"]["schemas"]["HitOut"]["properties"]) == {
        "id", "distance", "uri", "category", "categories", "meta", "predicted", "confidence", "image_url"}


def test_the_openapi_document_is_one_client_generators_can_use(filled):
    _, client = filled
    schema = client.get("/openapi.json").json()
    operations = {(method, path): operation for path, ops in schema["paths"].items() for method, operation in ops.items()}
    assert {key: op["operationId"] for key, op in operations.items()} == {
        ("post", "/search"): "search", ("get", "/images/{image_id}"): "get_image",
        ("delete", "/images/{image_id}"): "delete_image", ("get", "/media/{image_id}"): "get_image_file",
        ("post", "/images"): "add_images", ("get", "/categories"): "categories", ("get", "/healthz"): "healthz",
        ("get", "/stats"): "stats", ("get", "/aliases"): "aliases", ("post", "/categories/move"): "move",
        ("post", "/sync"): "sync"}
    bodies = schema["components"]["schemas"]
    image = bodies["Body_search"]["properties"]["image"]["anyOf"][0]
    images = bodies["Body_add_images"]["properties"]["images"]["items"]
    assert image["format"] == images["format"] == "binary" and image["type"] == images["type"] == "string"
    media = operations[("get", "/media/{image_id}")]["responses"]["200"]["content"]
    assert "application/json" not in media and {"image/png", "image/jpeg"} <= set(media)
    assert all(kind["schema"] == {"type": "string", "format": "binary"} for kind in media.values())
    assert schema["components"]["securitySchemes"] == {
        "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                         "description": "The service's API key (`hiervec serve --api-key`, or $HIERVEC_API_KEY)."},
        "BearerKey": {"type": "http", "scheme": "bearer",
                      "description": "The same API key as a bearer token: `Authorization: Bearer KEY`."}}
    either = [{"ApiKeyHeader": []}, {"BearerKey": []}]
    for key, operation in operations.items():
        needs_key = key[0] in ("post", "delete") and key[1] != "/search" or key[1] == "/aliases"
        assert operation.get("security") == (either if needs_key else None), key
    assert operations[("get", "/stats")]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StatsOut"}
    assert client.get("/stats").json().keys() == bodies["StatsOut"]["properties"].keys()


def test_settings_keep_secrets_out_of_repr_and_json(catalogue):
    settings = ServiceSettings(model=str(catalogue.model), token="root:Milvus-s3cret", api_key="k3y-abc")
    assert "s3cret" not in repr(settings) and "k3y-abc" not in repr(settings)
    assert "s3cret" not in settings.to_json() and "k3y-abc" not in settings.to_json()
    assert ServiceSettings.from_json(settings.to_json()) == ServiceSettings(model=str(catalogue.model))
    with pytest.raises(ValueError, match="max_k must be positive, got 0"):
        ServiceSettings(model="m.pt", max_k=0)
    assert json.loads(settings.to_json())["model"] == str(catalogue.model)
    with pytest.raises(ValueError, match="threads must be positive, got 0"):
        ServiceSettings(model="m.pt", threads=0)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=f"store_timeout_s must be positive, got {bad}"):
            ServiceSettings(model="m.pt", store_timeout_s=bad)
    with_deadline = ServiceSettings(model="m.pt", token="root:Milvus-s3cret", store_timeout_s=5.0)
    assert with_deadline.store_connection == {"token": "root:Milvus-s3cret", "timeout": 5.0}
    assert ServiceSettings.from_json(with_deadline.to_json()).store_timeout_s == 5.0  # what --workers N read


def test_the_service_runs_the_model_where_its_settings_say(catalogue, tmp_path, torch_threads):
    import torch

    settings = ServiceSettings(model=str(catalogue.model), device="cpu", amp=True, threads=1)
    assert ServiceSettings.from_json(settings.to_json()) == settings  # what --workers N processes read
    torch_threads(3)  # not the value asked for, whatever this process started with
    service = open_service(catalogue, tmp_path, device="cpu", amp=True, threads=1)
    assert torch.get_num_threads() == 1  # the service sets it, once, for its process
    assert service.embedder.device == torch.device("cpu") and service.embedder.precision.dtype == torch.bfloat16
    service.close()


def test_concurrent_searches_share_milvus_calls_and_match_single_searches(filled, catalogue):
    import asyncio

    from hiervec_app import SearchRequest

    service, _ = filled
    index = service.index(None)
    ids = [sha(p) for paths in catalogue.files.values() for p in paths]
    stored = index.store.embeddings(ids)
    requests = [SearchRequest(k=3), SearchRequest(k=4, under="clothing"), SearchRequest(k=5, group_by="item"),
                SearchRequest(k=2, level="category"), SearchRequest(k=3, fusion="rrf"),
                SearchRequest(k=3, level_weights={"category": 1, "item": 3})]
    assert SearchRequest(k=3).with_vectors(stored.rows([0])) == SearchRequest(k=3).with_vectors(stored.rows([1]))

    async def all_at_once():
        return await asyncio.gather(*(service.search(r.with_vectors(stored.rows([row]))) for row in range(len(ids))
                                      for r in requests))

    before = service.searching.stats.batches
    results = asyncio.run(all_at_once())
    assert service.searching.stats.batches - before < len(results)
    for n, (row, r) in enumerate((row, r) for row in range(len(ids)) for r in requests):
        [alone] = index.search(r.with_vectors(stored.rows([row])))
        assert [h.id for h in results[n].hits] == [h.id for h in alone.hits], r
        assert 0 < len(alone.hits) <= r.k


def test_unlabelled_uploads_are_predicted_and_auto_routes_the_query(empty):
    service, client = empty
    images = [("images", (f"{i}.png", png_bytes((40 * i, 90, 200 - 40 * i), 20 + i))) for i in range(4)]
    body = client.post("/images", headers=KEY, files=images, data={"category": ["", "clothing/tops/shirt", "", ""]}).json()
    assert (body["stored"], body["predicted"]) == (4, 3)
    guessed = [r for r in body["results"] if r["predicted_path"]]
    assert [r["filename"] for r in guessed] == ["0.png", "2.png", "3.png"]
    for result in guessed:
        record = client.get(f"/images/{result['id']}").json()
        assert record["predicted"] and record["category"] == result["predicted_path"]
        assert 0 < record["confidence"]["item"] <= record["confidence"]["department"] <= 1

    query = {"image": ("q.png", png_bytes((0, 90, 200), 20))}
    routed = client.post("/search", files=query, data={"k": 10, "auto": "department", "min_confidence": 0}).json()
    assert routed["routing"]["routed"] and routed["routing"]["within"] == routed["routing"]["predicted_path"].split("/")[0]
    assert {h["categories"]["department"] for h in routed["hits"]} == {routed["routing"]["within"]}
    plain = client.post("/search", files=query, data={"k": 10, "auto": "department", "min_confidence": 1}).json()
    assert not plain["routing"]["routed"] and len(plain["hits"]) == 4
    only = client.post("/search", files=query, data={"k": 10, "predicted": "only"}).json()["hits"]
    assert sorted(h["id"] for h in only) == sorted(r["id"] for r in guessed)
    assert "unknown level 'size' for auto" in error_of(
        client.post("/search", files=query, data={"auto": "size"}), 400, "unknown_level")


def test_a_moved_alias_is_followed_and_a_request_keeps_the_generation_it_arrived_with(catalogue, tmp_path):
    """The service serves an alias's collection with the model that collection records; after the alias
    moves, `follow_alias` loads the new model beside the old one and swaps both at once, and a request
    pinned before the swap still embeds and searches with the old pair."""
    import torch

    from embedder import Embedder, EmbedderConfig, Hierarchy, PyramidEmbedder, save_checkpoint
    from milvus_store import Aliases
    from hiervec_app import ImageIndex, IngestItem

    from ..conftest import LEVELS

    hierarchy = Hierarchy.from_paths(list(LEAVES), LEVELS)
    torch.manual_seed(1)
    config = EmbedderConfig.for_hierarchy(hierarchy, dim=8, backbone="resnet18", image_size=32, fpn_channels=16)
    new_model = tmp_path / "new.pt"
    save_checkpoint(new_model, PyramidEmbedder(config), hierarchy)
    db = str(tmp_path / "api.db")
    items = [IngestItem(path, leaf, uri=str(path)) for leaf, paths in catalogue.files.items() for path in paths]
    for name, model in (("shop_v1", catalogue.model), ("shop_v2", new_model)):
        with ImageIndex.open(Embedder.from_checkpoint(model), db, name) as index:
            index.ingest(items)
            index.store.record_model(str(model))
    with Aliases(db) as aliases:
        aliases.set("shop", "shop_v1")
    service = open_service(catalogue, tmp_path, collection="shop", alias_check_s=0)
    try:
        old = service.generation
        assert (old.collection, service.follow_alias()) == ("shop_v1", False)
        query = catalogue.files["footwear/boots/boot"][0]
        with TestClient(create_app(service)) as client:
            before = client.post("/search", files={"image": ("q.png", query.read_bytes())}, data={"k": 1}).json()
            assert (before["collection"], before["model"]) == ("shop_v1", old.embedder.fingerprint)

            pinned = service.pin()  # a request that arrived before the switch
            with Aliases(db) as aliases:
                aliases.set("shop", "shop_v2")
            assert service.follow_alias() and service.generation.collection == "shop_v2"
            assert service.current() is old and service.index(None).store.collection == "shop_v1"
            service.unpin(pinned)
            assert service.current().embedder.fingerprint != old.embedder.fingerprint

            after = client.post("/search", files={"image": ("q.png", query.read_bytes())}, data={"k": 1}).json()
            assert (after["collection"], after["model"]) == ("shop_v2", service.generation.embedder.fingerprint)
            assert after["hits"][0]["id"] == before["hits"][0]["id"] == sha(query)
            assert after["hits"][0]["distance"] < 1e-5  # the new model's query in the new model's collection
            assert client.get("/healthz").json()["collection"] == "shop_v2"
    finally:
        service.close()


def test_catalogue_administration_needs_the_key_and_moves_and_syncs_the_served_collection(catalogue, tmp_path):
    service = open_service(catalogue, tmp_path, api_key="adm1n-k3y")
    ids = ingest_catalogue(service, catalogue)
    key = {"X-API-Key": "adm1n-k3y"}
    try:
        with TestClient(create_app(service)) as client:
            assert error_of(client.get("/aliases"), 401, "unauthorized")
            assert error_of(client.post("/sync", json={"ids": ids}), 401, "unauthorized")
            assert client.get("/aliases", headers=key).json() == {
                "served": "images", "collection": "images", "model": service.embedder.fingerprint, "aliases": {}}

            moved = client.post("/categories/move", data={"from": "clothing/tops", "to": "clothing/upper"},
                                headers=key).json()
            assert (moved["moved"], moved["level"], moved["count"]) == (2 * PER_LEAF, "category", TOTAL)
            counts, stack = {}, list(client.get("/categories").json()["tree"])
            while stack:
                node = stack.pop()
                counts[node["path"]] = node["count"]
                stack += node["children"]
            assert (counts["clothing/upper"], counts["clothing/upper/shirt"]) == (2 * PER_LEAF, PER_LEAF)
            assert counts.get("clothing/tops", 0) == 0  # the listing follows the move
            refused = client.post("/categories/move", data={"from": "clothing/upper", "to": "footwear/boots"},
                                  headers=key)
            assert "already holds" in error_of(refused, 400, "store_error")

            dry = client.post("/sync", json={"ids": ids[:5], "dry_run": True}, headers=key).json()
            assert (dry["stale"], dry["removed"], dry["count"], dry["scope"]) == (TOTAL - 5, 0, TOTAL,
                                                                                  "the collection")
            done = client.post("/sync", json={"ids": ids[:5]}, headers=key).json()
            assert (done["removed"], done["count"]) == (TOTAL - 5, 5)
            assert error_of(client.post("/sync", json={"ids": []}, headers=key), 422, "bad_query")
    finally:
        service.close()
    open_to_all = open_service(catalogue, tmp_path / "no-key")
    try:
        with TestClient(create_app(open_to_all)) as client:
            assert "needs the service to have an API key" in error_of(client.get("/aliases"), 403, "forbidden")
    finally:
        open_to_all.close()
