"""hiervec in FiftyOne (``pip install 'hiervec[fiftyone]'``): a model and the ``hiervec`` similarity backend.

`HiervecModel` is a FiftyOne model (`fiftyone.core.models.Model` with `EmbeddingsMixin`) over a
hiervec checkpoint: ``dataset.apply_model(model, label_field="hv")`` writes the predicted
category path of each level as a `Classification` with its probability (fields ``hv_<level>``),
``dataset.compute_embeddings(model)`` the image vectors.

The similarity backend ``hiervec`` keeps a FiftyOne similarity index in a hiervec collection (any
Milvus URI, a Milvus Lite file included), one record per sample (its id is the sample id), with
the category path given by the sample's level fields (`level_fields`, one label field per level,
coarsest first), or predicted by the model where the sample has none::

    import fiftyone.brain as fob
    from integrations.fiftyone import HiervecModel, register
    register()  # or FIFTYONE_BRAIN_SIMILARITY_BACKENDS="*,hiervec" and
                # FIFTYONE_BRAIN_SIMILARITY_HIERVEC_CONFIG_CLS=integrations.fiftyone.HiervecSimilarityConfig
    model = HiervecModel.from_checkpoint("model.pt")
    index = fob.compute_similarity(dataset, backend="hiervec", model=model, brain_key="hv", uri="./hiervec.db",
                                   collection_name="shop", level_fields=["department", "category", "item"])
    dataset.match(F("department.label") == "clothing").sort_by_similarity(sample_id, k=10, brain_key="hv")

A view is pushed down to Milvus as a hiervec level filter (``department in [...]``) when the
view holds exactly the indexed samples of some categories at one level (checked on the level
fields, not assumed from the view's stages); any other view is sent as the list of its ids, as
FiftyOne's Milvus backend sends every view. `HiervecSimilarityIndex.last_filter` says which.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

import fiftyone.core.labels as fol
import fiftyone.core.models as fom
from fiftyone.brain.similarity import Similarity, SimilarityConfig, SimilarityIndex

from embedder import Embedder
from hiervec_core.names import DEFAULT_URI, MAX_TOPK
from hiervec_core.vectors import LevelVectors, levels_from_concat
from milvus_store import HierStore, Ids, In, Record
from milvus_store.spec import CollectionSpec

BACKEND = "hiervec"


def register() -> None:
    """Make ``backend="hiervec"`` known to fiftyone.brain in this process (FiftyOne's env variables do it for all)."""
    import fiftyone.brain as fob

    fob.brain_config.similarity_backends.setdefault(BACKEND, {"config_cls": f"{__name__}.HiervecSimilarityConfig"})


def level_vectors(embedder: Embedder, concat: np.ndarray) -> LevelVectors:
    """Image vectors with the level vectors inside them (`levels_from_concat`); a flat model has none."""
    concat = np.asarray(concat, dtype=np.float32).reshape(len(concat), -1)
    dims = dict(zip(embedder.level_names, embedder.level_dims))
    return LevelVectors(levels_from_concat(concat, dims) if dims else {}, concat)


def level_paths(labels) -> list[str | None]:
    """The category path at each level from one label per level, coarsest first: names
    (``clothing``, ``tops``) are joined; a label that is already the path (``clothing/tops``, as
    `HiervecModel` predicts) is kept. None from the first missing label on."""
    paths, parent = [], None
    for label in labels:
        if not label or (paths and parent is None):
            parent = None
        elif parent is not None and not str(label).startswith(parent + "/"):
            parent = f"{parent}/{label}"
        else:
            parent = str(label)
        paths.append(parent)
    return paths


# -- datasets in and out ----------------------------------------------------------------------
SOURCE_PREFIX = "fiftyone:"


def read_dataset(name: str, level_fields: list[str] | None = None):
    """A FiftyOne dataset as an ingest listing (`embedder.SourceListing`): each sample's file, its
    id (the record id) and the category path from its `level_fields` (None, to be predicted, where
    a sample has no label at some level or no fields are named)."""
    import fiftyone as fo

    from embedder import SourceItem, SourceListing
    from embedder.errors import DataError

    if name not in fo.list_datasets():
        raise DataError(f"no FiftyOne dataset named {name!r} (fiftyone.list_datasets() has "
                        f"{', '.join(fo.list_datasets()[:10]) or 'none'})")
    dataset = fo.load_dataset(name)
    columns = [dataset.values("id"), dataset.values("filepath")]
    for field in level_fields or []:
        if dataset.get_field(field) is None:
            raise DataError(f"FiftyOne dataset {name!r} has no field {field!r}")
        columns.append(dataset.values(f"{field}.label"))
    items = []
    for sample_id, filepath, *labels in zip(*columns):
        category = level_paths(labels)[-1] if labels else None
        items.append(SourceItem(filepath, category, sample_id, {"fiftyone_dataset": name}, f"{name}:{sample_id}"))
    return SourceListing(items, [])


def export_collection(store: HierStore, name: str, *, overwrite: bool = False) -> int:
    """A hiervec collection as the FiftyOne dataset `name`: one sample per stored image with a local
    file, its category per level as a `Classification` (confidence: the stored probability, 1 for
    given paths), ``hiervec_id`` and the tag ``predicted`` where the model chose the category.
    Returns the number of samples; images stored from URLs are left out (FiftyOne reads local files)."""
    import fiftyone as fo

    from milvus_store import uri_path

    if name in fo.list_datasets():
        if not overwrite:
            raise ValueError(f"FiftyOne dataset {name!r} exists; pass overwrite=True (--overwrite) to replace it")
        fo.delete_dataset(name)
    dataset = fo.Dataset(name, persistent=True)
    levels = store.spec.level_names
    samples = []
    for hit in store.iterate(None):
        path = uri_path(hit.uri) if hit.uri else None
        if path is None:
            continue
        labels = {level: fol.Classification(label=hit.categories[level], confidence=hit.confidence.get(level, 1.0))
                  for level in levels if hit.categories.get(level)}
        samples.append(fo.Sample(filepath=path, hiervec_id=hit.id, tags=["predicted"] if hit.predicted else [],
                                 **labels))
    dataset.add_samples(samples, progress=False)  # stdout is the command's (--json)
    return len(samples)


# -- the model -------------------------------------------------------------------------------
class HiervecModelConfig:
    """What `HiervecModel` is built from: a checkpoint `model_path` and the device."""

    def __init__(self, model_path: str | os.PathLike, device: str = "auto", runtime: str = "torch"):
        self.model_path = str(model_path)
        self.device = device
        self.runtime = runtime


class HiervecModel(fom.Model, fom.EmbeddingsMixin):
    """A hiervec checkpoint as a FiftyOne model: per-level `Classification` predictions and image vectors."""

    def __init__(self, config: HiervecModelConfig, embedder: Embedder | None = None):
        self.config = config
        self.embedder = embedder or Embedder.from_checkpoint(config.model_path, device=config.device,
                                                             runtime=config.runtime)
        self._preprocess = True

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs) -> HiervecModel:
        return cls(HiervecModelConfig(path, **kwargs))

    @property
    def media_type(self) -> str:
        return "image"

    @property
    def ragged_batches(self) -> bool:
        return True  # images of any size: the embedder resizes them

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self) -> bool:
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value: bool) -> None:
        self._preprocess = value

    @property
    def has_embeddings(self) -> bool:
        return True

    @staticmethod
    def _image(arg: Any):
        return Image.fromarray(np.asarray(arg)) if isinstance(arg, np.ndarray) else arg

    def embed_all(self, args) -> np.ndarray:
        return self.embedder.embed([self._image(arg) for arg in args]).concat

    def embed(self, arg) -> np.ndarray:
        return self.embed_all([arg])[0]

    def predict_all(self, args) -> list[dict[str, fol.Classification]]:
        vectors = self.embedder.embed([self._image(arg) for arg in args])
        out = []
        for prediction in self.embedder.predict_vectors(vectors):
            out.append({level: fol.Classification(label=prediction.prefix(level),
                                                  confidence=float(prediction.probabilities[level]))
                        for level in self.embedder.level_names})
        return out

    def predict(self, arg) -> dict[str, fol.Classification]:
        return self.predict_all([arg])[0]


