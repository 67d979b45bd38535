"""hiervec in FiftyOne, through FiftyOne's own API against its bundled database (mongod on loopback):
`HiervecModel` in `apply_model` / `compute_embeddings`, and the ``hiervec`` similarity backend in
`fiftyone.brain.compute_similarity` / `sort_by_similarity`, whose category views reach Milvus as
hiervec level filters and return what `hiervec search --where` returns."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from embedder import Embedder

from ..conftest import LEVELS, needs
from ..servers import FiftyOneDatabase
from .conftest import images

pytestmark = [pytest.mark.server, needs("fiftyone", "FiftyOne is not installed (pip install 'hiervec[fiftyone]')")]


@pytest.fixture(scope="module")
def fo(tmp_path_factory):
    database = FiftyOneDatabase(tmp_path_factory.mktemp("fiftyone-db"))
    try:
        database.start()
    except RuntimeError as exc:
        pytest.skip(f"FiftyOne's database cannot start here: {exc}")
    patch = pytest.MonkeyPatch()
    patch.setenv("FIFTYONE_DATABASE_URI", database.uri)
    patch.setenv("FIFTYONE_DATABASE_VALIDATION", "false")
    patch.setenv("FIFTYONE_DO_NOT_TRACK", "true")
    patch.setenv("FIFTYONE_BRAIN_SIMILARITY_BACKENDS", "*,hiervec")
    patch.setenv("FIFTYONE_BRAIN_SIMILARITY_HIERVEC_CONFIG_CLS", "integrations.fiftyone.HiervecSimilarityConfig")
    import fiftyone

    fiftyone.config.database_uri = database.uri
    fiftyone.config.database_validation = False
    yield fiftyone
    for name in fiftyone.list_datasets():
        fiftyone.delete_dataset(name)
    patch.undo()
    database.stop()


@pytest.fixture
def dataset(fo, tree, request):
    """The catalogue as a FiftyOne dataset: one Classification field per level, holding the level's name."""
    dataset = fo.Dataset(request.node.name[:60])
    samples = []
    for path in images(tree):
        names = path.parent.relative_to(tree).parts
        samples.append(fo.Sample(filepath=str(path), **{level: fo.Classification(label=name)
                                                        for level, name in zip(LEVELS, names)}))
    dataset.add_samples(samples)
    yield dataset
    dataset.delete()


def test_the_model_predicts_each_level_and_embeds_like_hiervec(dataset, tiny_model):
    from integrations.fiftyone import HiervecModel

    model = HiervecModel.from_checkpoint(tiny_model, device="cpu")
    dataset.apply_model(model, label_field="hv")
    dataset.compute_embeddings(model, embeddings_field="vector")
    embedder = Embedder.from_checkpoint(tiny_model, device="cpu")
    files = dataset.values("filepath")
    predictions = embedder.predict(files)
    for level in LEVELS:
        labels = dataset.values(f"hv_{level}.label")
        confidences = dataset.values(f"hv_{level}.confidence")
        assert labels == [p.prefix(level) for p in predictions]
        assert np.allclose(confidences, [p.probabilities[level] for p in predictions], atol=1e-5)
    assert np.allclose(np.stack(dataset.values("vector")), embedder.embed(files).concat, atol=1e-5)


def test_a_category_view_is_a_level_filter_with_hiervec_searchs_hits(fo, dataset, tiny_model, tmp_path):
    import fiftyone.brain as fob
    from fiftyone import ViewField as F

    from integrations.fiftyone import HiervecModel

    db = tmp_path / "h.db"
    index = fob.compute_similarity(dataset, backend="hiervec", model=HiervecModel.from_checkpoint(tiny_model),
                                   brain_key="hv", uri=str(db), collection_name="shop", level_fields=list(LEVELS))
    assert index.total_index_size == len(dataset) == 20
    query = dataset.match(F("item.label") == "shirt").first()

    clothing = dataset.match(F("department.label") == "clothing")
    found = clothing.sort_by_similarity(query.id, k=6, brain_key="hv").values("id")
    assert index.last_filter == "levels"  # pushed down as `department in ["clothing"]`, not 15 ids
    result = CliRunner().invoke(cli, ["search", "--id", query.id, "--model", str(tiny_model), "--uri", str(db),
                                      "--collection", "shop", "--where", "department=clothing", "-k", "5", "--json"])
    assert result.exit_code == 0, result.output
    expected = [hit["id"] for hit in json.loads(result.stdout)["queries"][0]["hits"]]
    assert found[0] == query.id and found[1:] == expected  # `hiervec search --id` leaves the query image out
    assert set(dataset.select(found).values("department.label")) == {"clothing"}

    tops = dataset.match(F("category.label") == "tops")  # a finer level: `category in ["clothing/tops"]`
    assert set(tops.sort_by_similarity(query.id, k=20, brain_key="hv").values("id")) == set(tops.values("id"))
    assert index.last_filter == "levels"

    some = dataset.take(7, seed=1)  # no category describes it: its ids are sent
    hits = some.sort_by_similarity(query.id, k=20, brain_key="hv").values("id")
    assert index.last_filter == "ids" and set(hits) == set(some.values("id"))

    # by image: the model's vector of a file
    model = HiervecModel.from_checkpoint(tiny_model, device="cpu")
    vector = model.embed_all([query.filepath])[0]
    assert dataset.sort_by_similarity(vector, k=3, brain_key="hv").first().id == query.id


