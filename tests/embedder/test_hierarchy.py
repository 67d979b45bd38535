import pytest

from embedder import Hierarchy, HierarchyError

pytestmark = pytest.mark.unit

PATHS = ["clothing/tops/t-shirt", "clothing/tops/shirt", "clothing/bottoms/trouser", "footwear/boots/ankle-boot"]
LEVELS = ("department", "category", "item")


def test_vocabularies_parents_and_codes():
    h = Hierarchy.from_paths(PATHS + PATHS[:1], LEVELS)
    assert h.vocabularies[0] == ("clothing", "footwear")
    assert h.vocabularies[1] == ("clothing/bottoms", "clothing/tops", "footwear/boots")
    assert h.num_classes == (2, 3, 4)
    assert h.parents[1] == (0, 0, 1)
    assert h.parents[2] == (0, 1, 1, 2)  # trouser, shirt, t-shirt, ankle-boot
    assert h.encode("clothing/tops/shirt") == (0, 1, 1)
    assert h.encode(["footwear", "boots", "ankle-boot"]) == (1, 2, 3)
    assert h.decode((0, 1, 2)) == "clothing/tops/t-shirt"
    assert h.encode_many(PATHS).tolist() == [[0, 1, 2], [0, 1, 1], [0, 0, 0], [1, 2, 3]]
    assert h.ancestors().tolist() == [[0, 0, 0], [0, 1, 1], [0, 1, 2], [1, 2, 3]]
    assert h.prefixes("clothing/tops/shirt") == {
        "department": "clothing", "category": "clothing/tops", "item": "clothing/tops/shirt"}
    assert h.level_of("clothing/tops") == ("category", "clothing/tops")


def test_same_name_under_two_parents_is_two_categories():
    h = Hierarchy.from_paths(["men/accessories", "women/accessories"], ("gender", "kind"))
    assert h.num_classes == (2, 2)
    assert h.encode("men/accessories") != h.encode("women/accessories")
    assert h.decode(h.encode("women/accessories")) == "women/accessories"


def test_json_round_trip():
    h = Hierarchy.from_paths(PATHS, LEVELS)
    again = Hierarchy.from_json(h.to_json())
    assert again == h
    assert again.parents == h.parents
    assert again.encode("clothing/tops/shirt") == h.encode("clothing/tops/shirt")


def test_default_level_names_follow_the_depth():
    assert Hierarchy.from_paths(["a/b", "c/d"]).level_names == ("level1", "level2")


def test_ragged_depth_is_rejected_naming_the_path():
    with pytest.raises(HierarchyError, match="'bags/tote' has 2 levels, expected 3"):
        Hierarchy.from_paths(PATHS + ["bags/tote"], LEVELS)


def test_padding_repeats_the_leaf():
    h = Hierarchy.from_paths(PATHS + ["bags/tote"], LEVELS, pad=True)
    assert "bags/tote/tote" in h.leaves
    assert h.encode("bags/tote", pad=True) == h.encode("bags/tote/tote")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("clothing//shirt", "empty or whitespace-only category name in path 'clothing//shirt'"),
        ("clothing/ /shirt", "empty or whitespace-only"),
        ("clothing/tops /shirt", "leading or trailing whitespace"),
        (["clothing", "tops/x", "shirt"], "contains the separator"),
    ],
)
def test_bad_names_are_rejected(bad, message):
    with pytest.raises(HierarchyError, match=message):
        Hierarchy.from_paths([bad], LEVELS)


def test_unknown_category_and_inconsistent_codes():
    h = Hierarchy.from_paths(PATHS, LEVELS)
    with pytest.raises(HierarchyError, match="unknown category 'clothing/tops/coat'"):
        h.encode("clothing/tops/coat")
    with pytest.raises(HierarchyError, match="do not form a path"):
        h.decode((1, 1, 1))
    with pytest.raises(HierarchyError, match="unknown level 'colour'"):
        h.level_index("colour")
    with pytest.raises(HierarchyError, match="unknown category 'clothing/hats' at level 'category'"):
        h.level_of("clothing/hats")


@pytest.mark.parametrize(
    "names, message",
    [(("only",), "2 to 5 levels"), (tuple("abcdef"), "2 to 5 levels"), (("a", "1b"), "must be an identifier"),
     (("a", "a"), "distinct"), (("meta", "b"), "level name 'meta' is reserved"),
     (("a", "conf_x"), "the fields starting with vec_ or conf_"), (("a", "LIKE"), "filter language"),
     (("Not", "b"), "filter language"), (("a", "array_length"), "filter language")],
)
def test_level_names_are_validated(names, message):  # before training: the store's and the filter's rule
    paths = ["/".join(f"n{i}" for i in range(len(names)))]
    with pytest.raises(HierarchyError, match=message):
        Hierarchy.from_paths(paths, names)
