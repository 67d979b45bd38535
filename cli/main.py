"""The `hiervec` command: data, train, ingest, search, eval, info, delete, relabel, serve.

Commands parse options, call the library and render the result: a readable table by
default, one JSON document on stdout with `--json` (progress then stays silent; it
always goes to stderr). The library's errors (`EmbedderError`, `StoreError`) become one
line on stderr and exit status 1; any other exception is a bug and shows its traceback.
Heavy imports (torch, pymilvus) happen inside commands, so `hiervec --help` is instant.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import dataclasses
from dataclasses import replace
from types import SimpleNamespace

import click

from embedder.train_config import (
    BATCH_NORM_CHOICES, DEFAULT_DIM, DEFAULT_MODE, DEFAULT_WEIGHTS, DIST_TIMEOUT_S, MODES, TrainConfig,
)
from hiervec_app.search import SearchRequest
from hiervec_core.names import (
    BACKBONES, DEFAULT_BACKBONE, DEFAULT_COLLECTION, DEFAULT_DEVICE, DEFAULT_INDEX, DEFAULT_RUNTIME, EXPORT_FORMATS, FUSIONS, HEAD_INITS,
    IMAGE_SIZE_RANGE, LEAF_SOFTMAX_MIN_IMAGES, MAX_TOPK, MODEL_ROOT_ENV, PREDICTED_CHOICES, RUNTIMES, SERVER_INDEXES,
)
from milvus_store.bucket import S3Bucket
from scaleout.options import EmbedderRecipe, RayOptions
from service.settings import MB, MEGAPIXEL, ServerSettings, ServiceSettings


def defaults(cls) -> SimpleNamespace:
    """A config dataclass's field defaults by name: the options read theirs here, never copy them
    (the library's modules these come from import neither torch, FastAPI nor pymilvus)."""
    return SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING})


TRAIN, SEARCH, SERVICE, SERVER = defaults(TrainConfig), defaults(SearchRequest), defaults(ServiceSettings), defaults(
    ServerSettings)
RAY, RECIPE, BUCKET = defaults(RayOptions), defaults(EmbedderRecipe), defaults(S3Bucket)