def test_the_index_follows_the_dataset(fo, dataset, tiny_model, tmp_path):
    import fiftyone.brain as fob

    from integrations.fiftyone import HiervecModel
    from milvus_store import CollectionNotFoundError, HierStore

    db = str(tmp_path / "h.db")
    index = fob.compute_similarity(dataset, backend="hiervec", model=HiervecModel.from_checkpoint(tiny_model),
                                   brain_key="hv", uri=db, collection_name="shop")  # no level fields: predicted
    ids = dataset.values("id")
    vectors, found, _ = index.get_embeddings(ids[:3])
    assert list(found) == ids[:3] and vectors.shape == (3, 24)
    index.remove_from_index(sample_ids=ids[:2])
    assert index.total_index_size == 18
    index.add_to_index(vectors[:2], ids[:2])
    assert index.total_index_size == 20
    with HierStore(db, "shop", create=False) as store:
        stored = {hit.id: hit for hit in store.get(ids)}
        assert stored[ids[0]].predicted and stored[ids[0]].uri == dataset[ids[0]].filepath
    again = dataset.load_brain_results("hv")  # a later session: the config says where the collection is
    assert again.total_index_size == 20 and again.config.collection_name == "shop"
    again.cleanup()
    with pytest.raises(CollectionNotFoundError):
        HierStore(db, "shop", create=False)


def test_ingest_from_a_dataset_and_export_back(fo, dataset, tiny_model, tmp_path):
    from fiftyone import ViewField as F

    from milvus_store import HierStore

    unlabelled = dataset.match(F("item.label") == "boot").first()
    unlabelled["item"] = None  # no leaf label: the model predicts its category
    unlabelled.save()
    db = str(tmp_path / "h.db")

    def run(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, (result.output, result.exception)
        return json.loads(result.stdout)

    stored = run("ingest", f"fiftyone:{dataset.name}", "--level-fields", ",".join(LEVELS), "--model", tiny_model,
                 "--uri", db, "--collection", "shop", "--json")
    assert stored["stored"] == 20 and stored["predicted"] == 1 and stored["failed"] == 0
    with HierStore(db, "shop", create=False) as store:
        hits = {hit.id: hit for hit in store.iterate(None)}
    assert set(hits) == set(dataset.values("id"))  # sample ids are the record ids
    shirt = dataset.match(F("item.label") == "shirt").first()
    assert hits[shirt.id].category == "clothing/tops/shirt" and not hits[shirt.id].predicted
    assert hits[unlabelled.id].predicted and hits[shirt.id].meta == {"fiftyone_dataset": dataset.name}

    exported = run("data", "fiftyone", "shop-export", "--uri", db, "--collection", "shop", "--json")
    assert exported["samples"] == 20
    back = fo.load_dataset("shop-export")
    assert sorted(back.values("hiervec_id")) == sorted(hits)
    row = back.match(F("hiervec_id") == shirt.id).first()
    assert (row.filepath, row["category"].label, row["item"].confidence) == (shirt.filepath, "clothing/tops", 1.0)
    assert back.match_tags("predicted").values("hiervec_id") == [unlabelled.id]
    again = CliRunner().invoke(cli, ["data", "fiftyone", "shop-export", "--uri", db, "--collection", "shop"])
    assert again.exit_code == 2 and "exists; pass overwrite=True (--overwrite)" in again.output
    back.delete()


def test_a_dataset_or_field_that_is_not_there_is_named(fo, dataset, tiny_model, tmp_path):
    db = str(tmp_path / "h.db")

    def run(*args):
        return CliRunner().invoke(cli, ["ingest", *args, "--model", str(tiny_model), "--uri", db])

    missing = run("fiftyone:no-such-dataset")
    assert missing.exit_code != 0 and "no FiftyOne dataset named 'no-such-dataset'" in missing.output
    field = run(f"fiftyone:{dataset.name}", "--level-fields", "department,colour,item")
    assert field.exit_code != 0 and f"FiftyOne dataset {dataset.name!r} has no field 'colour'" in field.output
    folder = run(str(tmp_path), "--level-fields", "department")
    assert folder.exit_code == 2 and "--level-fields goes with a fiftyone:DATASET source" in folder.output
    assert not (tmp_path / "h.db").exists()  # nothing was created