# -- the similarity backend ------------------------------------------------------------------
class HiervecSimilarityConfig(SimilarityConfig):
    """The ``hiervec`` backend: a hiervec collection `collection_name` at `uri`, filled by the hiervec
    checkpoint `model_path` (also found from a `HiervecModel` passed as ``model=``), the category
    path of each sample from its `level_fields` (label fields, coarsest first; None: predicted)."""

    def __init__(self, collection_name: str | None = None, uri: str | None = None, model_path: str | None = None,
                 level_fields: list[str] | None = None, token: str | None = None, **kwargs):
        model = kwargs.get("model")
        if model_path is None and isinstance(model, HiervecModel):
            model_path = model.config.model_path
        super().__init__(**kwargs)
        self.collection_name = collection_name
        self.uri = uri or DEFAULT_URI
        self.model_path = None if model_path is None else str(model_path)
        self.level_fields = list(level_fields) if level_fields else None
        self._token = token  # not serialised with the run

    @property
    def method(self) -> str:
        return BACKEND

    @property
    def max_k(self) -> int:
        return MAX_TOPK

    @property
    def supports_least_similarity(self) -> bool:
        return False

    @property
    def supported_aggregations(self) -> tuple[str, ...]:
        return ("mean",)

    @property
    def token(self) -> str | None:
        return self._token

    @token.setter
    def token(self, value) -> None:
        self._token = value

    def load_credentials(self, token: str | None = None) -> None:
        self._load_parameters(token=token)