def _library_errors() -> tuple[type[BaseException], ...]:
    """Our packages' error bases, from the modules already imported (no import cost)."""
    found = []
    for module, name in (("embedder.errors", "EmbedderError"), ("milvus_store.errors", "StoreError"),
                         ("scaleout.errors", "ScaleOutError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


class HiervecGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except _library_errors() as exc:  # anything else is a bug: its traceback shows
            if os.environ.get("HIERVEC_DEBUG"):
                raise
            raise click.ClickException(cli_words(" ".join(str(exc).split()) or exc.__class__.__name__)) from None


# Library arguments a library message may name, and the flag a CLI user gives instead.
LIBRARY_WORDS = (
    ("pass pad=True", "pass --pad"), ("vector_levels=()", "--level-vectors none"),
    ("vector_levels including", "--level-vectors that include"), ("partition_key='' (none)", "--partition-key none"),
    ("pass merge=True", "pass --merge"), ("weights=PATH", "--weights PATH"), ("with resume=True", "with --resume"),
    ("with resume=False", "without --resume"), ("resume needs out", "--resume needs --out"),
    ("searches must name it", "searches need --model"), ("device='cpu'", "--device cpu"), ("runtime='torch'", "--runtime torch"), ("the Ray engine", "--engine ray"),
)
LEVELS_TUPLE = re.compile(r"vector_levels=\(([^)]*)\)")


def cli_words(message: str) -> str:
    """A library message in the CLI's words: the arguments it names become the flags that set them."""
    for library, flag in LIBRARY_WORDS:
        message = message.replace(library, flag)
    return LEVELS_TUPLE.sub(lambda m: "--level-vectors " + ",".join(
        name.strip().strip("'\"") for name in m.group(1).split(",") if name.strip()), message)


class BackboneChoice(click.ParamType):
    """One of torchvision's backbones (`choices`) or ``timm:NAME`` for any timm model."""

    name = "backbone"
    choices = BACKBONES

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(BACKBONES) + "|timm:NAME]"

    def convert(self, value, param, ctx):
        from embedder.backbones import check_backbone
        from embedder.errors import ConfigError

        try:
            check_backbone(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


class SourceArg(click.ParamType):
    """SOURCE of ingest: an existing folder tree or manifest, or ``fiftyone:DATASET`` (a FiftyOne dataset)."""

    name = "source"

    def convert(self, value, param, ctx):
        text = str(value)
        if text.startswith("fiftyone:"):
            if not text[len("fiftyone:"):]:
                self.fail("fiftyone: needs a dataset name (fiftyone:NAME)", param, ctx)
            return text
        return click.Path(exists=True, path_type=Path).convert(value, param, ctx)


def read_listing(source, level_fields: str | None):
    """The items of SOURCE (`hiervec_app.jobs.Listing`): a folder tree or manifest (`embedder.read_source`)
    or a FiftyOne dataset."""
    from embedder import read_source
    from hiervec_app.jobs import Listing

    if isinstance(source, str) and source.startswith("fiftyone:"):
        try:
            from integrations.fiftyone import read_dataset
        except ImportError as exc:
            raise click.UsageError(f"a fiftyone: source needs FiftyOne: pip install 'hiervec[fiftyone]' ({exc})")
        fields = [f.strip() for f in level_fields.split(",") if f.strip()] if level_fields else None
        return Listing.of(read_dataset(source[len("fiftyone:"):], fields), name=source)
    if level_fields:
        raise click.UsageError("--level-fields goes with a fiftyone:DATASET source")
    return Listing.of(read_source(source), folder=source if Path(source).is_dir() else None, name=str(source))


def json_option(func):
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on stdout, nothing else.")(func)


def store_options(func):
    for option in reversed((
        click.option("--uri", default=None, metavar="URI",
                     help="Milvus Lite file (*.db) or http(s)://host:port. [default: $HIERVEC_MILVUS_URI, else ./hiervec.db]"),
        click.option("--collection", default=DEFAULT_COLLECTION, show_default=True, help="Collection name."),
        click.option("--token", default=None, envvar="HIERVEC_MILVUS_TOKEN", show_envvar=True,
                     help="Token for a Milvus server (user:password or an API key)."),
    )):
        func = option(func)
    return func


def uses_milvus(func):
    """Errors reach the user once, as one line from us: pymilvus's and Milvus Lite's own
    logging (a traceback per failed RPC or locked file, warnings about Lite's iterator
    timestamps) is silenced. Its import
    configures its loggers, so the levels are set after it, when the command runs."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import pymilvus  # noqa: F401

        for name in ("pymilvus", "pymilvus.milvus_client", "milvus_lite"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        return func(*args, **kwargs)

    return wrapper


def model_option(func):
    return click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
                        help="Checkpoint written by `hiervec train`.")(func)


def emit(as_json: bool, data, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False))
    elif text is not None:
        click.echo(text)


def note(as_json: bool, message: str) -> None:
    if not as_json:
        click.echo(message, err=True)


@contextlib.contextmanager
def progress_bar(length: int, label: str, as_json: bool, *, rate: str):
    """A progress bar on stderr for a phase of `length` items, silent with --json or without a terminal;
    yields `advance(n)`, which also shows the rate so far."""
    with click.progressbar(length=length, label=label, file=sys.stderr, show_eta=True, show_pos=True,
                           hidden=as_json or not sys.stderr.isatty()) as bar:
        started = time.perf_counter()

        def advance(n: int) -> None:
            bar.update(n)
            bar.label = f"{label} {bar.pos / max(time.perf_counter() - started, 1e-9):.0f} {rate}"

        yield advance


def engine_options(func):
    """--engine and its Ray engine's options (ingest, reindex)."""
    for option in reversed((
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: this process (threads overlap reading, embedding and writing); ray: Ray Data, "
                          "on this machine or a cluster (needs: pip install 'hiervec[ray]')."),
        click.option("--ray-address", default=None, metavar="ADDR",
                     help="A running Ray cluster (ray://host:10001 or host:6379) for --engine ray. [default: a local "
                          "Ray started for this ingest]"),
        click.option("--actors", type=click.IntRange(1, 1024), default=RAY.actors, show_default=True,
                     help="Embedding actors of --engine ray, each holding the model."),
        click.option("--cpus-per-actor", type=click.FloatRange(0.05, 256), default=RAY.cpus_per_actor, show_default=True,
                     help="CPUs Ray reserves per embedding actor (fractions let a 2-core node run two beside the readers)."),
        click.option("--threads-per-actor", type=click.IntRange(1, 256), default=RECIPE.threads, show_default=True,
                     help="Torch threads of each embedding actor (actors on one node must not oversubscribe its cores)."),
        click.option("--gpus-per-actor", type=click.FloatRange(0, 16), default=RAY.gpus_per_actor, show_default=True,
                     help="GPUs per embedding actor (e.g. 1, or 0.5 for two actors per GPU)."),
        click.option("--writers", type=click.IntRange(1, 64), default=None,
                     help="Writer actors for a Milvus server with --engine ray. [default: 2; a Milvus Lite file is "
                          "written by this process]"),
    )):
        func = option(func)
    return func


def optimize_option(func):
    return click.option("--optimize", is_flag=True,
                        help="Embed through the traced, frozen model: about twice as fast on CPUs, "
                             "same vectors to float rounding (see BENCHMARKS.md).")(func)


DEVICE_HELP = "Where the model runs: auto (CUDA if available, else MPS, else CPU), cpu, cuda, cuda:N or mps."


def compute_options(func):
    """--device, --amp and --threads: the command runs the model where it is told, with as many
    threads as it is told (the library never sets a thread count on its own)."""

    @functools.wraps(func)
    def wrapper(*args, threads: int | None, **kwargs):
        if threads is not None:
            from embedder.devices import set_threads

            set_threads(threads)
        return func(*args, **kwargs)

    for option in reversed((
        click.option("--device", default=DEFAULT_DEVICE, show_default=True, metavar="DEVICE", help=DEVICE_HELP),
        click.option("--amp", is_flag=True,
                     help="Mixed precision (bfloat16; float16 on GPUs without it). Stored vectors stay float32."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Torch threads of this process. [default: torch's; under torchrun, this machine's "
                          "CPUs shared among its processes]"),
    )):
        wrapper = option(wrapper)
    return wrapper


def check_writable(path: Path | None, option: str) -> None:
    """Fail before any work when the file `path` could not be written at the end of it."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(f"{option} {str(path)!r}: cannot create its folder "
                                   f"({exc.strerror or exc})") from None
    if path.is_dir():
        raise click.ClickException(f"{option} {str(path)!r} is a folder; give a file name")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise click.ClickException(f"{option} {str(path)!r}: no permission to write there")


def runtime_option(func):
    return click.option("--runtime", type=click.Choice(("auto", *RUNTIMES)), default=DEFAULT_RUNTIME, show_default=True,
                        help="What runs the model: torch, or the CPU runtimes onnxruntime or openvino (same vectors "
                             "within 1e-4). auto: the fastest installed on CPUs (onnxruntime, openvino, torch), "
                             "torch on GPUs.")(func)


def load_embedder(model_path: Path, optimize: bool = False, device: str = "auto", amp: bool = False,
                  runtime: str = "torch"):
    from embedder import Embedder

    return Embedder.from_checkpoint(model_path, optimize=optimize, device=device, amp=amp, runtime=runtime)


@click.group(cls=HiervecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hiervec")
def cli():
    """Hierarchical-category image retrieval on Milvus.

    \b
    A typical session:
      hiervec data fashion-mnist data/train --split train
      hiervec train data/train --out model.pt --levels department,category,item
      hiervec ingest data/test --model model.pt
      hiervec search query.png --model model.pt --under clothing/tops --sheet hits.png
    """


# -- data --------------------------------------------------------------------------------
@cli.group()
def data():
    """Export real data sets as labelled folder trees."""


@data.command("fashion-mnist")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["train", "test", "all"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N images of each split.")
@json_option
def data_fashion_mnist(out: Path, split: str, limit: int | None, as_json: bool):
    """Fashion-MNIST as OUT/<department>/<category>/<item>/<image>.png.

    Levels: department > category > item, e.g. clothing/tops/shirt. Read from Debian's
    dataset-fashion-mnist package when installed, else downloaded by torchvision.
    """
    from embedder import fashion_mnist

    started = time.perf_counter()
    sizes = [fashion_mnist.SPLIT_SIZES[name] for name in (fashion_mnist.SPLITS if split == "all" else (split,))]
    with progress_bar(sum(min(size, limit or size) for size in sizes), "export", as_json, rate="img/s") as advance:
        count = fashion_mnist.export_folder_tree(out, split=split, limit=limit, progress=advance)
    emit(as_json, {"out": str(out), "split": split, "images": count, "levels": list(fashion_mnist.LEVEL_NAMES)},
         f"wrote {count} images to {out} ({time.perf_counter() - started:.1f}s); "
         f"levels: {', '.join(fashion_mnist.LEVEL_NAMES)}")


@data.command("fashion-mnist-products")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--products", type=click.IntRange(min=1), default=1000, show_default=True,
              help="How many products (source images) to take.")
@click.option("--photos", type=click.IntRange(min=1), default=5, show_default=True, help="Photos per product.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
              help="First source image: disjoint ranges give disjoint products (e.g. a validation set).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the photos' random views.")
@json_option
def data_fashion_mnist_products(out: Path, split: str, products: int, photos: int, offset: int, seed: int,
                                as_json: bool):
    """Fashion-MNIST as products: OUT/<department>/<category>/<item>/<product>/<photo>.png.

    Each source image is one product photographed --photos times (random shift, scale,
    rotation, flip, brightness); levels department > category > item > product. Train
    and test products come from different splits, so test products are unseen.
    """
    from embedder import fashion_mnist

    started = time.perf_counter()
    with progress_bar(products * photos, "export", as_json, rate="photos/s") as advance:
        count = fashion_mnist.export_products(out, split=split, count=products, photos=photos, offset=offset,
                                              seed=seed, progress=advance)
    levels = list(fashion_mnist.PRODUCT_LEVEL_NAMES)
    emit(as_json, {"out": str(out), "split": split, "products": products, "photos": count, "levels": levels},
         f"wrote {count} photos of {products} products to {out} ({time.perf_counter() - started:.1f}s); "
         f"levels: {', '.join(levels)}")


@data.command("fiftyone")
@click.argument("name")
@store_options
@click.option("--overwrite", is_flag=True, help="Replace a FiftyOne dataset of that name.")
@json_option
@uses_milvus
def data_fiftyone(name: str, uri, collection, token, overwrite: bool, as_json: bool):
    """Export the collection to the FiftyOne dataset NAME (persistent): one sample per stored image file,
    its category at each level as a Classification (with its probability), hiervec_id, and the tag
    'predicted' where the model chose the category. Open it in the FiftyOne App; `hiervec ingest
    fiftyone:NAME` reads one back."""
    try:
        from integrations.fiftyone import export_collection
    except ImportError as exc:
        raise click.UsageError(f"FiftyOne is not installed: pip install 'hiervec[fiftyone]' ({exc})")
    from milvus_store import HierStore

    with HierStore(uri, collection, token=token, create=False) as store:
        try:
            count = export_collection(store, name, overwrite=overwrite)
        except ValueError as exc:
            raise click.UsageError(str(exc))
    emit(as_json, {"dataset": name, "samples": count, "collection": collection},
         f"wrote {count} samples of collection {collection!r} to the FiftyOne dataset {name!r}")


@data.command("openclipart")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The package's PNG folder. [default: /usr/share/openclipart/png]")
@click.option("--min-per-leaf", type=click.IntRange(min=5), default=10, show_default=True,
              help="Drop categories with fewer images.")
@click.option("--max-per-leaf", type=click.IntRange(min=5), default=200, show_default=True,
              help="Keep at most this many images of a category (chosen by the split's order).")
@click.option("--max-side", type=click.IntRange(min=32), default=512, show_default=True,
              help="Scale larger images down to this longer side.")
@json_option
def data_openclipart(out: Path, source: Path | None, min_per_leaf: int, max_per_leaf: int, max_side: int,
                     as_json: bool):
    """Debian's openclipart-png as OUT/{train,val,test}/<department>/<category>/<image>.png.

    Real RGB clip art in a real 2-level category tree (food/fruit, animals/mammals, ...):
    transparency flattened on white, duplicates kept once, small categories dropped, a
    deterministic split by file (20% test, 20% val). apt-get install openclipart-png.
    """
    from embedder import openclipart

    started = time.perf_counter()
    note(as_json, f"exporting {source or openclipart.DEBIAN_DIR} to {out} ...")
    report = openclipart.export(out, source=source or openclipart.DEBIAN_DIR, min_per_leaf=min_per_leaf,
                                max_per_leaf=max_per_leaf, max_side=max_side)
    for where, reason in report.failures[:5]:
        note(as_json, f"skipped {where}: {reason}")
    departments = sorted({leaf.split("/")[0] for leaf in report.categories})
    data = {"out": str(out), "images": report.images, "levels": list(openclipart.LEVEL_NAMES),
            "departments": len(departments), "categories": report.categories,
            "dropped": report.dropped, "duplicates": report.duplicates, "failed": len(report.failures)}
    emit(as_json, data,
         f"wrote {sum(report.images.values())} images to {out} ({time.perf_counter() - started:.1f}s): "
         + ", ".join(f"{split} {n}" for split, n in report.images.items())
         + f"; {len(departments)} departments, {len(report.categories)} categories "
           f"({len(report.dropped)} smaller than {min_per_leaf} dropped, {report.duplicates} duplicate files); "
           f"levels: {', '.join(openclipart.LEVEL_NAMES)}")


# -- train -------------------------------------------------------------------------------
@cli.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint to write.")
@click.option("--levels", default=None, help="Comma-separated level names, coarsest first. [default: level1,level2,...]")
@click.option("--pad", is_flag=True, help="Accept shorter category paths by repeating their leaf.")
@click.option("--backbone", type=BackboneChoice(), default=DEFAULT_BACKBONE, show_default=True,
              help="A torchvision backbone, or timm:NAME for any timm model with features_only "
                   "(ConvNets by their stages, plain ViTs through a simple feature pyramid).")
@click.option("--weights", default=DEFAULT_WEIGHTS, show_default=True,
              help="'imagenet', a torchvision weights name, a state-dict PATH (for timm: of the whole timm "
                   "model), or 'none' for random initialisation.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="[default: from the data: enough for 500 steps, 3 to 20 epochs]")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None,
              help="[default: one pass over the data, at least 50 steps]")
@click.option("--image-size", type=click.IntRange(min=32), default=None,
              help=f"Input size in px. [default: from the data: the median shorter side of the training images, "
                   f"within {IMAGE_SIZE_RANGE[0]}..{IMAGE_SIZE_RANGE[1]}]")
@click.option("--dim", type=click.IntRange(min=1), default=DEFAULT_DIM, show_default=True, help="Vector size per level.")
@click.option("--mode", type=click.Choice(MODES), default=DEFAULT_MODE, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=TRAIN.lr, show_default=True,
              help="Learning rate of the new layers (pyramid, heads, classifiers).")
@click.option("--backbone-lr-scale", type=click.FloatRange(0, 1), default=TRAIN.backbone_lr_scale, show_default=True,
              help="The pretrained backbone's learning rate as a share of --lr (0 keeps it frozen).")
@click.option("--probe-epochs", type=click.IntRange(min=0), default=TRAIN.probe_epochs, show_default=True,
              help="First epochs with the backbone frozen: the new layers learn on its features (linear probe), "
                   "then everything is fine-tuned.")
@click.option("--head-init", type=click.Choice(HEAD_INITS), default=TRAIN.head_init, show_default=True,
              help="How the new layers start on a pretrained backbone: 'backbone' (the backbone's principal "
                   "components, classifiers at their classes' mean vectors: training starts from the untrained "
                   "backbone's search) or 'random'.")
@click.option("--patience", type=click.IntRange(min=0), default=TRAIN.patience, show_default=True,
              help="Stop after this many epochs without a better validation score (0: never stop early). "
                   "The checkpoint always holds the best epoch, the pretrained start (epoch 0) included.")
@click.option("--leaf-softmax", type=click.FloatRange(min=0), default=None,
              help="Softmax weight of the leaf level (pyramid). [default: 1 when the median leaf label has "
                   f"{LEAF_SOFTMAX_MIN_IMAGES} or "
                   "more images (classes), else 0 (product-like leaves)]")
@click.option("--classes-per-batch", type=click.IntRange(min=1), default=TRAIN.classes_per_batch, show_default=True,
              help="Leaf classes in each process's batch (under torchrun the global batch is this times the "
                   "number of processes).")
@click.option("--per-class", type=click.IntRange(min=2), default=TRAIN.per_class, show_default=True,
              help="Images of each class in a batch.")
@click.option("--augment/--no-augment", default=TRAIN.augment, show_default=True,
              help="Random resized crops and flips of the training images.")
@click.option("--seed", type=int, default=TRAIN.seed, show_default=True)
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=TRAIN.val_fraction, show_default=True)
@click.option("--val-max", type=click.IntRange(min=2), default=TRAIN.val_max, show_default=True,
              help="Validate on at most this many of the held-out images (a seeded sample).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Loader processes that decode and augment the training images (0: in the training process). "
                   "[default: on GPUs this machine's cores shared among its training processes, one left to each; "
                   "on CPUs 0, the step uses every core]")
@click.option("--resume", is_flag=True,
              help="Continue the run whose checkpoint is at --out (on any number of processes), from the step "
                   "it was saved at.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, metavar="STEPS",
              help="Also save a checkpoint every STEPS steps inside an epoch, for --resume after a kill. "
                   "[default: at the end of each epoch only]")
@click.option("--batch-norm", type=click.Choice(BATCH_NORM_CHOICES), default=TRAIN.batch_norm,
              show_default=True,
              help="Batch-norm statistics: batch (each process's batch), sync (the global batch; CUDA), frozen "
                   "(the backbone's running statistics). auto: batch in one process; under torchrun sync on "
                   "CUDA, frozen on CPUs, so N processes train as one process on the global batch would.")
@click.option("--dist-timeout", type=click.FloatRange(min=1), default=DIST_TIMEOUT_S, show_default=True, metavar="SECONDS",
              help="Under torchrun: how long a process waits for the others before the job fails.")
@compute_options
@json_option
def train(source, out, levels, pad, backbone, weights, epochs, steps_per_epoch, image_size, dim, mode, lr,
          backbone_lr_scale, probe_epochs, head_init, patience, leaf_softmax, classes_per_batch, per_class, augment, seed,
          val_fraction, val_max, workers, resume, checkpoint_every, batch_norm, dist_timeout, device, amp, as_json):
    """Train a pyramid (or flat baseline) model on a labelled folder tree or manifest.

    \b
    On several processes or machines, start it with torchrun (DistributedDataParallel):
      torchrun --standalone --nproc-per-node 8 -m cli.main train data/train --out model.pt
    """
    from embedder import read_source
    from embedder.devices import default_threads, set_threads
    from embedder.distributed import DistributedContext
    from embedder.jobs import train_listing

    check_writable(out, "--out")
    context = DistributedContext.from_environment()
    if context.enabled and click.get_current_context().params["threads"] is None:
        set_threads(default_threads(context.local_world_size))  # torchrun's processes share this machine's CPUs
    quiet = as_json or not context.is_main
    train_config = TrainConfig(epochs=epochs, steps_per_epoch=steps_per_epoch, lr=lr, leaf_softmax=leaf_softmax,
                               backbone_lr_scale=backbone_lr_scale, probe_epochs=probe_epochs, head_init=head_init,
                               patience=patience or None, classes_per_batch=classes_per_batch, per_class=per_class,
                               augment=augment, seed=seed, val_fraction=val_fraction, val_max=val_max,
                               batch_norm=batch_norm, checkpoint_every=checkpoint_every)
    listing = read_source(source)
    if not any(item.category is not None for item in listing.items):
        raise click.ClickException(f"no labelled images in {source}")
    summary = train_listing(listing, out, train_config, levels=[n.strip() for n in levels.split(",")] if levels else None,
                            pad=pad, backbone=backbone, weights=weights, image_size=image_size, dim=dim, mode=mode,
                            resume=resume, device=device, amp=amp, workers=workers, dist_timeout_s=dist_timeout,
                            log=None if quiet else _train_log)
    for failure in summary.skipped[:10]:
        note(quiet, f"skipped {failure.source}: {failure.reason}")
    if summary.checkpoint is None:  # a rank other than 0: rank 0 reports
        return
    data, checkpoint = summary.to_dict(), summary.checkpoint
    held = f", the weights of epoch {checkpoint.selection['best_epoch']}" if checkpoint.selection else ""
    emit(as_json, data, f"wrote {out} (fingerprint {checkpoint.vector_fingerprint}{held}) in {data['seconds']}s\n"
         + "\n".join(f"  {k:<32} {v:.4f}" for k, v in checkpoint.metrics.items()))


def _train_log(line: str) -> None:
    """Training's progress lines on stderr; the chosen image size says which option chooses it."""
    click.echo(line + (" (--image-size to choose)" if line.startswith("image size ") else ""), err=True)


# -- ingest ------------------------------------------------------------------------------
def collection_layout(level_names: Sequence[str], has_level_vectors: bool, level_vectors: str | None,
                      partition_key: str | None) -> dict:
    """`--level-vectors` and `--partition-key` as `ImageIndex.open` arguments, checked against the model's levels."""
    levels = list(level_names)
    layout: dict = {}
    if level_vectors is not None:
        text = level_vectors.strip()
        chosen = levels if text == "all" else [] if text == "none" else [p.strip() for p in text.split(",")]
        unknown = [name for name in chosen if name not in levels]
        if unknown or (text not in ("all", "none") and not all(chosen)):
            raise click.BadParameter(f"{level_vectors!r}: use all, none or levels of the model ({', '.join(levels)})",
                                     param_hint="--level-vectors")
        if chosen and not has_level_vectors:
            raise click.BadParameter("the model is flat: it has no level vectors to keep", param_hint="--level-vectors")
        layout["vector_levels"] = tuple(chosen)
    if partition_key is not None:
        if partition_key != "none" and partition_key not in levels:
            raise click.BadParameter(f"{partition_key!r}: use none or a level of the model ({', '.join(levels)})",
                                     param_hint="--partition-key")
        layout["partition_key"] = "" if partition_key == "none" else partition_key
    return layout


@cli.command()
@click.argument("source", type=SourceArg())
@model_option
@store_options
@click.option("--level-fields", default=None, metavar="FIELD,...",
              help="With a fiftyone:DATASET source: the label fields holding each level's category, coarsest "
                   "first (names or paths); samples without them get the model's predicted category.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=RAY.batch_size, show_default=True,
              help="Images read, decoded and written together (memory grows with it).")
@click.option("--index", type=click.Choice(SERVER_INDEXES), default=None,
              help=f"Vector index when the collection is created. [default: {DEFAULT_INDEX}]")
@click.option("--level-vectors", default=None, metavar="all|none|LEVEL,...",
              help="Which levels keep a vector field of their own when the collection is created (the image vector "
                   "is always kept, and holds every level's vector): all, none (for servers that take few vector "
                   "fields: a stock Milvus 2.5 takes 4, Milvus 2.3 one), or a comma list. Level searches and "
                   "fusion need their level's field. [default: all]")
@click.option("--partition-key", default=None, metavar="LEVEL|none",
              help="The level whose field Milvus hashes into partitions when the collection is created; filters on "
                   "it or below search only their partition. [default: the coarsest level on a server, none on "
                   "Milvus Lite]")
@click.option("--num-partitions", type=click.IntRange(1, 1024), default=None,
              help="Partitions of the partition key (Milvus Lite always makes 16). [default: 16]")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every file's failure reason and the counts here (JSON).")
@click.option("--strict", is_flag=True, help="Exit with status 1 when any file failed.")
@engine_options
@click.option("--bulk", is_flag=True,
              help="Milvus servers: write the rows as Parquet files to the bucket the server reads, then bulk-import "
                   "them in one job (large backfills). Ids already stored are still skipped first.")
@click.option("--bulk-endpoint", default=BUCKET.endpoint, show_default=True, metavar="HOST:PORT",
              help="S3/MinIO endpoint of the server's bucket for --bulk (docker-compose.yml's MinIO); keys from "
                   "$HIERVEC_S3_ACCESS_KEY and $HIERVEC_S3_SECRET_KEY [default: minioadmin].")
@click.option("--bulk-bucket", default=BUCKET.bucket, show_default=True, help="The server's bucket for --bulk.")
@click.option("--sync", is_flag=True,
              help="Also remove the collection's images that SOURCE no longer lists: those stored from under the "
                   "folder SOURCE, or the whole collection for a manifest. Never when the listing had errors.")
@click.option("--dry-run", is_flag=True,
              help="With --sync: write nothing; print how many images (and which) the sync would remove.")
@optimize_option
@runtime_option
@compute_options
@json_option
@uses_milvus
def ingest(source, model_path, uri, collection, token, level_fields, batch_size, index, level_vectors, partition_key, num_partitions,
           report_path, strict, engine, ray_address, actors, cpus_per_actor, threads_per_actor, gpus_per_actor, bulk,
           bulk_endpoint, bulk_bucket, writers, sync, dry_run, optimize, runtime, device, amp, as_json):
    """Embed a folder tree, a manifest or a FiftyOne dataset (fiftyone:NAME) into the collection; already
    stored images are skipped."""
    from hiervec_app import ImageIndex, UpsertSink
    from hiervec_app.jobs import ingest_listing, sync_dry_run
    from milvus_store import ConnectionSettings

    check_writable(report_path, "--report")
    if dry_run and not sync:
        raise click.UsageError("--dry-run goes with --sync (it shows what a sync would remove)")
    if bulk and ConnectionSettings.resolve(uri).is_local:
        raise click.UsageError("--bulk: Milvus Lite has no bulk import; ingest into a .db without --bulk, or give "
                               "--uri http://host:19530 (a Milvus server)")
    _check_engine(engine)  # before anything is read or created
    listing = read_listing(source, level_fields)
    if dry_run:
        with _open_store(uri, collection, token) as store:
            synced = sync_dry_run(store, listing)
        return emit(as_json, {"collection": collection, "sync": synced}, _sync_line(synced))
    embedder = load_embedder(model_path, optimize, device, amp, runtime)
    layout = collection_layout(embedder.level_names, bool(embedder.level_dims), level_vectors, partition_key)
    executor = _executor(engine, model_path, batch_size, ray_address, actors, cpus_per_actor, threads_per_actor,
                         gpus_per_actor, writers, optimize, runtime, device, amp)
    with ImageIndex.open(embedder, uri, collection, index=index, token=token, num_partitions=num_partitions,
                         **layout) as image_index:
        sink = _bulk_sink(image_index.store, collection, bulk_endpoint, bulk_bucket, as_json) if bulk \
            else UpsertSink(image_index.store, token)
        with progress_bar(len(listing.items), "ingest", as_json, rate="img/s") as advance, _engine_errors(engine):
            result = ingest_listing(image_index, listing, executor=executor, sink=sink, sync=sync, progress=advance)
    render_ingest(result, as_json, report_path)
    if strict and result.report.failed:
        sys.exit(1)


def render_ingest(result, as_json: bool, report_path: Path | None) -> None:
    """An ingest's result: one JSON document, or a line and the first failures and duplicates on stderr;
    every item's outcome in the --report file."""
    report, data = result.report, result.to_dict()
    for warning in report.warnings:
        note(as_json, f"warning: {cli_words(warning)}")
    if report_path is not None:  # its folder was made (or refused) by check_writable before the work
        report_path.write_text(json.dumps(result.to_dict(items=True), indent=2, ensure_ascii=False))
    duplicates = f", {len(report.duplicates)} duplicate(s) of an earlier file" if report.duplicates else ""
    emit(as_json, data, f"seen {report.seen}, stored {report.stored} ({report.predicted} with a predicted "
         f"category), skipped {report.skipped_present} (already present){duplicates}, failed {len(report.failed)}; "
         f"collection {result.collection!r} holds {result.count} ({data['images_per_s'] or 0} img/s)")
    if as_json:
        return
    for failure in report.failed[:10]:
        click.echo(f"  failed {failure.source}: {failure.reason}", err=True)
    if len(report.failed) > 10:
        click.echo(f"  ... {len(report.failed) - 10} more" + (f" in {report_path}" if report_path else ""), err=True)
    for duplicate in report.duplicates[:10]:
        click.echo(f"  not stored {duplicate.source}: the same image as {duplicate.same_as}, stored with its "
                   f"category", err=True)
    if result.synced is not None:
        click.echo(_sync_line(result.synced), err=True)


def _sync_line(synced: dict) -> str:
    if synced.get("refused"):
        return f"sync: {synced['refused']}"
    dry = synced.get("dry_run")
    count = synced["stale"] if dry else synced["removed"]
    lines = [f"sync: {'would remove' if dry else 'removed'} {count} of {synced['examined']} images in "
             f"{synced['scope']} that the source no longer lists"]
    lines += [f"  {uri}" for uri in synced["stale_uris"]]
    if synced["stale"] > len(synced["stale_uris"]):
        lines.append(f"  ... {synced['stale'] - len(synced['stale_uris'])} more")
    return "\n".join(lines)


def _check_engine(engine: str) -> None:
    """Ray is importable when --engine ray asks for it (the error says how to install it)."""
    if engine != "ray":
        return
    from scaleout import EngineMissingError
    from scaleout.ray_engine import import_ray

    try:
        import_ray()
    except EngineMissingError as exc:
        raise click.ClickException(cli_words(str(exc))) from None


@cli.command()
@model_option
@click.option("--to", "target", required=True, metavar="COLLECTION",
              help="The new collection, created with the new model's layout beside the current one (a rerun "
                   "resumes it: ids already there are skipped).")
@store_options
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Read the images from this folder when they moved: each stored file is looked up at its path "
                   "relative to --stored-root. [default: each image's stored uri]")
@click.option("--stored-root", default=None, metavar="FOLDER",
              help="The folder the stored paths are relative to, for --source. [default: the deepest folder holding "
                   "every stored file]")
@click.option("--switch", is_flag=True,
              help="When --collection is an alias: point it at --to once every image is there (the counts agree); "
                   "the old collection is kept for a rollback (hiervec alias set).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=RAY.batch_size, show_default=True,
              help="Images read, decoded and written together (memory grows with it).")
@click.option("--index", type=click.Choice(SERVER_INDEXES), default=None,
              help="Vector index of the new collection. [default: the current collection's]")
@click.option("--level-vectors", default=None, metavar="all|none|LEVEL,...",
              help="Which levels keep a vector field in the new collection (as for ingest). [default: all]")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every file's failure reason and the counts here (JSON).")
@engine_options
@optimize_option
@runtime_option
@compute_options
@json_option
@uses_milvus
def reindex(model_path, target, uri, collection, token, source, stored_root, switch, batch_size, index, level_vectors,
            report_path, engine, ray_address, actors, cpus_per_actor, threads_per_actor, gpus_per_actor, writers,
            optimize, runtime, device, amp, as_json):
    """Embed every image of the collection again with a new model (--model) into a new collection (--to):
    ids, given categories and meta kept, predicted categories predicted again by the new model. With
    --switch, the alias --collection moves to the new collection when it is complete."""
    from hiervec_app import ImageIndex, UpsertSink
    from milvus_store import Aliases, HierStore
    from hiervec_app.reindex import stored_items

    check_writable(report_path, "--report")
    _check_engine(engine)
    with HierStore(uri, collection, token=token, create=False) as current:
        if target in (current.target, collection):
            raise click.UsageError(f"--to {target!r} is the collection being reindexed: name a new one")
        if switch and current.target == collection:
            raise click.UsageError(f"--switch moves an alias, and {collection!r} is a collection: make an alias "
                                   f"first (hiervec alias set NAME {collection}) and reindex through it")
        embedder = load_embedder(model_path, optimize, device, amp, runtime)
        if len(embedder.level_names) != current.spec.depth:
            raise click.ClickException(
                f"the new model has {len(embedder.level_names)} levels ({', '.join(embedder.level_names)}) and "
                f"{collection!r} {current.spec.depth} ({', '.join(current.spec.level_names)}): its categories "
                f"cannot be kept; nothing was written")
        layout = collection_layout(embedder.level_names, bool(embedder.level_dims), level_vectors, None)
        kept = tuple(current.spec.kept_vector_levels)
        if level_vectors is None and embedder.level_dims and set(kept) <= set(embedder.level_names):
            layout["vector_levels"] = kept  # the current layout (a server may take no more vector fields)
        total = current.count()
        with ImageIndex.open(embedder, uri, target, index=index or current.spec.index, metric=current.spec.metric,
                             token=token, **layout) as image_index:
            if image_index.store.target != target:
                raise click.UsageError(f"--to {target!r} is an alias: name a collection")
            items = stored_items(current, source=source, root=stored_root)
            executor = _executor(engine, model_path, batch_size, ray_address, actors, cpus_per_actor,
                                 threads_per_actor, gpus_per_actor, writers, optimize, runtime, device, amp)
            with progress_bar(total, "reindex", as_json, rate="img/s") as advance, _engine_errors(engine):
                report = image_index.ingest(items, executor=executor, sink=UpsertSink(image_index.store, token),
                                            progress=advance)
            count = image_index.store.count()
        source_count = current.count()
        previous = current.target
    complete = count == source_count and not report.failed
    switched = None
    if switch and complete:
        with Aliases(uri, token=token) as aliases:
            switched = aliases.set(collection, target).to_dict()
    result = report.to_dict() | {"from": previous, "to": target, "count": count, "source_count": source_count,
                                 "complete": complete, "switched": switched}
    if report_path is not None:
        report_path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    text = (f"reindexed {previous!r} into {target!r}: stored {report.stored}, skipped {report.skipped_present} "
            f"(already there), failed {len(report.failed)}; {count} of {source_count} images "
            f"({result['images_per_s'] or 0} img/s)")
    if switched:
        text += f"\nalias {collection!r} -> {target!r} (was {previous!r}; kept for a rollback)"
    elif switch:
        text += f"\nalias {collection!r} not moved: {target!r} is not complete; rerun to resume"
    emit(as_json, result, text)
    if not as_json:
        for failure in report.failed[:10]:
            click.echo(f"  failed {failure.source}: {failure.reason}", err=True)
    if switch and not switched:
        sys.exit(1)


def _bulk_sink(store, collection, endpoint, bucket, as_json):
    """--bulk: rows as Parquet files in the server's bucket, imported in one job when the ingest ends."""
    from hiervec_app import BulkSink
    from milvus_store.bulk import BulkFiles, S3Bucket

    prefix = f"hiervec-bulk/{collection}/{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    return BulkSink(store, BulkFiles(store.spec, remote=S3Bucket(endpoint, bucket, prefix)),
                    log=lambda line: note(as_json, line))


def _executor(engine, model_path, batch_size, ray_address, actors, cpus_per_actor, threads_per_actor,
              gpus_per_actor, writers, optimize, runtime, device, amp):
    """The ingest pipeline's executor for --engine: threads here, or Ray (`scaleout.RayExecutor`)."""
    from hiervec_app import ThreadExecutor

    if engine != "ray":
        return ThreadExecutor(batch_size)
    from scaleout import EmbedderRecipe, RayExecutor, RayOptions, ScaleOutError

    if gpus_per_actor and device == "auto":
        device = "cuda"
    recipe = EmbedderRecipe(str(model_path.resolve()), runtime=runtime, optimize=optimize, device=device, amp=amp,
                            threads=threads_per_actor)
    try:
        return RayExecutor(recipe, RayOptions(address=ray_address, actors=actors, cpus_per_actor=cpus_per_actor,
                                              gpus_per_actor=gpus_per_actor, writers=writers, batch_size=batch_size))
    except ScaleOutError as exc:
        raise click.ClickException(cli_words(str(exc))) from None


@contextlib.contextmanager
def _engine_errors(engine: str):
    """Ray's own lines (a worker's death, say) never mix with our report or JSON; its errors are one line."""
    if engine != "ray":
        yield
        return
    from scaleout import ScaleOutError

    try:
        with stdout_to_stderr():
            yield
    except ScaleOutError as exc:
        raise click.ClickException(cli_words(str(exc))) from None


@contextlib.contextmanager
def stdout_to_stderr():
    """Everything written to stdout inside the block, by Python or by native code on file descriptor 1,
    goes to stderr instead: stdout keeps only what the command prints as its result."""
    sys.stdout.flush()
    saved_python = sys.stdout
    try:
        saved_fd = os.dup(1)
    except OSError:  # no descriptor 1 (a detached process): Python's stream is all there is
        saved_fd = None
    try:
        if saved_fd is not None:
            os.dup2(2, 1)
        sys.stdout = sys.stderr
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        sys.stdout = saved_python
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


# -- search ------------------------------------------------------------------------------
@cli.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--id", "ids", multiple=True, metavar="ID",
              help="Search with this stored image's vectors (it is left out of its own hits). Repeatable.")
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint written by `hiervec train`. [default: the one `hiervec ingest` recorded in the "
                   "collection]")
