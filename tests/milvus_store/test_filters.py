import pytest

from milvus_store import Eq, FilterError, In, Meta, field_names, quote_literal, render, under

pytestmark = pytest.mark.unit

FIELDS = field_names(("department", "category", "item"))


def test_quote_literal_escapes_everything_that_could_end_the_string():
    assert quote_literal('a"b') == r'"a\"b"'
    assert quote_literal("a\\b") == r'"a\\b"'
    assert quote_literal("x\ny\r\tz") == r'"x\ny\r\tz"'
    assert quote_literal('" or 1==1 or "') == r'"\" or 1==1 or \""'
    assert quote_literal(["a", 1, 2.5, True]) == '["a", 1, 2.5, true]'
    for bad in (float("nan"), float("inf"), None, {"a": 1}):
        with pytest.raises(FilterError):
            quote_literal(bad)


def test_templates_carry_values_as_params():
    f = (under("clothing/tops") | In("item", ("a/b/c", 'x"/y/z'))) & ~Meta("price", ">=", 20)
    expr, params = render(f, FIELDS, templates=True)
    assert expr == '((category == {p0} or item in {p1}) and not (meta["price"] >= {p2}))'
    assert params == {"p0": "clothing/tops", "p1": ["a/b/c", 'x"/y/z'], "p2": 20}


def test_literals_have_the_same_shape():
    f = (under("clothing/tops") | In("item", ("a/b/c", 'x"/y/z'))) & ~Meta("price", ">=", 20)
    expr, params = render(f, FIELDS, templates=False)
    assert expr == '((category == "clothing/tops" or item in ["a/b/c", "x\\"/y/z"]) and not (meta["price"] >= 20))'
    assert params == {}


def test_meta_in_is_spelled_as_equalities_and_keys_are_quoted():
    expr, params = render(Meta('we"ird', "in", ["a", "b"]), FIELDS, templates=True)
    assert expr == '(meta["we\\"ird"] == {p0} or meta["we\\"ird"] == {p1})'
    assert params == {"p0": "a", "p1": "b"}


def test_mapping_shorthand():
    expr, params = render({"department": "bags", "item": ["bags/tote/tote"]}, FIELDS, templates=True)
    assert expr == "(department == {p0} and item in {p1})"
    assert params == {"p0": "bags", "p1": ["bags/tote/tote"]}
    assert render(None, FIELDS, templates=True) == ("", {})


@pytest.mark.parametrize(
    "where, message",
    [
        (Eq("colour", "red"), "unknown level 'colour' in filter; levels are department, category, item"),
        (under("a/b/c/d"), "has 4 names but there are 3 levels"),
        (under("a//b"), "must be names separated by"),
        (Eq("item", ""), "must be a non-empty path string"),
        (In("item", ()), "needs at least one value"),
        (Meta("price", "~", 1), "meta operator must be one of"),
        (Meta("colour", "in", "red"), "needs a non-empty list"),
        (Meta("price", "<", float("nan")), "must be finite"),
        ("department == 'x'", "where must be a Filter or a mapping"),
    ],
)
def test_filter_errors_name_the_problem(where, message):
    with pytest.raises(FilterError, match=message):
        render(where, FIELDS, templates=True)


def test_both_joins_optional_conditions():
    from milvus_store import And, Confident, Predicted, both

    assert both(None, None) is None
    assert both(None, Eq("department", "a")) == Eq("department", "a")
    assert both({"department": "a"}, None) == Eq("department", "a")
    assert both({"department": "a"}, Predicted(False)) == And((Eq("department", "a"), Predicted(False)))
    assert render(both(Predicted(True), Confident("item", 0.5)), FIELDS, templates=False)[0] == \
        "(predicted == true and conf_item >= 0.5)"
    with pytest.raises(FilterError, match="unknown level 'size' in filter"):
        render(Confident("size", 0.5), FIELDS, templates=False)
    with pytest.raises(FilterError, match=r"a minimum confidence must be a number in \[0, 1\], got 2"):
        render(Confident("item", 2), FIELDS, templates=False)
