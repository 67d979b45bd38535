"""Training from the listing: files decoded batch by batch (in loader workers or not), never all at once."""

import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import embedder.training as training
from embedder import TrainConfig, load_checkpoint, train
from embedder.errors import DataError
from embedder.streaming import BalancedBatchSampler, ImageFiles, default_workers, training_loader

from .test_training import PATHS, tiny_config, tiny_data

pytestmark = pytest.mark.unit

TC = TrainConfig(epochs=2, steps_per_epoch=3, classes_per_batch=2, per_class=2, val_fraction=0.34, log_every=1,
                 patience=None)


def write_files(images, folder):
    folder.mkdir(exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


def last_weights(checkpoint):
    """The weights training ended at: the file's own, or those kept to resume when the file holds a better epoch."""
    return checkpoint.train_state.get("resume_weights") or checkpoint.state_dict


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_listing_trains_exactly_as_its_decoded_images_do(tmp_path):
    images, labels, hierarchy = tiny_data()
    files = ImageFiles(write_files(images, tmp_path / "files"), 32)
    assert files.shape == tuple(images.shape) and torch.equal(files[3], images[3])
    config = tiny_config(hierarchy)
    in_memory = train(images, labels, hierarchy, config, TC, out=tmp_path / "a.pt")
    streamed = train(files, labels, hierarchy, config, TC, out=tmp_path / "b.pt")
    assert streamed.failures == []
    assert same_weights(in_memory.checkpoint.state_dict, streamed.checkpoint.state_dict)  # augmentations included
    assert [h.get("loss") for h in in_memory.history] == [h.get("loss") for h in streamed.history]


def test_loader_workers_give_the_same_batches_and_reproducible_weights(tmp_path):
    images, labels, hierarchy = tiny_data()
    files = ImageFiles(write_files(images, tmp_path / "files"), 32)
    leaf = labels[:, -1]
    drawn = {}
    for workers in (0, 2):
        sampler = BalancedBatchSampler(leaf, 2, 2, 4, np.random.default_rng(5))
        drawn[workers] = [(idx, batch.images) for idx, batch in training_loader(files, sampler, None, workers=workers)]
    assert [idx for idx, _ in drawn[0]] == [idx for idx, _ in drawn[2]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(drawn[0], drawn[2]))
    assert all(len(set(leaf[idx])) == 2 and len(idx) == 4 for idx, _ in drawn[0])  # classes x images per class

    config = tiny_config(hierarchy)
    first = train(files, labels, hierarchy, config, TC, out=tmp_path / "a.pt", workers=2).checkpoint
    again = train(files, labels, hierarchy, config, TC, out=tmp_path / "b.pt", workers=2).checkpoint
    assert same_weights(first.state_dict, again.state_dict)


def test_a_process_holding_grpc_starts_its_workers_from_a_fork_server_with_the_same_batches(tmp_path, monkeypatch):
    import grpc  # a Milvus client's transport: fork without exec is unsupported once it runs

    from embedder.streaming import worker_start_method

    images, labels, _ = tiny_data()
    files = ImageFiles(write_files(images, tmp_path / "files"), 32)
    assert worker_start_method() == "forkserver" and grpc is not None
    drawn = [[(idx, batch.images) for idx, batch in training_loader(
        files, BalancedBatchSampler(labels[:, -1], 2, 2, 3, np.random.default_rng(5)), None, workers=workers)]
        for workers in (0, 1)]
    assert [idx for idx, _ in drawn[0]] == [idx for idx, _ in drawn[1]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*drawn))
    # the fork server imported torchvision once: its workers (which unpickle torchvision's augmentations)
    # start with it, instead of importing it again each, every epoch (2.4 s a worker here)
    import multiprocessing
    import runpy

    probe, seen = tmp_path / "probe.py", tmp_path / "seen.txt"
    probe.write_text("import sys\n"
                     "open(SEEN, 'w').write(' '.join(m for m in ('torch', 'torchvision') if m in sys.modules))")
    worker = multiprocessing.get_context("forkserver").Process(target=runpy.run_path,
                                                               args=(str(probe), {"SEEN": str(seen)}))
    worker.start()
    worker.join(timeout=120)
    assert worker.exitcode == 0 and seen.read_text() == "torch torchvision"
    monkeypatch.delitem(__import__("sys").modules, "grpc")
    assert worker_start_method() is None  # no gRPC: the platform's default (fork on Linux)