@store_options
@click.option("-k", "k", type=click.IntRange(1, MAX_TOPK), default=SEARCH.k, show_default=True, help="Hits per query.")
@click.option("--where", multiple=True, metavar="LEVEL=VALUE",
              help="Only this category at LEVEL (a path like clothing/tops, or a unique name). Repeatable.")
@click.option("--under", default=None, metavar="PATH", help="Only inside this subtree, e.g. clothing/tops.")
@click.option("--level", default=None, help="Search one level's vector instead of the image vector.")
@click.option("--fuse", type=click.Choice(FUSIONS), default=None,
              help="Search every level's vector at once and fuse the rankings: rrf (reciprocal rank fusion) or "
                   "weighted (normalised scores times --level-weights).")
@click.option("--level-weights", default=None, metavar="LEVEL=W,...",
              help="With --fuse weighted (implied): the levels searched and their weights, e.g. "
                   "category=1,item=2.")
@click.option("--group-by", default=None, metavar="LEVEL", help="At most --group-size hits per category of LEVEL.")
@click.option("--group-size", type=click.IntRange(min=1), default=SEARCH.group_size, show_default=True)
@click.option("--predicted", type=click.Choice(PREDICTED_CHOICES), default=SEARCH.predicted, show_default=True,
              help="Stored images whose category was predicted at ingest, not given.")