class HiervecSimilarity(Similarity):
    """The ``hiervec`` similarity factory."""

    def ensure_requirements(self) -> None:
        if self.config.model_path is None:
            raise ValueError("the hiervec backend needs model_path (a hiervec checkpoint) or model=HiervecModel(...)")

    def ensure_usage_requirements(self) -> None:
        self.ensure_requirements()

    def initialize(self, samples, brain_key):
        return HiervecSimilarityIndex(samples, self.config, brain_key, backend=self)


class HiervecSimilarityIndex(SimilarityIndex):
    """A FiftyOne similarity index kept in a hiervec collection (`store`)."""

    def __init__(self, samples, config: HiervecSimilarityConfig, brain_key, backend=None):
        super().__init__(samples, config, brain_key, backend=backend)
        self._embedder = Embedder.from_checkpoint(config.model_path, device="cpu")
        if config.collection_name is None:
            config.collection_name = "fiftyone_" + "".join(c if c.isalnum() else "_" for c in samples._root_dataset.name)
            self.save_config()
        spec = CollectionSpec(tuple(self._embedder.level_names), self._embedder.dim, tuple(self._embedder.level_dims))
        self._store = HierStore(config.uri, config.collection_name, spec=spec, fingerprint=self._embedder.fingerprint,
                               token=config.token)
        self._last_filter: str | None = None

    # private attributes: FiftyOne serialises a results object's public ones with the run
    @property
    def store(self) -> HierStore:
        return self._store

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    @property
    def last_filter(self) -> str | None:
        """How the last query sent its view: ``"levels"`` (a hiervec level filter) or ``"ids"``."""
        return self._last_filter

    @property
    def total_index_size(self) -> int:
        return self._store.count()

    def cleanup(self) -> None:
        self._store.drop()

    # -- writing ----------------------------------------------------------------------------
    def _categories(self, sample_ids: list[str], vectors: LevelVectors) -> list[tuple[str, bool, dict | None]]:
        """(category path, predicted, confidence) per sample: its level fields, else the model's guess."""
        given: dict[str, str] = {}
        if self.config.level_fields:
            fields = [f"{field}.label" for field in self.config.level_fields]
            view = self._samples.select(sample_ids)
            for sample_id, *labels in zip(view.values("id"), *(view.values(f) for f in fields)):
                leaf = level_paths(labels)[-1]
                if leaf is not None:
                    given[sample_id] = leaf
        missing = [i for i, sample_id in enumerate(sample_ids) if sample_id not in given]
        guesses = dict(zip(missing, self._embedder.predict_vectors(vectors.rows(missing)))) if missing else {}
        out = []
        for i, sample_id in enumerate(sample_ids):
            if sample_id in given:
                out.append((given[sample_id], False, None))
            else:
                guess = guesses[i]
                out.append((guess.path, True, {level: float(p) for level, p in guess.probabilities.items()}))
        return out

    def add_to_index(self, embeddings, sample_ids, label_ids=None, overwrite=True, allow_existing=True,
                     warn_existing=False, reload=True, batch_size=256):
        if label_ids is not None:
            raise ValueError("the hiervec backend indexes whole images, not patches")
        sample_ids = [str(i) for i in sample_ids]
        vectors = level_vectors(self._embedder, np.asarray(embeddings))
        existing = self._store.existing_ids(sample_ids)
        if existing and not allow_existing:
            raise ValueError(f"found {len(existing)} ids (e.g. {next(iter(existing))}) already in the index")
        keep = [i for i, sample_id in enumerate(sample_ids) if overwrite or sample_id not in existing]
        if not keep:
            return
        vectors, sample_ids = vectors.rows(keep), [sample_ids[i] for i in keep]
        view = self._samples.select(sample_ids)
        paths = dict(zip(*view.values(["id", "filepath"])))
        records = [Record(category, vectors.concat[row], {level: v[row] for level, v in vectors.levels.items()},
                          id=sample_id, uri=paths.get(sample_id, ""), predicted=predicted, confidence=confidence)
                   for row, (sample_id, (category, predicted, confidence))
                   in enumerate(zip(sample_ids, self._categories(sample_ids, vectors)))]
        self._store.upsert(records, batch_size=batch_size)
        self._store.flush()
        if reload:
            self.reload()

    def remove_from_index(self, sample_ids=None, label_ids=None, allow_missing=True, warn_missing=False,
                          reload=True):
        ids = [str(i) for i in (sample_ids if sample_ids is not None else [])]
        if not allow_missing:
            missing = set(ids) - self._store.existing_ids(ids)
            if missing:
                raise ValueError(f"found {len(missing)} ids (e.g. {next(iter(missing))}) not in the index")
        if ids:
            self._store.delete(ids)
            self._store.flush()
        if reload:
            self.reload()

    def get_embeddings(self, sample_ids=None, label_ids=None, allow_missing=True, warn_missing=False):
        if label_ids is not None:
            raise ValueError("the hiervec backend indexes whole images, not patches")
        if sample_ids is None:
            sample_ids = [hit.id for hit in self._store.iterate(None, output=[])]
        ids = [str(i) for i in sample_ids]
        stored = self._store.embeddings(ids)
        missing = set(ids) - set(stored.ids)
        if missing and not allow_missing:
            raise ValueError(f"found {len(missing)} ids (e.g. {next(iter(missing))}) not in the index")
        return np.asarray(stored.concat), np.asarray(stored.ids), None

    # -- queries ----------------------------------------------------------------------------
    def _view_filter(self):
        """The current view as a hiervec filter: level paths when it is exactly some categories'
        indexed samples at one level (checked on the level fields), else its ids."""
        view_ids = set(self.current_sample_ids)
        if self.config.level_fields:
            dataset = self._samples
            fields = [f"{field}.label" for field in self.config.level_fields]
            rows = [(sample_id, level_paths(labels))
                    for sample_id, *labels in zip(dataset.values("id"), *(dataset.values(f) for f in fields))]
            for depth, level in enumerate(self._embedder.level_names):
                chosen = {paths[depth] for sample_id, paths in rows if sample_id in view_ids}
                if None in chosen:
                    break
                selected = {sample_id for sample_id, paths in rows if paths[depth] in chosen}
                if selected == view_ids:
                    self._last_filter = "levels"
                    return In(level, sorted(chosen))
        self._last_filter = "ids"
        return Ids(sorted(view_ids))

    def _kneighbors(self, query=None, k=None, reverse=False, aggregation=None, return_dists=False):
        if query is None:
            raise ValueError("the hiervec backend answers queries, not full-index neighbours")
        if reverse:
            raise ValueError("the hiervec backend does not support least-similarity queries")
        if k is None or k > self.config.max_k:
            raise ValueError(f"the hiervec backend needs k <= {self.config.max_k}")
        if aggregation not in (None, "mean"):
            raise ValueError(f"unsupported aggregation {aggregation!r}")
        query = self._parse_neighbors_query(query)
        if aggregation == "mean" and query.ndim == 2:
            query = query.mean(axis=0)
        single = query.ndim == 1
        queries = query.reshape(1, -1) if single else query
        where = self._view_filter() if self.has_view else None
        hits = self._store.search(np.asarray(queries, dtype=np.float32), k, where=where, output=[])
        ids = [[hit.id for hit in row] for row in hits]
        dists = [[float(hit.distance) for hit in row] for row in hits]
        if single:
            ids, dists = ids[0], dists[0]
        return (ids, None, dists) if return_dists else (ids, None)

    def _parse_neighbors_query(self, query) -> np.ndarray:
        if isinstance(query, str):
            ids, single = [query], True
        else:
            array = np.asarray(query)
            if np.issubdtype(array.dtype, np.number):
                return array.astype(np.float32)
            ids, single = [str(i) for i in array], False
        stored = self._store.embeddings(ids)
        if len(stored.ids) != len(ids):
            missing = sorted(set(ids) - set(stored.ids))
            raise ValueError(f"query ids {missing[:5]} are not in the index")
        order = {sample_id: row for row, sample_id in enumerate(stored.ids)}
        vectors = np.asarray(stored.concat)[[order[i] for i in ids]]
        return vectors[0] if single else vectors

    @classmethod
    def _from_dict(cls, d, samples, config, brain_key):
        return cls(samples, config, brain_key)
