"""`HierStore`: one Milvus collection per catalogue, on Milvus Lite or a server.

>>> import tempfile
>>> from milvus_store import CollectionSpec, HierStore, Record, under
>>> spec = CollectionSpec(("department", "category"), dim=4, level_dims=(2, 2))
>>> with HierStore(f"{tempfile.mkdtemp()}/demo.db", "images", spec=spec) as store:
...     store.upsert([Record("clothing/tops", [.5] * 4, {"department": [1, 0], "category": [0, 1]}, id="a")])
...     store.search([[.5] * 4], k=1, where=under("clothing"))
1
[[Hit(id='a', distance=0.0, uri='', categories={'department': 'clothing', 'category': 'clothing/tops'}, meta={}, predicted=False, confidence={'department': 1.0, 'category': 1.0})]]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from pymilvus import AnnSearchRequest, DataType, MilvusClient, MilvusException, RRFRanker, WeightedRanker

from hiervec_core.names import DEFAULT_COLLECTION, DEFAULT_INDEX, MAX_TOPK, MODEL_ROOT_ENV
from hiervec_core.vectors import LevelVectors, levels_from_concat

from .connection import LITE_SERVERS, ConnectionSettings
from .errors import (
    CollectionNotFoundError,
    FilterError,
    LevelVectorMissingError,
    QueryError,
    SchemaMismatchError,
    StoreConnectionError,
    StoreError,
    StoreUnavailableError,
    UnknownLevelError,
    VectorFieldLimitError,
)
from .features import Features
from .filters import Eq, WhereInput, both, quote_literal, render
from .records import Hit, Record, hit_from_entity, to_rows
from .spec import (
    CATEGORY_MAX_LENGTH,
    DEFAULT_NUM_PARTITIONS,
    ID_MAX_LENGTH,
    LAYOUT,
    MAX_VECTOR_FIELDS,
    VECTOR_FIELD_SETTING,
    PROPERTY_FINGERPRINT,
    PROPERTY_ABOUT,
    PROPERTY_MODEL,
    PROPERTY_MODEL_RELATIVE,
    PROPERTY_SPEC,
    URI_MAX_LENGTH,
    CollectionSpec,
    check_index,
    index_build_params,
    index_search_params,
)

logger = logging.getLogger(__name__)
SHARE_TTL_S = 60.0
# Session consistency: a client reads its own writes (pymilvus sends the timestamp of this
# process's last write to the collection as the guarantee), and every other read is served at
# once from what the query nodes hold, within one time tick (~200 ms on a default server) of the
# latest write. "Strong" made every server search wait for the next tick: 200 ms p50 against
# ~2 ms (BENCHMARKS.md, "Search on a Milvus server"). Milvus Lite is always strong.
CONSISTENCY = "Session"
# Iterators (whole-collection passes: copy, relabel, exports) start after one Strong read: pymilvus's
# iterators do not send the session's timestamp with all their requests (on Milvus 2.3 they then miss
# rows written a moment before), and one time tick is nothing against a pass over the collection.
# On Milvus 2.3, which returns no session timestamp, pymilvus's iterator waits besides for the server to
# pass the client's clock + 1 s (its margin for clock skew): every pass there takes over a second.
STRONG = {"consistency_level": "Strong"}


def collection_schema(spec: CollectionSpec):
    """The Milvus schema of a collection of `spec` (fields in the order `row_batches` reads them), with a
    description on the collection and on every field for whoever opens it with plain pymilvus or Attu."""
    fields, about = spec.fields, field_descriptions(spec)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                        description=collection_description(spec))
    schema.add_field(fields.id, DataType.VARCHAR, is_primary=True, max_length=ID_MAX_LENGTH,
                     description=about[fields.id])
    schema.add_field(fields.uri, DataType.VARCHAR, max_length=URI_MAX_LENGTH, description=about[fields.uri])
    schema.add_field(fields.meta, DataType.JSON, description=about[fields.meta])
    for level, field in fields.levels.items():
        schema.add_field(field, DataType.VARCHAR, max_length=CATEGORY_MAX_LENGTH,
                         is_partition_key=level == spec.partition_key, description=about[field])
    schema.add_field(fields.predicted, DataType.BOOL, description=about[fields.predicted])
    for field in fields.confidence.values():
        schema.add_field(field, DataType.FLOAT, description=about[field])
    for field, dim in spec.vector_dims().items():
        schema.add_field(field, DataType.FLOAT_VECTOR, dim=dim, description=about[field])
    return schema


def collection_description(spec: CollectionSpec) -> str:
    """What a hiervec collection is, in one paragraph (Milvus keeps it with the collection)."""
    levels = " > ".join(spec.level_names)
    return (f"hiervec: images with a category path at each level ({levels}), searched by image vector "
            f"(field vec, {spec.metric}). Level fields hold the path from the root down to that level "
            f"(filter with {spec.level_names[0]} == \"<name>\", or like \"<path>/%\" for a subtree). "
            f"The collection's properties record the hiervec spec and the model's fingerprint and location.")[:1024]


def field_descriptions(spec: CollectionSpec) -> dict[str, str]:
    """Field name -> what it holds, for every field of a collection of `spec`."""
    fields, names = spec.fields, spec.level_names
    example = {name: "/".join(f"<{n}>" for n in names[:i + 1]) for i, name in enumerate(names)}
    about = {
        fields.id: "The image's id: the SHA-256 of its file's bytes (hex) unless the ingest gave one.",
        fields.uri: "Where the image file lives: a path or URL as it was ingested.",
        fields.meta: "The JSON object given with the image at ingest (price, colour, ...); {} when none.",
        fields.predicted: "True when the category path was predicted by the model at ingest, not given.",
        fields.vector: (f"The image vector ({spec.dim} floats, unit length): the level vectors, each unit length "
                        f"and multiplied by the model's level weight, one after another ({' then '.join(names)}; "
                        f"equal weights are 1/sqrt({len(names)}) each)." if spec.level_dims else
                        f"The image vector ({spec.dim} floats, unit length) of a flat model."),
    }
    for i, (name, field) in enumerate(fields.levels.items()):
        subtree = f", or {names[i + 1]} like \"{example[name]}/%\" for what lies under it" if i + 1 < len(names) else ""
        about[field] = (f"Level {i + 1} of {len(names)}: the category path from the root down to '{name}', e.g. "
                        f"'{example[name]}' (the full path, not the bare name: filter with {field} == "
                        f"\"{example[name]}\"{subtree}).")
    for name, field in fields.confidence.items():
        about[field] = f"The probability of the '{name}' path: 1 for a given path, the model's for a predicted one."
    for name, field in fields.level_vectors.items():
        about[field] = (f"The '{name}' level vector ({spec.level_dim(name)} floats, unit length); in vec it is "
                        f"multiplied by the model's weight for '{name}'.")
    return about


def model_relative_to(location: str, root: str | None) -> str | None:
    """`location` relative to `root` (POSIX separators), or None when there is no root or it is not under it."""
    if not root:
        return None
    try:
        return Path(location).resolve().relative_to(Path(root).expanduser().resolve()).as_posix()
    except ValueError:
        return None


def _locked_by_another_process(lite_path: str) -> bool:
    """Whether Milvus Lite's lock on `lite_path` is held (pymilvus reports only "Open local milvus failed")."""
    import fcntl  # Milvus Lite runs on Linux and macOS only

    lock = Path(lite_path).expanduser() / "LOCK"
    try:
        with open(lock, "rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def connect(settings: ConnectionSettings, timeout: float | None) -> tuple[MilvusClient, str | None, str]:
    """A client of the deployment `settings` name, the Lite file it holds (`LITE_SERVERS`, let go
    by the caller on close) and the server's version; a clear `StoreConnectionError` otherwise."""
    kwargs = settings.client_kwargs()
    lite_key = LITE_SERVERS.hold(kwargs["uri"]) if settings.is_local else None
    client = None
    try:
        client = MilvusClient(**kwargs, timeout=timeout)
        return client, lite_key, client.get_server_version(timeout=timeout)
    except Exception as exc:  # grpc, OSError, MilvusException
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if lite_key is not None:
            LITE_SERVERS.let_go(lite_key)
        message = exc.message if isinstance(exc, MilvusException) else str(exc)
        reason = settings.redact(message or exc.__class__.__name__)
        if settings.is_local and _locked_by_another_process(settings.uri):
            reason = "another process has it open (a Milvus Lite file is used by one process at a time)"
        raise StoreConnectionError(f"cannot open Milvus at {settings.display_uri!r}: {reason}") from None


class MilvusConnection:
    """A client of one Milvus deployment (a Lite file or a server): opening it, closing it (the last
    user of a Lite file in this process stops its server), and turning pymilvus's and the network's
    failures into this package's errors. `HierStore` and `Aliases` are two."""

    def _open_connection(self, settings: ConnectionSettings, timeout: float | None) -> str:
        """Connect; returns the server's version."""
        self.settings, self.timeout = settings, timeout
        self._client, self._lite_key, version = connect(settings, timeout)
        return version

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the client; the last user of a Lite file in this process stops its server (and its lock)."""
        with contextlib.suppress(Exception):
            self._client.close()
        key, self._lite_key = getattr(self, "_lite_key", None), None
        if key is not None:
            LITE_SERVERS.let_go(key)

    def _clean(self, exc: BaseException) -> str:
        message = exc.message if isinstance(exc, MilvusException) else str(exc)
        return self.settings.redact(message or exc.__class__.__name__)

    def _subject(self) -> str:
        """What a failed call was about, between the action and the address (``" on 'images'"``)."""
        return ""

    _one_collection = False  # a connection about one collection loads it again when a call finds it released

    def _reload(self) -> str | None:
        """Load again the collection a call found released: None once it is loaded within its
        deadline, else why not."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _calls(self, action: str):
        try:
            yield
        except MilvusException as exc:
            if unavailable(exc):
                raise self._no_answer(action, exc) from None
            if self._one_collection and _RELEASED.search(exc.message or ""):
                # a server that restarted (Milvus Lite's) holds the collection released: loaded again now,
                # the same call works once the load is done (and a load that never ends is the server's fault)
                failed = self._reload()
                raise StoreUnavailableError(f"{action}{self._subject()}: the collection was not loaded at "
                                            f"{self.settings.display_uri!r} (the server restarted?); " +
                                            ("it is loaded again: retry" if failed is None else
                                             f"loading it again failed within {self._reload_s():g} s "
                                             f"({failed}): retry later")) from None
            raise StoreError(f"{action}{self._subject()} at {self.settings.display_uri!r} failed: "
                             f"{self._clean(exc)}") from None
        except (ConnectionError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"{action}: Milvus at {self.settings.display_uri!r} is unreachable: "
                                        f"{self._clean(exc)}") from None
        except Exception as exc:  # grpc's own errors, when pymilvus lets one through
            if type(exc).__module__.startswith("grpc") and unavailable(exc):
                raise self._no_answer(action, exc) from None
            raise

    def _reload_s(self) -> float:
        return self.timeout if self.timeout is not None else RELOAD_TIMEOUT_S

    def _no_answer(self, action: str, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(f"{action}{self._subject()}: Milvus at {self.settings.display_uri!r} did not "
                                     f"answer: {self._clean(exc)}")


RELOAD_TIMEOUT_S = 30.0  # loading a released collection again, when the connection has no timeout of its own
_RELEASED = re.compile(r"in state 'released'|collection not loaded|not loaded into memory", re.I)


# What pymilvus and grpc say when the server, not the request, is at fault: it is down or
# unreachable, not ready yet, or the call ran out of time.
_UNAVAILABLE = re.compile(r"fail(ed)? connecting to server|server unavailable|\bunavailable\b|deadline exceeded|"
                          r"deadline_exceeded|timed? ?out|connection (refused|reset|closed)|socket closed|"
                          r"not ready|goaway|broken pipe|server is closed|channel closed", re.I)


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` (a MilvusException or a grpc error) says that Milvus did not answer."""
    code = getattr(exc, "code", None)
    name = getattr(code() if callable(code) else code, "name", "")
    if name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return True
    text = getattr(exc, "message", None) or getattr(exc, "details", lambda: None)() or str(exc)
    return bool(_UNAVAILABLE.search(str(text)))


class HierStore(MilvusConnection):
    """A hierarchy-aware collection. Open an existing one, or create it when `spec` is given.

    Opening with a `spec` or `fingerprint` other than the recorded ones raises
    `SchemaMismatchError` before anything is written. Every method takes `timeout` (s).
    """

    def __init__(
        self,
        uri: str | os.PathLike | None = None,
        collection: str = DEFAULT_COLLECTION,
        *,
        spec: CollectionSpec | None = None,
        fingerprint: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float | None = None,
        create: bool = True,
    ):
        self.collection = collection
        self.target = collection  # the collection itself when `collection` is an alias (set on opening)
        version = self._open_connection(ConnectionSettings.resolve(uri, token=token, user=user, password=password),
                                        timeout)
        self._shares: dict[tuple[str, str], tuple[float, float]] = {}
        self.model_location: str | None = None  # where the filling model lives, when recorded (`record_model`)
        self.model_relative: str | None = None  # the same, relative to $HIERVEC_MODEL_ROOT, when it was under it
        self.features = Features.of(version, local=self.settings.is_local)
        self.lite = self.features.lite
        self.templates = self.features.templates  # Milvus Lite and servers before 2.5 reject templated filter_params
        try:
            self._open_or_create(spec, fingerprint, create)
        except BaseException:
            self.close()  # a Lite file stays locked while its client is open
            raise

    def _open_or_create(self, spec: CollectionSpec | None, fingerprint: str | None, create: bool) -> None:
        with self._calls("open collection"):
            exists = self._client.has_collection(self.collection, timeout=self.timeout)
        if exists:
            self.spec, self.fingerprint = self._open_existing(spec, fingerprint)
            return
        if spec is None or not create:
            raise CollectionNotFoundError(
                f"collection {self.collection!r} does not exist at {self.settings.display_uri!r}"
            )
        self.spec = spec.resolved(index=DEFAULT_INDEX, partition_key=self.default_partition_key(spec.level_names))
        if self.lite and self.spec.num_partitions not in (None, DEFAULT_NUM_PARTITIONS):
            # Milvus Lite 3.2.2 makes 16 partitions for a key whatever it is asked: record what it holds.
            logger.warning("Milvus Lite ignores num_partitions=%s: its partition key uses %s partitions",
                           self.spec.num_partitions, DEFAULT_NUM_PARTITIONS)
            self.spec = replace(self.spec, num_partitions=DEFAULT_NUM_PARTITIONS)
        self.fingerprint = fingerprint
        check_index(self.spec.index, lite=self.lite)
        self._check_vector_fields()
        self._check_partition_key()
        self._create()

    def default_partition_key(self, level_names: Sequence[str]) -> str:
        """The coarsest level on servers (filters on it or below prune partitions); none on Milvus Lite,
        which scans every partition anyway (measured in BENCHMARKS.md), nor on servers whose upserts
        misfile partition-key rows (`Features.partition_key`)."""
        return level_names[0] if not self.lite and self.features.partition_key else ""

    def _check_partition_key(self) -> None:
        if self.spec.partition_key and not self.features.partition_key:
            raise StoreError(
                f"{self.features.name} at {self.settings.display_uri!r} files upserted rows under the wrong partition "
                f"of a partition key (milvus-io/milvus#30607, fixed in 2.3.10), so filters on "
                f"{self.spec.partition_key!r} would miss them: use partition_key='' (none) here, or Milvus 2.3.10 or "
                f"newer. Nothing was created.")

    def _check_vector_fields(self, refused_at: int | None = None) -> None:
        """Refuse a layout with more vector fields than this server takes, naming the ways out.

        A 2.4+ server's limit is a setting that a client cannot read: layouts up to the most
        any server takes are tried, and the server's refusal (`refused_at`, its limit)
        becomes this error.
        """
        needed, features = self.spec.vector_field_count, self.features
        if features.max_vector_fields is None:
            return
        if features.vector_fields_configurable:
            limit = refused_at if refused_at is not None else MAX_VECTOR_FIELDS
        else:
            limit = features.max_vector_fields
        if needed <= limit:
            return
        kept = ", ".join(self.spec.kept_vector_levels)
        fit = ("vector_levels=() (the image vector only)" if limit == 1 else
               f"vector_levels=() (the image vector only) or at most {limit - 1} levels, e.g. "
               f"vector_levels={tuple(self.spec.level_names[-(limit - 1):])!r}")
        if features.vector_fields_configurable and limit < MAX_VECTOR_FIELDS:
            setting = (f"raise the server's {VECTOR_FIELD_SETTING} to {needed} or more (at most "
                       f"{MAX_VECTOR_FIELDS}; docker-compose.yml and deploy/ set {MAX_VECTOR_FIELDS}), or ")
        elif features.vector_fields_configurable:
            setting = f"no server takes more than {MAX_VECTOR_FIELDS} ({VECTOR_FIELD_SETTING}): "
        else:
            setting = "use a Milvus 2.4 or newer server, or "
        raise VectorFieldLimitError(
            f"collection {self.collection!r} needs {needed} vector fields (the image vector and the level vectors "
            f"of {kept}), but {features.name} at {self.settings.display_uri!r} takes {limit} per collection; "
            f"{setting}keep fewer level vectors: {fit} (library: CollectionSpec(vector_levels=...)). "
            f"Nothing was created."
        )

    # -- lifecycle -----------------------------------------------------------------------
    def __repr__(self) -> str:
        spec = getattr(self, "spec", None)  # absent while opening failed
        return f"HierStore(uri={self.settings.display_uri!r}, collection={self.collection!r}, spec={spec!r})"

    def __enter__(self) -> HierStore:
        return self

    def _subject(self) -> str:
        return f" on {self.collection!r}"

    _one_collection = True

    def _reload(self) -> str | None:
        try:  # never without a deadline: a restarted server can leave a load waiting forever
            self._client.load_collection(self.collection, timeout=self._reload_s())
        except Exception as exc:  # the caller reports the call that failed, with this reason
            logger.warning("collection %r was released at %s (the server restarted?): loading it again failed: %r",
                           self.collection, self.settings.display_uri, exc)
            return self._clean(exc)
        logger.warning("collection %r was released at %s (the server restarted?): loaded it again",
                       self.collection, self.settings.display_uri)
        return None

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # -- schema --------------------------------------------------------------------------
    def _open_existing(self, spec: CollectionSpec | None, fingerprint: str | None):
        with self._calls("describe collection"):
            description = self._client.describe_collection(self.collection, timeout=self.timeout)
        self.target = description.get("collection_name") or self.collection  # through an alias: the collection
        properties = description.get("properties", {})
        if PROPERTY_SPEC not in properties:
            raise SchemaMismatchError(self.collection, "hiervec spec", "a hiervec collection", "none recorded")
        stored = CollectionSpec.from_json(properties[PROPERTY_SPEC])
        if stored.layout != LAYOUT:
            raise SchemaMismatchError(self.collection, "layout (re-create the collection and ingest again)",
                                   stored.layout)
        if spec is not None:
            for name in ("level_names", "dim", "level_dims", "metric"):
                if getattr(spec, name) != getattr(stored, name):
                    raise SchemaMismatchError(self.collection, name, getattr(spec, name), getattr(stored, name))
            for name in ("index", "vector_levels", "partition_key", "num_partitions"):  # choices: None leaves them
                if getattr(spec, name) is not None and getattr(spec, name) != getattr(stored, name):
                    raise SchemaMismatchError(self.collection, name, getattr(spec, name), getattr(stored, name))
        self.model_location = properties.get(PROPERTY_MODEL) or None
        self.model_relative = properties.get(PROPERTY_MODEL_RELATIVE) or None
        recorded = properties.get(PROPERTY_FINGERPRINT) or None
        if fingerprint is not None and fingerprint != recorded:
            raise SchemaMismatchError(self.collection, "model fingerprint", fingerprint, recorded)
        with self._calls("load collection"):
            self._client.load_collection(self.collection, timeout=self.timeout)
        return stored, recorded

    def _create(self) -> None:
        spec, fields, features = self.spec, self.spec.fields, self.features
        schema = collection_schema(spec)
        index_params = self._client.prepare_index_params()
        for field in fields.levels.values():
            index_params.add_index(field, index_type=features.scalar_index)
        if features.bool_index:
            index_params.add_index(fields.predicted, index_type=features.bool_index)
        for field, dim in spec.vector_dims().items():
            index_params.add_index(field, index_type=spec.index, metric_type=spec.metric,
                                   params=index_build_params(spec.index, dim))
        properties = {PROPERTY_SPEC: spec.to_json(),
                      PROPERTY_ABOUT: json.dumps({"collection": collection_description(spec),
                                                  "fields": field_descriptions(spec)})}
        if self.fingerprint:
            properties[PROPERTY_FINGERPRINT] = self.fingerprint
        partitions = {"num_partitions": spec.num_partitions} if spec.partition_key else {}
        with self._calls("create collection"):
            try:
                self._client.create_collection(self.collection, schema=schema, properties=properties,
                                               consistency_level=CONSISTENCY, timeout=self.timeout, **partitions)
            except MilvusException as exc:
                limit = re.search(r"vector field's number should be limited to (\d+)", exc.message or "")
                if limit:
                    self._check_vector_fields(refused_at=int(limit.group(1)))
                raise
        with self._calls("create collection"):
            # The collection is empty, so its indexes are built at once: skip pymilvus's
            # 0.5 s poll per index (3.5 s for a 3-level collection).
            self._client.create_index(self.collection, index_params, timeout=self.timeout, sync=False)
            self._client.load_collection(self.collection, timeout=self.timeout)

    def record_model(self, location: str, *, root: str | None = None, relative: str | None = None,
                     timeout: float | None = None) -> None:
        """Record where the model that fills this collection lives (a checkpoint path), so searches can
        load it without being told; its fingerprint is still checked when loaded.

        Also recorded, when the file lies under `root` (default $HIERVEC_MODEL_ROOT): its path
        relative to the root, which `model_file` finds under another machine's root.
        """
        if relative is None:  # `relative` given: recorded as it is (a copy keeps its source's)
            relative = model_relative_to(location, root if root is not None else os.environ.get(MODEL_ROOT_ENV))
        if location == self.model_location and relative == self.model_relative:
            return
        properties = {PROPERTY_MODEL: location, PROPERTY_MODEL_RELATIVE: relative or ""}
        with self._calls("record the model"):
            self._client.alter_collection_properties(self.collection, properties=properties,
                                                     timeout=self._timeout(timeout))
        self.model_location, self.model_relative = location, relative

    def model_file(self, root: str | None = None) -> str | None:
        """The recorded model as a file on this machine: the recorded path if it exists, else the
        recorded relative path under `root` (default $HIERVEC_MODEL_ROOT) if that exists; None when
        neither does (or nothing is recorded)."""
        candidates = [self.model_location]
        root = root if root is not None else os.environ.get(MODEL_ROOT_ENV)
        if root and self.model_relative:
            candidates.append(str(Path(root).expanduser() / self.model_relative))
        return next((c for c in candidates if c and Path(c).is_file()), None)

    def index_progress(self, *, timeout: float | None = None) -> dict[str, tuple[int, int]]:
        """Per vector field, (rows indexed, rows in all) as the server reports them: a server builds
        the index of sealed segments in the background after a flush."""
        progress = {}
        with self._calls("describe index"):
            for field in self.spec.vector_dims():
                info = self._client.describe_index(self.collection, field, timeout=self._timeout(timeout)) or {}
                progress[field] = (int(info.get("indexed_rows", 0)), int(info.get("total_rows", 0)))
        return progress

    def resolve(self, name: str | None = None, *, timeout: float | None = None) -> str:
        """The collection `name` (default: the name this store was opened by) stands for now: itself,
        or the one its alias points at (an alias can move while a store is open)."""
        name = name or self.collection
        with self._calls("describe collection"):
            description = self._client.describe_collection(name, timeout=self._timeout(timeout))
        return description.get("collection_name") or name

    def aliases(self, *, timeout: float | None = None) -> list[str]:
        """The aliases that point at this collection (`milvus_store.aliases`)."""
        with self._calls("list aliases"):
            found = self._client.list_aliases(self.target, timeout=self._timeout(timeout))
        return sorted(found.get("aliases", []) if isinstance(found, dict) else found)

    def drop(self, *, timeout: float | None = None) -> None:
        """Delete the whole collection and everything in it. Refused through an alias, and for a
        collection an alias points at (Milvus Lite would drop it and leave the alias dangling):
        move or drop the alias first."""
        if self.target != self.collection:
            raise StoreError(f"{self.collection!r} is an alias of {self.target!r}: drop the collection by its "
                             f"own name; nothing was dropped")
        aliases = self.aliases(timeout=timeout)
        if aliases:
            raise StoreError(f"collection {self.collection!r} is the one alias {', '.join(map(repr, aliases))} "
                             f"points at: point it elsewhere first (hiervec alias set); nothing was dropped")
        with self._calls("drop collection"):
            self._client.drop_collection(self.collection, timeout=self._timeout(timeout))

    # -- writes --------------------------------------------------------------------------
    def upsert(self, records: Iterable[Record], *, batch_size: int = 512, timeout: float | None = None) -> int:
        """Insert or replace records by id; every record is validated before the first write."""
        return self.upsert_rows(to_rows(list(records), self.spec), batch_size=batch_size, timeout=timeout)

    def upsert_rows(self, rows: Sequence[dict], *, batch_size: int = 512, timeout: float | None = None) -> int:
        """Write rows already validated by `records.validate_records` (callers that skip bad records)."""
        if batch_size < 1:
            raise QueryError(f"batch_size must be positive, got {batch_size}")
        self._shares.clear()
        for start in range(0, len(rows), batch_size):
            with self._calls("upsert"):
                self._client.upsert(self.collection, rows[start : start + batch_size], timeout=self._timeout(timeout))
        return len(rows)

    def delete(self, ids: Sequence[str] | None = None, *, where: WhereInput = None, timeout: float | None = None) -> int:
        """Delete by ids or by filter (exactly one); returns how many were deleted."""
        if (ids is None) == (where is None):
            raise FilterError("delete needs either ids or where, not both and not neither")
        expr, params = self._filter(where) if where is not None else self._ids_filter(ids)
        if not expr:
            raise FilterError("refusing to delete with an empty filter; use drop() to remove everything")
        self._shares.clear()
        with self._calls("delete"):
            before = self.count(timeout=timeout)
            self._client.delete(self.collection, filter=expr, timeout=self._timeout(timeout), **self._params(params))
            # Strong: Milvus 2.3 returns no timestamp for a delete, so Session reads would not wait for it;
            # once this count has, every later read of this process sees it.
            return before - self._count(None, timeout, **STRONG)

    def flush(self, *, timeout: float | None = None) -> None:
        with self._calls("flush"):
            self._client.flush(self.collection, timeout=self._timeout(timeout))

    # -- reads ---------------------------------------------------------------------------
    def count(self, where: WhereInput = None, *, timeout: float | None = None) -> int:
        return self._count(where, timeout)

    def _count(self, where: WhereInput, timeout: float | None, **consistency) -> int:
        expr, params = self._filter(where)
        with self._calls("count"):
            rows = self._client.query(self.collection, filter=expr, output_fields=["count(*)"],
                                      timeout=self._timeout(timeout), **self._params(params), **consistency)
        return int(rows[0]["count(*)"])

    def get(self, ids: Sequence[str], *, timeout: float | None = None) -> list[Hit]:
        """The stored records of `ids` that exist (in no particular order)."""
        rows = self._rows_of(ids, self._outputs(None), "get", timeout)
        return [hit_from_entity(row, self.spec, id_=row[self.spec.fields.id], distance=None) for row in rows]

    def vectors(self, ids: Sequence[str], *, level: str | None = None, timeout: float | None = None) -> dict[str, np.ndarray]:
        """The stored image vectors (or one level's vectors) of `ids` that exist."""
        field = self._vector_field(level)
        rows = self._rows_of(ids, [self.spec.fields.id, field], "get vectors", timeout)
        return {row[self.spec.fields.id]: np.asarray(row[field], dtype=np.float32) for row in rows}

    def embeddings(self, ids: Sequence[str], *, timeout: float | None = None) -> LevelVectors:
        """The image vector and every level's vector of the `ids` that exist, in one query (their
        ids in `.ids`, in the order asked). Levels without a field of their own in this layout
        are read back from the image vector (`levels_from_concat`)."""
        spec, fields = self.spec, self.spec.fields
        rows = self._rows_of(ids, [fields.id, fields.vector, *fields.level_vectors.values()], "get vectors", timeout)
        by_id = {row[fields.id]: row for row in rows}
        found = [i for i in dict.fromkeys(ids) if i in by_id]

        def stacked(field: str, dim: int) -> np.ndarray:
            if not found:
                return np.empty((0, dim), dtype=np.float32)
            return np.stack([np.asarray(by_id[i][field], dtype=np.float32) for i in found])

        concat = stacked(fields.vector, spec.dim)
        levels = {}
        if spec.level_dims:
            derived = levels_from_concat(concat, dict(zip(spec.level_names, spec.level_dims)))
            levels = {name: stacked(fields.level_vectors[name], spec.level_dim(name))
                      if name in fields.level_vectors else derived[name] for name in spec.level_names}
        return LevelVectors(levels, concat, tuple(found))

    def existing_ids(self, ids: Sequence[str], *, timeout: float | None = None) -> set[str]:
        """Which of `ids` are stored already (for skip-if-present ingest)."""
        return {row[self.spec.fields.id] for row in self._rows_of(ids, [self.spec.fields.id], "query ids", timeout)}

    def search(
        self,
        vectors,
        k: int = 10,
        *,
        level: str | None = None,
        where: WhereInput = None,
        output: Sequence[str] | None = None,
        group_by: str | None = None,
        group_size: int = 1,
        radius: float | None = None,
        range_filter: float | None = None,
        search_params: Mapping | None = None,
        timeout: float | None = None,
    ) -> list[list[Hit]]:
        """Top-`k` hits per query vector, on the image vector or on one `level`'s vector.

        `group_by` a level returns the `k` categories of that level nearest to the query
        (ranked by their nearest hit), each with its `group_size` nearest hits or all it
        has, in that order. `radius`/`range_filter` make it a range search (for L2: squared
        distances in ``[range_filter, radius)``). `output` limits the returned fields
        (``uri``, ``meta``, level names); by default all of them come back.
        """
        field, data = self._vector_field(level), self._queries(vectors, level)
        if not 1 <= k <= MAX_TOPK:
            raise QueryError(f"k must be in [1, {MAX_TOPK}], got {k}; use search_iter for more hits")
        if group_by is not None and not self.features.server_group_by:
            # Milvus Lite drops every category with fewer than group_size matches (3.2.2), and Milvus
            # 2.3 has no group-by: group here.
            self._check_grouping(k, group_by, group_size)
            return [self._grouped(query, k, group_by, group_size, level=level, where=where, output=output,
                                  radius=radius, range_filter=range_filter, search_params=search_params,
                                  timeout=timeout) for query in data]
        # Exact (FLAT) search needs no breadth, so it skips the two counts that measure the share.
        share = 1.0 if self.spec.index == "FLAT" else self._share(where, timeout)
        if share == 0:
            return [[] for _ in data]
        params = {"metric_type": self.spec.metric, "params": dict(index_search_params(self.spec.index, k, share))}
        if radius is not None:
            params["params"]["radius"] = radius
        if range_filter is not None:
            params["params"]["range_filter"] = range_filter
        if search_params:
            params["params"].update(search_params)
        extra = {}
        if group_by is not None:
            self._check_grouping(k, group_by, group_size)
            extra = {"group_by_field": self.spec.fields.levels[group_by], "group_size": group_size,
                     "strict_group_size": False}
        expr, fparams = self._filter(where)
        with self._calls("search"):
            result = self._client.search(
                self.collection, data=data, anns_field=field, limit=k, filter=expr,
                output_fields=self._outputs(output), search_params=params, timeout=self._timeout(timeout),
                **self._params(fparams), **extra,
            )
        return [self._hits(hits) for hits in result]

    def _check_grouping(self, k: int, group_by: str, group_size: int) -> None:
        if group_by not in self.spec.fields.levels:
            raise UnknownLevelError(f"unknown level {group_by!r} for group_by; levels are {', '.join(self.spec.level_names)}")
        if group_size < 1:
            raise QueryError(f"group_size must be positive, got {group_size}")
        if k * group_size > MAX_TOPK:  # Milvus gathers k groups x group_size hits at once
            raise QueryError(f"k x group_size must be at most {MAX_TOPK} hits, got {k} x {group_size} = "
                             f"{k * group_size}")

    def _grouped(self, query, k: int, group_by: str, group_size: int, *, where: WhereInput, output, **search):
        """One query's grouped hits from ungrouped searches: the first `k` categories met in distance
        order are the `k` nearest; a category short of `group_size` hits in a cut-off list gets its
        own search."""
        wanted = None if output is None else list(dict.fromkeys([*output, group_by]))
        limit = min(MAX_TOPK, max(4 * k * group_size, 64))
        while True:
            [hits] = self.search(query, limit, where=where, output=wanted, **search)
            groups: dict[str, list[Hit]] = {}
            for hit in hits:
                groups.setdefault(hit.categories[group_by], []).append(hit)
            cut_off = len(hits) == limit
            if len(groups) >= k or not cut_off or limit == MAX_TOPK:
                break
            limit = min(MAX_TOPK, limit * 4)
        found = []
        for value, members in list(groups.items())[:k]:
            if len(members) < group_size and cut_off:
                [members] = self.search(query, group_size, where=both(where, Eq(group_by, value)), output=wanted,
                                        **search)
            found += members[:group_size]
        return found

    def hybrid_search(
        self,
        level_vectors: Mapping[str, object],
        k: int = 10,
        *,
        ranker: str | None = None,
        weights: Mapping[str, float] | None = None,
        rrf_k: int = 60,
        where: WhereInput = None,
        candidates: int | None = None,
        output: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> list[list[Hit]]:
        """Search several level vectors at once and fuse the rankings.

        Reciprocal rank fusion by default; `weights` ``{level: w}`` (or ``ranker="weighted"``)
        fuse normalised scores instead. Each level contributes its top `candidates`
        (default ``2 * k``).
        """
        if not level_vectors:
            raise QueryError("hybrid_search needs vectors for at least one level")
        levels = list(level_vectors)
        expr, fparams = self._filter(where)
        share = self._share(where, timeout)
        if share == 0:
            return [[] for _ in level_vectors[levels[0]]] if np.ndim(level_vectors[levels[0]]) == 2 else [[]]
        breadth = index_search_params(self.spec.index, candidates or 2 * k, share)
        requests = [
            AnnSearchRequest(
                data=self._queries(level_vectors[level], level), anns_field=self._vector_field(level),
                param={"metric_type": self.spec.metric, "params": breadth},
                limit=candidates or 2 * k, expr=expr or None, expr_params=fparams or None,
            )
            for level in levels
        ]
        if len({len(r.data) for r in requests}) != 1:
            raise QueryError("every level needs the same number of query vectors")
        if not self.features.hybrid_search:
            raise StoreError(f"{self.features.name} at {self.settings.display_uri!r} has no hybrid search (fusion); "
                             f"it needs Milvus 2.4 or newer")
        ranker = ranker or ("weighted" if weights else "rrf")
        if ranker == "rrf":
            fusion = RRFRanker(rrf_k)
        elif ranker == "weighted":
            if not weights or set(weights) != set(levels):
                raise QueryError(f"weighted ranking needs one weight per searched level {levels}, got {weights}")
            fusion = WeightedRanker(*(float(weights[level]) for level in levels))
        else:
            raise QueryError(f"ranker must be 'rrf' or 'weighted', got {ranker!r}")
        with self._calls("hybrid search"):
            result = self._client.hybrid_search(self.collection, requests, ranker=fusion, limit=k,
                                                output_fields=self._outputs(output), timeout=self._timeout(timeout))
        return [self._hits(hits) for hits in result]

    def search_iter(
        self,
        vector,
        *,
        limit: int | None = None,
        level: str | None = None,
        where: WhereInput = None,
        batch_size: int = 1000,
        output: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> Iterator[Hit]:
        """Hits of one query vector, nearest first, past Milvus's 16,384 limit."""
        data = self._queries(vector, level)
        if len(data) != 1:
            raise QueryError(f"search_iter takes one query vector, got {len(data)}")
        # pymilvus iterators forward no filter_params: values go through quote_literal.
        expr, _ = render(where, self.spec.fields, templates=False)
        with self._calls("search iterator"):
            self._count(None, timeout, **STRONG)  # see STRONG
            iterator = self._client.search_iterator(
                self.collection, data=data, anns_field=self._vector_field(level), batch_size=batch_size,
                limit=limit if limit is not None else -1, filter=expr, output_fields=self._outputs(output),
                search_params={"metric_type": self.spec.metric,
                               "params": index_search_params(self.spec.index, batch_size, self._share(where, timeout))},
                timeout=self._timeout(timeout), **STRONG,
            )
        for batch in self._drain(iterator, "search iterator"):
            yield from self._hits(batch)

    def iterate(
        self, where: WhereInput = None, *, output: Sequence[str] | None = None, batch_size: int = 1000,
        timeout: float | None = None,
    ) -> Iterator[Hit]:
        """Every stored record matching `where` (distance None), in batches."""
        # pymilvus iterators forward no filter_params: values go through quote_literal.
        expr, _ = render(where, self.spec.fields, templates=False)
        with self._calls("query iterator"):
            self._count(None, timeout, **STRONG)  # see STRONG
            iterator = self._client.query_iterator(self.collection, batch_size=batch_size, filter=expr,
                                                   output_fields=self._outputs(output), timeout=self._timeout(timeout),
                                                   **STRONG)
        for batch in self._drain(iterator, "query iterator"):
            for row in batch:
                yield hit_from_entity(row, self.spec, id_=row[self.spec.fields.id], distance=None)

    def row_batches(self, *, batch_size: int = 1000, timeout: float | None = None) -> Iterator[list[dict]]:
        """Every stored row with every field (vectors as lists of floats), in batches: what
        `upsert_rows` takes back, so a collection can be copied field for field."""
        if not 1 <= batch_size <= MAX_TOPK:
            raise QueryError(f"batch_size must be in [1, {MAX_TOPK}], got {batch_size}")
        fields = self.spec.fields
        names = [fields.id, *fields.scalars, *self.spec.vector_dims()]
        with self._calls("query iterator"):
            self._count(None, timeout, **STRONG)  # see STRONG
            iterator = self._client.query_iterator(self.collection, batch_size=batch_size, filter="",
                                                   output_fields=names, timeout=self._timeout(timeout), **STRONG)
        for batch in self._drain(iterator, "query iterator"):
            yield [{name: row[name] for name in names} for row in batch]

    def category_counts(self, level: str | None = None, *, where: WhereInput = None) -> Counter | dict[str, Counter]:
        """How many records each category of `level` holds; with no level, every level's counts (one pass)."""
        levels = self.spec.level_names if level is None else (level,)
        for name in levels:
            if name not in self.spec.fields.levels:
                raise UnknownLevelError(f"unknown level {name!r}; levels are {', '.join(self.spec.level_names)}")
        counts = {name: Counter() for name in levels}
        for hit in self.iterate(where, output=list(levels)):
            for name in levels:
                counts[name][hit.categories[name]] += 1
        return counts if level is None else counts[level]

    # -- helpers -------------------------------------------------------------------------
    def _drain(self, iterator, action: str) -> Iterator[list]:
        """The non-empty batches of a pymilvus iterator, closing it however the caller stops."""
        try:
            while True:
                with self._calls(action):
                    batch = iterator.next()
                if not batch:
                    return
                yield batch
        finally:
            iterator.close()

    def _share(self, where: WhereInput, timeout: float | None) -> float:
        """Share of rows passing `where` (1.0 without one): filtered searches widen by it.

        A count costs as much as a search on Milvus Lite (~100 ms at 100,000 rows), and the
        share only steers the search breadth, so it is cached per filter for a minute;
        this store's own writes clear the cache.
        """
        if where is None:
            return 1.0
        expr, params = self._filter(where)
        key = (expr, json.dumps(params, sort_keys=True, default=str))
        cached = self._shares.get(key)
        if cached is not None and time.monotonic() - cached[1] < SHARE_TTL_S:
            return cached[0]
        total = self.count(timeout=timeout)
        share = self.count(where, timeout=timeout) / total if total else 0.0
        self._shares[key] = (share, time.monotonic())
        return share

    def _filter(self, where: WhereInput) -> tuple[str, dict]:
        return render(where, self.spec.fields, templates=self.templates)

    def _rows_of(self, ids: Sequence[str], fields: list[str], action: str, timeout: float | None) -> list[dict]:
        """The stored rows of `ids` (those that exist), with `fields`."""
        if not ids:
            return []
        expr, params = self._ids_filter(ids)
        with self._calls(action):
            return self._client.query(self.collection, filter=expr, output_fields=fields,
                                      timeout=self._timeout(timeout), **self._params(params))

    def _ids_filter(self, ids: Sequence[str]) -> tuple[str, dict]:
        ids = [str(i) for i in ids]
        if self.templates:
            return f"{self.spec.fields.id} in {{ids}}", {"ids": ids}
        return f"{self.spec.fields.id} in {quote_literal(ids)}", {}

    @staticmethod
    def _params(params: dict) -> dict:
        return {"filter_params": params} if params else {}

    def _vector_field(self, level: str | None) -> str:
        fields = self.spec.fields
        if level is None:
            return fields.vector
        if level not in fields.levels:
            raise UnknownLevelError(f"unknown level {level!r}; levels are {', '.join(self.spec.level_names)}")
        if level not in fields.level_vectors:
            raise LevelVectorMissingError(self.missing_level_vector(level))
        return fields.level_vectors[level]

    def missing_level_vector(self, level: str) -> str:
        """Why a search on `level`'s own vector cannot run here."""
        if not self.spec.level_dims:
            return f"collection {self.collection!r} holds no per-level vectors (a flat model)"
        kept = ", ".join(self.spec.kept_vector_levels) or "none: the image vector only"
        return (f"collection {self.collection!r} keeps no vector field for level {level!r} (its layout keeps level "
                f"vectors for {kept}), so it cannot search on that level's vector alone or fuse it; search with the "
                f"image vector (filters by category still work), or ingest into a collection created with "
                f"vector_levels including {level!r}")

    def _queries(self, vectors, level: str | None) -> list[list[float]]:
        dim = self.spec.dim if level is None else self.spec.level_dim(level)
        try:
            array = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError) as exc:  # the caller's value: numpy says why
            raise QueryError(f"query vectors must be an array of numbers ({exc})") from None
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != dim or len(array) == 0:
            what = "image vectors" if level is None else f"{level!r} vectors"
            raise QueryError(f"query {what} must have shape (n, {dim}), got {np.asarray(vectors).shape}")
        if not np.isfinite(array).all():
            raise QueryError("query vectors hold NaN or infinite values")
        return array.tolist()

    def _outputs(self, output: Sequence[str] | None) -> list[str]:
        fields = self.spec.fields
        known = {"uri": [fields.uri], "meta": [fields.meta], **{n: [f] for n, f in fields.levels.items()},
                 "predicted": [fields.predicted, *fields.confidence.values()]}
        names = list(known) if output is None else list(output)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise FilterError(f"unknown output fields {unknown}; choose from {sorted(known)}")
        # No field asked for is the id alone: Milvus Lite answers an empty output_fields with every
        # field, vectors included (search of 100 queries, k=101: 1.8x the time of the id alone).
        return [field for n in names for field in known[n]] or [fields.id]

    def _hits(self, hits) -> list[Hit]:
        out = []
        for hit in hits:
            hit = dict(hit)
            entity = hit.get("entity", hit)
            out.append(hit_from_entity(entity, self.spec, id_=hit.get("id", entity.get("id")),
                                       distance=hit.get("distance")))
        return out