@click.option("--min-label-confidence", type=click.FloatRange(0, 1), default=None, metavar="P",
              help="Only stored images whose category (finest level) has at least this probability.")
@click.option("--auto", "auto", default=None, metavar="LEVEL",
              help="Predict each query's category and search only within it at LEVEL when confident enough.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=SEARCH.min_confidence, show_default=True,
              metavar="P",
              help="With --auto: the query's probability at LEVEL needed to route it.")
@click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a contact sheet PNG: each query, then its hits with category and distance.")
@runtime_option
@compute_options
@json_option
@uses_milvus
def search(images, ids, model_path, uri, collection, token, k, where, under, level, fuse, level_weights, group_by,
           group_size, predicted, min_label_confidence, auto, min_confidence, sheet, runtime, device, amp, as_json):
    """Find the images nearest to each IMAGE (or stored --id), optionally inside parts of the hierarchy."""
    from milvus_store import uri_path
    from hiervec_app import SearchRequest

    from .filters import parse_pairs, parse_weights
    from .output import contact_sheet, hit_dict, hits_table, route_line

    if not images and not ids:
        raise click.UsageError("give query IMAGES, or stored images with --id")
    for image in images:
        if not image.is_file():
            raise click.ClickException(f"query image {str(image)!r} does not exist")
    check_writable(sheet, "--sheet")
    request = SearchRequest(
        k=k, level=level, where=tuple(parse_pairs(where)), under=under, fusion=fuse,
        level_weights=parse_weights(level_weights), group_by=group_by, group_size=group_size, predicted=predicted,
        min_label_confidence=min_label_confidence, auto=auto, min_confidence=min_confidence,
    )
    queries: list[tuple[dict, str | None]] = []  # (how the output names the query, the picture the sheet shows)
    with open_index(model_path, uri, collection, token, device=device, amp=amp, runtime=runtime) as image_index:
        results = image_index.search(request, list(images)) if images else []
        queries += [({"image": str(image)}, str(image)) for image in images]
        if ids:
            results += image_index.search(replace(request, ids=tuple(ids)))
            # the sheet shows a stored query by its file (read only for a sheet)
            stored = {hit.id: hit.uri for hit in image_index.store.get(list(ids))} if sheet is not None else {}
            queries += [({"id": rid}, uri_path(stored.get(rid, "")) or stored.get(rid)) for rid in ids]
    names = [query.get("image") or f"id {query['id']}" for query, _ in queries]
    if sheet is not None:
        contact_sheet([(picture, result.hits) for (_, picture), result in zip(queries, results)], sheet)
        note(as_json, f"contact sheet: {sheet}")
    emit(as_json, {"request": request.describe(),
                   "queries": [query | {"hits": [hit_dict(h) for h in result.hits]}
                               | ({"routing": result.route.to_dict()} if result.route is not None else {})
                               for (query, _), result in zip(queries, results)]},
         "\n\n".join(hits_table(name, result.hits, route_line(result.route)) for name, result in zip(names, results)))