def test_a_broken_file_is_reported_and_replaced_by_a_classmate_without_stopping_the_epoch(tmp_path, monkeypatch):
    images, labels, hierarchy = tiny_data()
    paths = write_files(images, tmp_path / "files")
    broken = paths[1]  # a shirt (the first leaf)
    broken.write_bytes(b"\x89PNG but truncated")
    sizes = []
    original = training.HierarchicalLoss.forward

    def recording(self, output, batch_labels):
        sizes.append(len(batch_labels))
        return original(self, output, batch_labels)

    monkeypatch.setattr(training.HierarchicalLoss, "forward", recording)
    tc = replace(TC, epochs=1, steps_per_epoch=20, val_fraction=0.0)
    result = train(ImageFiles(paths, 32), labels, hierarchy, tiny_config(hierarchy), tc, out=tmp_path / "m.pt")
    assert result.failures and {f.source for f in result.failures} == {str(broken)}
    assert "cannot decode" in result.failures[0].reason or "not a recognised" in result.failures[0].reason
    assert sizes == [4] * 20  # every step trained on a whole batch
    assert load_checkpoint(tmp_path / "m.pt").epoch == 1


def test_a_class_whose_every_image_fails_stops_training_with_the_files_named(tmp_path):
    images, labels, hierarchy = tiny_data(n_per_class=2)
    paths = write_files(images, tmp_path / "files")
    for path in paths[:2]:  # both shirts
        path.write_bytes(b"")
    tc = replace(TC, epochs=1, steps_per_epoch=30, val_fraction=0.0, classes_per_batch=1)
    with pytest.raises(DataError, match=r"every image of a batch failed to decode: .*0000\.png"):
        train(ImageFiles(paths, 32), labels, hierarchy, tiny_config(hierarchy), tc, out=tmp_path / "m.pt")


class CountingFiles(ImageFiles):
    """Counts the decoded images alive at once: a memory cap for the test, without a platform-specific rlimit."""

    def __init__(self, paths, size, counter):
        super().__init__(paths, size)
        self.counter = counter

    def __getitem__(self, index):
        found = super().__getitem__(index)
        if isinstance(found, ImageFiles):
            return CountingFiles(found.paths, found.size, self.counter)
        self.counter["alive"] += 1
        self.counter["peak"] = max(self.counter["peak"], self.counter["alive"])
        weakref.finalize(found, _release, self.counter)
        return found


def _release(counter):
    counter["alive"] -= 1


