"""`SearchRequest`: validation, the filter it builds, routing, and equality as a batching key."""

from types import SimpleNamespace

import numpy as np
import pytest

from hiervec_core.vectors import LevelVectors
from milvus_store import And, Confident, Eq, FilterError, Ids, LevelVectorMissingError, Not, Predicted, QueryError, Under, UnknownLevelError
from hiervec_app import SearchRequest
from hiervec_app.search import parse_level_weights, parse_where

pytestmark = pytest.mark.unit
KNOWN = {"department": {"clothing", "footwear"}, "category": {"clothing/tops", "footwear/boots"},
         "item": {"clothing/tops/shirt", "footwear/boots/boot"}}
LEVELS = tuple(KNOWN)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"k": 0}, QueryError, r"k must be in \[1, 16384\], got 0"),
    ({"k": 20000}, QueryError, r"k must be in \[1, 16384\], got 20000"),
    ({"group_by": "item", "k": 1000, "group_size": 100}, QueryError, "k x group_size must be at most 16384"),
    ({"group_size": 0}, QueryError, "group_size must be positive, got 0"),
    ({"predicted": "maybe"}, QueryError, "predicted must be one of include, exclude, only, got 'maybe'"),
    ({"min_confidence": 1.5}, QueryError, r"min_confidence must be in \[0, 1\], got 1.5"),
    ({"min_label_confidence": -0.1}, QueryError, r"min_label_confidence must be in \[0, 1\]"),
    ({"fusion": "max"}, QueryError, "fusion must be one of rrf, weighted, got 'max'"),
    ({"fusion": "rrf", "level_weights": {"item": 1}}, QueryError, "level_weights are for weighted fusion"),
    ({"level_weights": {"item": float("nan")}}, QueryError, "the weight of level 'item' must be a positive number"),
    ({"fusion": "rrf", "group_by": "item"}, QueryError, "takes neither level nor group_by"),
    ({"ids": ("a",), "vectors": LevelVectors({}, np.zeros((1, 2)))}, QueryError, "not both"),
])
def test_invalid_requests_fail_when_built(kwargs, error, message):
    with pytest.raises(error, match=message):
        SearchRequest(**kwargs)


def test_levels_are_checked_against_the_collection():
    for kwargs, message in (({"level": "colour"}, "unknown level 'colour' for level; levels are department, "
                                                  "category, item"),
                            ({"auto": "size"}, "unknown level 'size' for auto"),
                            ({"level_weights": {"item": 1, "shop": 2}}, "unknown level 'shop' for level_weights")):
        with pytest.raises(UnknownLevelError, match=message):
            SearchRequest(**kwargs).check(LEVELS, vector_levels=LEVELS)
    with pytest.raises(LevelVectorMissingError, match="cannot fuse level 'department'.*none: it keeps only the image"):
        SearchRequest(fusion="rrf").check(LEVELS, vector_levels=())
    with pytest.raises(LevelVectorMissingError, match=r"cannot search at level 'category'.*kept: item\)"):
        SearchRequest(level="category").check(LEVELS, vector_levels=("item",))
    with pytest.raises(LevelVectorMissingError, match="cannot fuse level 'category'"):
        SearchRequest(fusion="weighted", level_weights={"item": 1, "category": 1}).check(LEVELS, vector_levels=("item",))
    SearchRequest(level="item", group_by="category").check(LEVELS, vector_levels=LEVELS)
    SearchRequest(level="item", group_by="category").check(LEVELS, vector_levels=("item",))
    SearchRequest(fusion="weighted", level_weights={"item": 1}).check(LEVELS, vector_levels=("item",))


def test_the_filter_holds_every_condition_and_leaves_the_query_out():
    request = SearchRequest(where=(("item", "shirt"),), under="clothing", predicted="only", min_label_confidence=0.8)
    assert request.to_filter(KNOWN) == And((And((And((Eq("item", "clothing/tops/shirt"), Under("clothing"))),
                                                 Predicted(True))), Confident("item", 0.8)))
    route = SimpleNamespace(within="clothing/tops")
    assert SearchRequest(ids=("q",)).to_filter(KNOWN, query_id="q", route=route) == \
        And((Under("clothing/tops"), Not(Ids(("q",)))))
    assert SearchRequest(exclude_self=False).to_filter(KNOWN, query_id="q") is None
    with pytest.raises(FilterError, match="unknown category 'hats' at level 'item'"):
        SearchRequest(where=(("item", "hats"),)).to_filter(KNOWN)


def test_routing_takes_the_predicted_category_at_the_level_when_confident():
    prediction = SimpleNamespace(path="clothing/tops/shirt",
                                 probabilities={"department": 0.95, "category": 0.7, "item": 0.4})
    assert SearchRequest(auto="category", min_confidence=0.6).route(prediction).within == "clothing/tops"
    assert SearchRequest(auto="department", min_confidence=0.9).route(prediction).within == "clothing"
    assert SearchRequest(auto="item", min_confidence=0.5).route(prediction).within is None


def test_requests_compare_by_what_they_ask_not_by_their_vectors():
    one, two = LevelVectors({}, np.ones((1, 2))), LevelVectors({}, np.zeros((1, 2)))
    a, b = SearchRequest(k=3, under="clothing").with_vectors(one), SearchRequest(k=3, under="clothing").with_vectors(two)
    assert a == b and hash(a) == hash(b) and a.vectors is one
    assert a != SearchRequest(k=4, under="clothing") and SearchRequest(ids=("x",)) != SearchRequest(ids=("y",))
    assert SearchRequest(level_weights={"item": 2}) == SearchRequest(level_weights=(("item", 2),), fusion="weighted")


def test_form_and_option_texts_parse_or_name_the_culprit():
    assert parse_where(["item=shirt", " category =clothing/tops"]) == (("item", "shirt"), ("category", "clothing/tops"))
    assert parse_level_weights("category=1, item=2.5") == (("category", 1.0), ("item", 2.5))
    assert parse_level_weights(None) == parse_level_weights("") == ()
    with pytest.raises(FilterError, match="where must be LEVEL=CATEGORY, got 'item'"):
        parse_where(["item"])
    with pytest.raises(QueryError, match="got 'item=heavy'"):
        parse_level_weights("category=1,item=heavy")