def open_index(model_path: Path | None, uri, collection: str, token, *, device: str = "auto", amp: bool = False,
               optimize: bool = False, runtime: str = "auto"):
    """The collection with its model: `model_path`, else the model the collection records (its
    fingerprint is checked either way); a missing collection or model is a clear error."""
    from milvus_store import CollectionNotFoundError, HierStore
    from hiervec_app import ImageIndex

    try:
        if model_path is None:
            with HierStore(uri, collection, token=token, create=False) as store:
                recorded, relative, found = store.model_location, store.model_relative, store.model_file()
            if recorded is None:
                raise click.UsageError(f"collection {collection!r} does not record the model that filled it "
                                       f"(ingested with an older hiervec, or through the library): pass --model")
            if found is None:
                elsewhere = (f", nor at {relative!r} under ${MODEL_ROOT_ENV}" if relative else "")
                raise click.ClickException(f"collection {collection!r} was filled by the model at {recorded!r}, "
                                           f"which is not on this machine{elsewhere}; pass --model with that "
                                           f"model (or a copy of it), or set ${MODEL_ROOT_ENV} to the folder "
                                           f"that holds your models")
            model_path = Path(found)
        embedder = load_embedder(model_path, optimize, device, amp, runtime)
        return ImageIndex.open(embedder, uri, collection, token=token, create=False)
    except CollectionNotFoundError as exc:
        raise click.ClickException(f"{exc}; run `hiervec ingest` first") from None