def test_training_holds_a_few_batches_of_decoded_images_not_the_listing(tmp_path, monkeypatch):
    """A listing 30 times the batch: at no time are more than a batch's decoded images alive, and
    validation embeds a bounded sample (val_max) of the held-out images."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "files"
    folder.mkdir()
    paths, rows = [], []
    for i in range(120):
        path = folder / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
        rows.append(PATHS[i % len(PATHS)])
    _, _, hierarchy = tiny_data()
    labels = hierarchy.encode_many(rows)

    counter = {"alive": 0, "peak": 0}
    validated = []
    original = training.evaluate

    def evaluate(model, images, labels, batch_size=128):
        validated.append(len(images))
        return original(model, images, labels, batch_size)

    monkeypatch.setattr(training, "evaluate", evaluate)
    tc = replace(TC, epochs=1, steps_per_epoch=30, val_fraction=0.2, val_max=10)
    train(CountingFiles(paths, 32, counter), labels, hierarchy, tiny_config(hierarchy), tc, out=tmp_path / "m.pt")
    assert counter["alive"] == 0
    assert counter["peak"] <= tc.batch_size  # 120 images listed, 4 a step: never more than a batch decoded
    assert validated == [10, 10]  # epoch 0 and epoch 1, on the bounded sample (24 held out)


def test_default_workers_share_the_cores_among_a_machines_processes(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)))
    assert default_workers() == 8 and default_workers(4) == 3 and default_workers(16) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1})
    assert default_workers() == 1 and default_workers(2) == 1
    assert default_workers(device_type="cuda") == 1 and default_workers(1, "cpu") == 0  # the step has the CPUs


def test_augmentation_seeds_the_cpu_generator_alone_and_leaves_the_global_stream_as_it_was(monkeypatch):
    """Each sample's augmentation has its own CPU stream; no accelerator generator is reseeded (on a GPU
    torch.manual_seed reseeded CUDA for every sample; before CUDA starts, it formatted the stack each time)."""
    reseeded = []
    for backend in (torch.cuda, torch.xpu):
        monkeypatch.setattr(backend, "manual_seed_all", reseeded.append)
    images = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    labels = np.repeat(np.arange(4), 2)

    def epoch():
        sampler = BalancedBatchSampler(labels, 2, 2, steps=2, rng=np.random.default_rng(0), seed=3)
        return [batch.images for _, batch in training_loader(images, sampler, lambda x: x + torch.rand(x.shape))]

    torch.manual_seed(0)
    reseeded.clear()  # what seeding this test's own global stream queued
    before = torch.get_rng_state()
    first, again = epoch(), epoch()
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is as it was
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # each sample's stream follows from its seed
    assert not torch.equal(first[0][0], first[0][1])  # ... and differs between samples
    assert reseeded == []


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_stopped_mid_epoch_resumes_at_its_step_and_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch,
                                                                                              workers):
    images, labels, hierarchy = tiny_data()
    files = ImageFiles(write_files(images, tmp_path / "files"), 32)
    config = tiny_config(hierarchy)
    tc = replace(TC, epochs=2, steps_per_epoch=5, checkpoint_every=2)
    whole = train(files, labels, hierarchy, config, tc, out=tmp_path / "whole.pt", workers=workers).checkpoint

    out = tmp_path / "killed.pt"
    original, calls = training.HierarchicalLoss.forward, []

    def dies_at_step_8(self, *args):
        calls.append(1)
        if len(calls) == 8:  # epoch 2, step 3: after the checkpoint of its step 2
            raise KeyboardInterrupt("killed")
        return original(self, *args)

    monkeypatch.setattr(training.HierarchicalLoss, "forward", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(files, labels, hierarchy, config, tc, out=out, workers=workers)
    monkeypatch.setattr(training.HierarchicalLoss, "forward", original)
    stopped = load_checkpoint(out)
    assert stopped.epoch == 1 and stopped.train_state["step"] == 2

    lines = []
    resumed = train(files, labels, hierarchy, config, tc, out=out, workers=workers, resume=True, log=lines.append)
    assert lines[0] == f"resuming {out} after epoch 1, step 2"
    assert "resuming epoch 2 at step 3/5" in lines
    assert not any(line.startswith("epoch 2/2 step 2/5") for line in lines)  # done before the stop, not again
    final = resumed.checkpoint
    assert final.epoch == 2 and [h["epoch"] for h in final.history] == [0, 1, 2]
    assert same_weights(final.state_dict, whole.state_dict)  # the best epoch's
    assert same_weights(last_weights(final), last_weights(whole))  # and where training ended
    assert not same_weights(last_weights(final), last_weights(stopped))
    assert final.history[-1]["loss"] == pytest.approx(whole.history[-1]["loss"], rel=1e-6)