# -- eval --------------------------------------------------------------------------------
@cli.command("eval")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint written by `hiervec train`.")
@click.option("--baseline", type=click.Choice(["imagenet"]), default=None,
              help="Evaluate the untrained backbone instead of a checkpoint (its pooled ImageNet features): "
                   "the figure training must beat on this data.")
@click.option("--backbone", type=BackboneChoice(), default=DEFAULT_BACKBONE, show_default=True,
              help="With --baseline: which backbone (timm:NAME too).")
@click.option("--image-size", type=click.IntRange(min=32), default=None,
              help="With --baseline: input size in px. [default: as `hiervec train` reads it from the data]")
@click.option("--uri", default=None, metavar="URI",
              help="Evaluate in this Milvus, in a collection of its own that is dropped afterwards. "
                   "[default: $HIERVEC_MILVUS_URI, else a temporary Milvus Lite file]")
@click.option("--collection", default=None,
              help="Evaluate this collection: if it exists it must hold SOURCE's images and is only read; "
                   "if not, it is created and dropped afterwards (unless --keep). [default: a temporary one]")
@click.option("--keep", is_flag=True, help="Keep the collection eval creates (it needs --uri or $HIERVEC_MILVUS_URI).")
@click.option("--token", default=None, envvar="HIERVEC_MILVUS_TOKEN", show_envvar=True)
@click.option("-k", "k", type=click.IntRange(1, 1000), default=10, show_default=True)
@optimize_option
@runtime_option
@compute_options
@json_option
@uses_milvus
def eval_(source, model_path, baseline, backbone, image_size, uri, collection, keep, token, k, optimize, runtime,
          device, amp, as_json):
    """Leave-one-out retrieval over SOURCE through Milvus: R@1, R@K, MAP@R, consistency@K per level.

    Nothing already stored changes: SOURCE is ingested into a collection eval creates (in a
    temporary Lite file unless --uri is given) and drops at the end, or an existing
    --collection that holds it is read.

    \b
    Compare a trained model with the backbone it started from, on the same images:
      hiervec eval data/test --model model.pt
      hiervec eval data/test --baseline imagenet
    """
    import secrets
    import tempfile

    from embedder import read_source
    from hiervec_app import IngestItem
    from hiervec_app.jobs import stored_uri
    from milvus_store.connection import URI_ENV

    if (model_path is None) == (baseline is None):
        raise click.UsageError("give either --model or --baseline")
    uri = uri or os.environ.get(URI_ENV) or None
    if keep and uri is None:
        raise click.UsageError("--keep keeps the collection in the Milvus of --uri (or $HIERVEC_MILVUS_URI); "
                               "without one eval works in a temporary file")
    listing = read_source(source)
    items = [IngestItem(i.path, i.category, i.id, i.meta, stored_uri(i.path)) for i in listing.items if i.category]
    if not items:
        raise click.ClickException(f"no labelled images in {source}")
    if baseline is not None:
        embedder = baseline_embedder(items, backbone, image_size, quiet=as_json)
    else:
        embedder = load_embedder(model_path, optimize, device, amp, runtime)
    with tempfile.TemporaryDirectory(prefix="hiervec-eval-") as tmp:
        place = uri or str(Path(tmp) / "eval.db")
        name = collection or f"hiervec_eval_{secrets.token_hex(4)}"
        metrics = _evaluate(embedder, items, place, name, token, k, drop=not keep and uri is not None,
                            flat_index=uri is None, as_json=as_json)
    if keep:
        metrics["kept"] = name
    emit(as_json, metrics, render_metrics(metrics))


def _evaluate(embedder, items, uri: str, collection: str, token, k: int, *, drop: bool, flat_index: bool,
              as_json: bool) -> dict:
    """Leave-one-out over `items` in `collection`: read if it exists (it must hold them all), else created,
    filled and, with `drop`, dropped afterwards, whatever happens."""
    from milvus_store import CollectionNotFoundError
    from hiervec_app import ImageIndex

    from hiervec_app.evaluation import evaluate_collection

    started = time.perf_counter()
    try:
        image_index, created = ImageIndex.open(embedder, uri, collection, token=token, create=False), False
    except CollectionNotFoundError:
        image_index = ImageIndex.open(embedder, uri, collection, index="FLAT" if flat_index else None, token=token)
        created = True
    try:
        with image_index:
            if created:
                with progress_bar(len(items), "ingest", as_json, rate="img/s") as advance:
                    report = image_index.ingest(items, progress=advance)
                note(as_json, f"ingested {report.stored} images ({report.skipped_present} present, "
                              f"{len(report.failed)} failed) in {time.perf_counter() - started:.1f}s")
                query_ids = list(dict.fromkeys(report.ids))
            else:
                query_ids = _stored_ids_of(image_index.store, items, collection)
            with progress_bar(len(query_ids), "search", as_json, rate="queries/s") as advance:
                metrics = evaluate_collection(image_index.store, query_ids, k, progress=advance)
            if created and drop:
                image_index.store.drop()
    except BaseException:
        if created and drop:
            with contextlib.suppress(Exception), _open_store(uri, collection, token) as leftover:
                leftover.drop()
        raise
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    return metrics


def _stored_ids_of(store, items, collection: str) -> list[str]:
    """The ids of `items` (given, else their content hash), all of which `store` must hold: eval reads an
    existing collection and never writes to it."""
    from hiervec_app.ingest import read_item

    ids = []
    for item in items:
        read = read_item(item, can_predict=False)
        if not isinstance(read, tuple):
            raise click.ClickException(f"{read.source}: {read.reason}")
        ids.append(read[1])
    ids = list(dict.fromkeys(ids))
    present = store.existing_ids(ids)
    missing = [i for i in ids if i not in present]
    if missing:
        raise click.ClickException(f"collection {collection!r} exists but lacks {len(missing)} of SOURCE's "
                                   f"{len(ids)} images (e.g. id {missing[0]!r}); eval only reads a collection it "
                                   f"did not create: leave out --collection to evaluate in one of its own")
    return ids


def render_metrics(metrics: dict) -> str:
    """The text form of `hiervec eval`'s figures, one per line."""
    lines = [f"{'queries':<32} {metrics['queries']}"]
    if metrics.get("left_out"):
        lines.append(f"{'left out (no other image of their class)':<32} {metrics['left_out']}")
    lines.append(f"{'collection':<32} {metrics['collection']}")
    lines += [f"{'recall@' + str(entry['k']):<32} {entry['recall']:.4f}" for entry in metrics["recall@k"]]
    lines.append(f"{'map@r':<32} {metrics['map@r']:.4f}" if metrics["map@r"] is not None
                 else f"{'map@r':<32} - ({metrics['map@r_reason']})")
    lines += [f"{'consistency@' + str(metrics['k']) + '/' + level:<32} {value:.4f}"
              for level, value in metrics["consistency@k"].items()]
    lines.append(f"{'hier_distance@' + str(metrics['k']):<32} {metrics['hier_distance@k']:.4f}")
    lines.append(f"{'seconds':<32} {metrics['seconds']}")
    if metrics.get("kept"):
        lines.append(f"{'kept collection':<32} {metrics['kept']}")
    return "\n".join(lines)


def baseline_embedder(items, backbone: str, image_size: int | None, *, quiet: bool):
    """The untrained backbone over the levels of `items`' category paths (named as `hiervec train` names them)."""
    from embedder import Hierarchy
    from embedder.baseline import BackboneEmbedder
    from embedder.data import default_image_size

    hierarchy = Hierarchy.from_paths([item.category for item in items])
    if image_size is None:
        image_size, why = default_image_size([item.source for item in items], bounds=IMAGE_SIZE_RANGE)
        note(quiet, f"image size {image_size} px: {why} (--image-size to choose)")
    return BackboneEmbedder(level_names=hierarchy.level_names, image_size=image_size, backbone=backbone)


# -- info and delete ---------------------------------------------------------------------
def _open_store(uri, collection, token):
    from milvus_store import HierStore

    return HierStore(uri, collection, token=token, create=False)


@cli.command()
@store_options
@json_option
@uses_milvus
def info(uri, collection, token, as_json):
    """What the collection holds: count, levels, categories, model fingerprint, index."""
    with _open_store(uri, collection, token) as store:
        spec = store.spec
        per_level = {level: dict(sorted(counts.items())) for level, counts in store.category_counts().items()}
        aliases = store.aliases()
        data = {"uri": store.settings.display_uri, "collection": store.target, "count": store.count(),
                "alias": collection if store.target != collection else None, "aliases": aliases,
                "levels": list(spec.level_names), "dim": spec.dim, "level_dims": list(spec.level_dims),
                "metric": spec.metric, "index": spec.index, "level_vectors": list(spec.kept_vector_levels),
                "partition_key": spec.partition_key or None, "num_partitions": spec.num_partitions,
                "fingerprint": store.fingerprint,
                "model": {"path": store.model_location, "relative": store.model_relative,
                          "found": store.model_file()} if store.model_location else None,
                "categories": per_level}
    lines = [f"{key:<14} {data[key]}" for key in ("uri", "collection", "alias", "aliases", "count", "levels", "dim",
                                                    "level_dims", "metric", "index", "level_vectors", "partition_key",
                                                    "num_partitions", "fingerprint")]
    model = data["model"]
    lines.append(f"{'model':<14} " + ("none recorded" if model is None else model["path"]
                                      + (f" (under $HIERVEC_MODEL_ROOT: {model['relative']})" if model["relative"] else "")
                                      + ("" if model["found"] else ", not on this machine")))
    for level, counts in per_level.items():
        lines.append(f"{level}:")
        lines += [f"  {count:>8}  {path}" for path, count in counts.items()]
    emit(as_json, data, "\n".join(lines))


@cli.command()
@click.argument("ids", nargs=-1)
@store_options
@click.option("--where", multiple=True, metavar="LEVEL=VALUE", help="Delete this category at LEVEL. Repeatable.")
@click.option("--under", default=None, metavar="PATH", help="Delete this whole subtree.")
@json_option
@uses_milvus
def delete(ids, uri, collection, token, where, under, as_json):
    """Delete images by id, or every image matching --where / --under."""
    from .filters import build_filter

    if bool(ids) == bool(where or under):
        raise click.UsageError("give either IDS or --where/--under")
    with _open_store(uri, collection, token) as store:
        if ids:
            deleted = store.delete(list(ids))
        else:
            known = {level: set(counts) for level, counts in store.category_counts().items()}
            deleted = store.delete(where=build_filter(where, under, known))
        remaining = store.count()
    emit(as_json, {"deleted": deleted, "count": remaining}, f"deleted {deleted}; {remaining} remain")


@cli.command()
@click.option("--from", "source", required=True, metavar="PATH", help="The category to move, e.g. clothing/tops.")
@click.option("--to", "target", required=True, metavar="PATH",
              help="Its new path, as many levels deep, e.g. clothing/upper-body.")
@click.option("--merge", is_flag=True, help="Allow a new path that already holds images: the two become one.")
@store_options
@json_option
@uses_milvus
def move(source, target, merge, uri, collection, token, as_json):
    """Move or rename a category in place: every image under --from takes the path --to, at that level
    and every level below it (and above it for a new parent). Nothing is embedded again; an interrupted
    move is completed by running it again."""
    from milvus_store import move_category

    with _open_store(uri, collection, token) as store:
        with progress_bar(store.count(), "moving", as_json, rate="img/s") as advance:
            report = move_category(store, source, target, merge=merge, progress=advance)
    text = (f"moved {report.moved} images from {source!r} to {target!r} (level {report.level!r}"
            + (f"; merged with {report.already_there} already there" if merge and report.already_there else "")
            + ("; completed an interrupted move" if report.resumed else "") + f"); {report.count} in the collection")
    emit(as_json, report.to_dict(), text)


# -- aliases ------------------------------------------------------------------------------
@cli.group()
def alias():
    """Aliases: the address of a catalogue. Searches, ingests, deletes and `hiervec serve` take an
    alias wherever they take a collection; `alias set` moves it to another collection in one step
    (a new model's collection, built beside the live one by `hiervec reindex`), and back for a rollback."""


def alias_options(func):
    for option in reversed((
        click.option("--uri", default=None, metavar="URI",
                     help="Milvus Lite file (*.db) or http(s)://host:port. [default: $HIERVEC_MILVUS_URI, else ./hiervec.db]"),
        click.option("--token", default=None, envvar="HIERVEC_MILVUS_TOKEN", show_envvar=True,
                     help="Token for a Milvus server (user:password or an API key)."),
        json_option,
    )):
        func = option(func)
    return uses_milvus(func)


@alias.command("set")
@click.argument("name")
@click.argument("collection")
@alias_options
def alias_set(name, collection, uri, token, as_json):
    """Point alias NAME at COLLECTION (created, or moved in one step); the collection it left is kept."""
    from milvus_store import Aliases

    with Aliases(uri, token=token) as aliases:
        change = aliases.set(name, collection)
    text = (f"alias {name!r} -> {collection!r} (was {change.previous!r}; kept)" if change.previous not in (None, collection)
            else f"alias {name!r} -> {collection!r}" + (" (unchanged)" if change.previous else " (new)"))
    emit(as_json, change.to_dict(), text)


@alias.command("show")
@click.argument("name")
@alias_options
def alias_show(name, uri, token, as_json):
    """The collection alias NAME points at, with its count and model fingerprint."""
    from milvus_store import Aliases, HierStore

    with Aliases(uri, token=token) as aliases:
        collection = aliases.get(name)
    if collection is None:
        raise click.ClickException(f"no alias {name!r} at {uri or 'the default store'}")
    with HierStore(uri, collection, token=token, create=False) as store:
        data = {"alias": name, "collection": collection, "count": store.count(), "fingerprint": store.fingerprint,
                "model": store.model_location}
    emit(as_json, data, "\n".join(f"{key:<12} {value}" for key, value in data.items()))


@alias.command("list")
@alias_options
def alias_list(uri, token, as_json):
    """Every alias and the collection it points at."""
    from milvus_store import Aliases

    with Aliases(uri, token=token) as aliases:
        found = aliases.all()
    emit(as_json, found, "\n".join(f"{name} -> {collection}" for name, collection in found.items()) or "no aliases")


@alias.command("remove")
@click.argument("name")
@alias_options
def alias_remove(name, uri, token, as_json):
    """Drop alias NAME (its collection stays)."""
    from milvus_store import Aliases

    with Aliases(uri, token=token) as aliases:
        collection = aliases.remove(name)
    emit(as_json, {"alias": name, "collection": collection}, f"alias {name!r} removed ({collection!r} stays)")


# -- copy --------------------------------------------------------------------------------
@cli.command()
@click.option("--from", "from_uri", required=True, metavar="URI",
              help="Where the collection is: a Milvus Lite file (*.db) or http(s)://host:port.")
@click.option("--to", "to_uri", required=True, metavar="URI", help="Where to copy it: a *.db file or a server.")
@click.option("--collection", default=DEFAULT_COLLECTION, show_default=True, help="The collection to copy.")
@click.option("--to-collection", default=None, help="Its name at the target. [default: the same]")
@click.option("--from-token", default=None, envvar="HIERVEC_MILVUS_TOKEN", show_envvar=True,
              help="Token for the source server (user:password or an API key).")
@click.option("--to-token", default=None, envvar="HIERVEC_TARGET_TOKEN", show_envvar=True,
              help="Token for the target server.")
@click.option("--index", type=click.Choice(SERVER_INDEXES), default=None,
              help="Vector index of the new collection. [default: the source's]")
@click.option("--level-vectors", default=None, metavar="all|none|LEVEL,...",
              help="Which levels keep a vector field of their own at the target (see `ingest`); a level the "
                   "source kept none for is read back from the image vector. [default: as the source]")
@click.option("--partition-key", default=None, metavar="LEVEL|none",
              help="The target's partition key. [default: the coarsest level on a server, none on Milvus Lite]")
@click.option("--num-partitions", type=click.IntRange(1, 1024), default=None,
              help="Partitions of the partition key. [default: 16]")
@click.option("--batch-size", type=click.IntRange(1, 16384), default=1000, show_default=True,
              help="Rows read and written together.")
@json_option
@uses_milvus
def copy(from_uri, to_uri, collection, to_collection, from_token, to_token, index, level_vectors, partition_key,
         num_partitions, batch_size, as_json):
    """Copy a collection to another Milvus: from Milvus Lite to a server or cluster, or back.

    Every row is copied with its ids, categories, vectors and meta; the model fingerprint
    and location go with it. Ids already at the target are skipped, so an interrupted copy
    resumes when run again; the counts are checked at the end.
    """
    from milvus_store import copy_collection, open_copy_target

    with _open_store(from_uri, collection, from_token) as source:
        spec = source.spec
        layout = collection_layout(spec.level_names, bool(spec.level_dims), level_vectors, partition_key)
        with open_copy_target(source, to_uri, to_collection or collection, token=to_token, index=index,
                              num_partitions=num_partitions, **layout) as target:
            total = source.count()
            with progress_bar(total, "copy", as_json, rate="rows/s") as advance:
                report = copy_collection(source, target, batch_size=batch_size, progress=advance)
            result = report.to_dict() | {"from": source.settings.display_uri, "to": target.settings.display_uri,
                                         "collection": target.collection, "index": target.spec.index,
                                         "level_vectors": list(target.spec.kept_vector_levels),
                                         "partition_key": target.spec.partition_key or None}
    emit(as_json, result, f"copied {report.copied} rows, skipped {report.skipped} already there; "
         f"{result['to']} collection {result['collection']!r} holds {report.target_count} "
         f"(the source {report.source_count}; {report.rows_per_s} rows/s)")


# -- relabel -----------------------------------------------------------------------------
@cli.command()
@model_option
@store_options
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="P",
              help="Write a new prediction only when its finest level has at least this probability.")
@compute_options
@json_option
@uses_milvus
def relabel(model_path, uri, collection, token, min_confidence, device, amp, as_json):
    """Predict the stored predicted categories again with an updated MODEL, from the stored vectors.

    Works when MODEL makes the same vectors as the model that filled the collection (its
    heads retrained or recalibrated: the fingerprints match); otherwise the images must
    be embedded again, into a new collection. Given categories are never changed.
    """
    from milvus_store import Predicted, SchemaMismatchError
    from hiervec_app import ImageIndex

    embedder = load_embedder(model_path, device=device, amp=amp)
    try:
        image_index = ImageIndex.open(embedder, uri, collection, token=token, create=False)
    except SchemaMismatchError as exc:
        if exc.field != "model fingerprint":
            raise
        raise click.ClickException(
            f"{model_path} makes other vectors than the model that filled {collection!r} (fingerprint "
            f"{exc.expected} vs {exc.actual}), so its predictions cannot be computed from the stored vectors: "
            f"ingest the images again with it, into a new collection (--collection)") from None
    with image_index:
        with progress_bar(image_index.store.count(Predicted(True)), "relabel", as_json, rate="records/s") as advance:
            report = image_index.relabel(min_confidence=min_confidence, progress=advance)
    emit(as_json, report.to_dict() | {"collection": collection},
         f"examined {report.examined} predicted categories: {report.changed} changed, {report.confirmed} "
         f"confirmed, {report.kept} kept (new prediction below {min_confidence})")


# -- export ------------------------------------------------------------------------------
@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="onnx (ONNX Runtime, or any ONNX runtime) or openvino (OpenVINO IR, float32).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@json_option
def export(model_path, fmt, out, as_json):
    """Write MODEL's vector part (image and level vectors) for a CPU inference runtime.

    OUT gets the graph (model.onnx, or model.xml + model.bin) and hiervec-export.json: the
    input contract (preprocessing), the outputs, the model's fingerprints and its
    hierarchy. Vectors agree with the checkpoint's within 1e-4, so collections it filled
    serve both. `--runtime` on ingest, search, eval and serve uses the same export, made
    on the fly.
    """
    from embedder import PyramidEmbedder, load_checkpoint
    from embedder.checkpoint import restore_weights
    from embedder.runtimes import export as export_model
    from embedder.runtimes import write_manifest

    checkpoint = load_checkpoint(model_path)
    model = PyramidEmbedder(checkpoint.config)
    restore_weights(model, checkpoint, model_path)
    started = time.perf_counter()
    graph = export_model(model, out, fmt)
    manifest = write_manifest(out, fmt, model, checkpoint.hierarchy, checkpoint.fingerprint,
                              checkpoint.vector_fingerprint)
    emit(as_json, {"format": fmt, "graph": str(graph), "manifest": str(manifest),
                   "fingerprint": checkpoint.vector_fingerprint, "seconds": round(time.perf_counter() - started, 1)},
         f"wrote {graph} and {manifest} (fingerprint {checkpoint.vector_fingerprint})")


# -- serve -------------------------------------------------------------------------------
@cli.command()
@model_option
@store_options
@click.option("--host", default=SERVER.host, show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=SERVER.port, show_default=True)
@click.option("--workers", type=click.IntRange(1, 256), default=SERVER.workers, show_default=True,
              help="Server processes; more than one needs a Milvus server (a Lite file is locked by one process).")
@click.option("--api-key", default=None, envvar="HIERVEC_API_KEY", show_envvar=True,
              help="When set, writes (POST /images, DELETE) and catalogue administration need it: the X-API-Key header, or Authorization: Bearer KEY.")
@click.option("--allow-anonymous-writes", is_flag=True,
              help="Serve on a non-loopback address without --api-key: anyone who reaches it can add and "
                   "delete images.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=SERVICE.max_upload_bytes / MB,
              show_default=True)
@click.option("--media", "media_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(SERVICE.media_dir), show_default=True,
              help="Where images uploaded through POST /images are kept.")
@click.option("--image-root", "image_roots", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Serve stored images whose files lie under this folder (repeatable). [default: the current folder]")
@click.option("--batch-window-ms", type=click.FloatRange(min=0), default=SERVICE.batch_window_ms, show_default=True,
              help="How long a query may wait for others to share its forward pass and search call "
                   "(0: only queries that arrived while the previous batch ran share it).")
@click.option("--max-batch", type=click.IntRange(min=1), default=SERVICE.max_batch, show_default=True)
@click.option("--max-megapixels", type=click.FloatRange(min=0, min_open=True),
              default=SERVICE.max_pixels / MEGAPIXEL, show_default=True,
              help="Largest uploaded image decoded, from its header (Pillow's own bomb limit is 89).")
@click.option("--max-requests", type=click.IntRange(min=1), default=SERVICE.max_requests, show_default=True,
              help="Requests in progress at once; more are answered 503. With the other limits it bounds the "
                   "memory held for requests (GET /stats: memory_budget_bytes).")
@click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=SERVER.header_timeout_s,
              show_default=True,
              help="Seconds a connection has to send a request's headers; slower ones are closed (they hold "
                   "no request slot meanwhile).")
@click.option("--max-connections-per-client", type=click.IntRange(min=1), default=SERVER.max_connections_per_client,
              show_default=True,
              help="Open connections one client address may hold; more are answered 503 and closed.")
@click.option("--lite-process/--lite-in-process", default=SERVICE.lite_process, show_default=True,
              help="With a Milvus Lite file: serve it from a process of its own (Lite's search and write "
                   "handling is Python and would share the interpreter lock with the service's), which also lets "
                   "--workers share the file.")
@click.option("--store-timeout", type=click.FloatRange(min=0, min_open=True), default=SERVICE.store_timeout_s,
              show_default=True,
              help="Seconds every call to Milvus may take; a store that does not answer within them is a 503 "
                   "(store_unavailable) with Retry-After, not a request held for ever.")
@optimize_option
@runtime_option
@compute_options
@uses_milvus
def serve(model_path, uri, collection, token, host, port, workers, api_key, allow_anonymous_writes, max_upload_mb,
          media_dir, image_roots, batch_window_ms, max_batch, max_megapixels, max_requests, header_timeout,
          max_connections_per_client, lite_process, store_timeout, optimize, runtime, device, amp):
    """Serve the HTTP API and the search page (http://HOST:PORT/, schema at /docs)."""
    from milvus_store import ConnectionSettings
    from service import ServerSettings, ServiceSettings, run_server

    settings = ServiceSettings(
        model=str(model_path), uri=uri, collection=collection, token=token, api_key=api_key,
        max_upload_bytes=int(max_upload_mb * MB), max_batch=max_batch, batch_window_ms=batch_window_ms,
        media_dir=str(media_dir), image_roots=tuple(str(r) for r in image_roots), optimize=optimize,
        device=device, amp=amp, runtime=runtime, threads=click.get_current_context().params["threads"],
        max_pixels=int(max_megapixels * MEGAPIXEL), max_requests=max_requests, lite_process=lite_process,
        store_timeout_s=store_timeout,
    )
    server = ServerSettings(host=host, port=port, workers=workers, header_timeout_s=header_timeout,
                            max_connections_per_client=max_connections_per_client)
    if not api_key and not server.loopback and not allow_anonymous_writes:
        raise click.UsageError(f"--host {host} is reachable from other machines and no --api-key (or "
                               f"HIERVEC_API_KEY) is set, so anyone could add and delete images; set a key, "
                               f"or pass --allow-anonymous-writes to serve openly")
    if workers > 1 and ConnectionSettings.resolve(uri).is_local and not lite_process:
        raise click.UsageError("--workers above 1 with a Milvus Lite file needs --lite-process: the file is locked by "
                               "the one process that opens it")
    run_server(settings, server, log=lambda line: click.echo(line, err=True))


def main() -> None:
    # gRPC's C core reports keepalive pings on long Milvus Lite sessions; errors reach
    # the user from us, once.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    cli(prog_name="hiervec")


if __name__ == "__main__":
    main()
