"""The pieces that make N processes train as one: the rank-split sampler, the global-batch loss, a lost peer.

The loss and lost-peer tests run two real gloo ranks on loopback (torch.multiprocessing), a few seconds each.
"""

import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embedder import ContrastiveLoss, DistributedError, distributed
from embedder.data import balanced_batches
from embedder.distributed import (DEFAULT_TIMEOUT_S, DistributedContext, GlobalBatchLoss, check_same_on_every_rank,
                                  process_group)
from embedder.errors import DataError
from embedder.training import TrainConfig, _peer_failures

from ..servers import free_port

pytestmark = pytest.mark.unit

# Four points on a line, two leaf classes (rank 0 holds class 0, rank 1 class 1), margin 4.
# Positive pairs: d(0,1) = 1 and d(2,3) = 2.5: mean of squares (1 + 6.25) / 2 = 3.625.
# Negative pairs inside the margin: d(0,2) = 3 and d(1,2) = 2: mean of (4 - d)^2 = (1 + 4) / 2 = 2.5
# (d(0,3) = 5.5 and d(1,3) = 4.5 are outside it). Loss 6.125.
# d loss / d y = [0, 3, -5.5, 2.5]: y0: -1 (pair 0-1) + 1 (pair 0-2); y1: 1 + 2; y2: -2.5 - 1 - 2; y3: 2.5.
POINTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 5.5]])
LABELS = torch.tensor([0, 0, 1, 1])
LOSS = 6.125
GRAD_Y = torch.tensor([0.0, 3.0, -5.5, 2.5])


def _join(rank: int, world_size: int, port: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def _loss_on_rank(rank: int, world_size: int, port: int, results) -> None:
    _join(rank, world_size, port)
    try:
        mine = slice(2 * rank, 2 * rank + 2)
        local = POINTS[mine].clone().requires_grad_(True)
        value = GlobalBatchLoss(ContrastiveLoss(margin=4.0))(local, LABELS[mine])
        value.backward()
        # plain lists, not tensors: a tensor crosses the queue as a shared-memory handle, which is
        # gone when this process exits before the parent has read it (seen on a loaded machine)
        results.put((rank, float(value.detach()), local.grad.tolist()))
    finally:
        dist.destroy_process_group()


def _disagreeing_rank(rank: int, world_size: int, port: int, results) -> None:
    _join(rank, world_size, port)
    try:
        check_same_on_every_rank("the training data", [100 + rank], torch.device("cpu"))
        results.put((rank, "agreed"))
    except DistributedError as exc:
        results.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


def _silent_at_the_epochs_end(rank: int, world_size: int, port: int, results, started, reported) -> None:
    """Rank 1 stays alive but never reaches the barrier after the epoch's checkpoint (as a stopped process)."""
    started.wait(timeout=120)  # both have imported torch: the short timeout below is only the barrier's to miss
    _join(rank, world_size, port, timeout_s=2)
    try:
        if rank == 1:
            reported.wait(timeout=120)  # alive and silent until rank 0 has given up on it
            results.put((rank, "silent"))
            return
        try:
            with _peer_failures(distributed.current(), epoch=2):
                distributed.barrier()
            results.put((rank, "passed the barrier"))
        except DistributedError as exc:
            results.put((rank, str(exc)))
        reported.set()
    finally:
        dist.destroy_process_group()


def run_ranks(target, world_size: int = 2, *, sync: bool = False) -> list:
    """`target(rank, world_size, port, results)` on each rank; with `sync`, also a barrier and an event they share."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    shared = (context.Barrier(world_size), context.Event()) if sync else ()
    processes = [context.Process(target=target, args=(rank, world_size, port, results, *shared))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    try:
        found = sorted(results.get(timeout=120) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert [p.exitcode for p in processes] == [0] * world_size
    return found


def test_contrastive_loss_on_one_process_matches_the_hand_computed_values():
    points = POINTS.clone().requires_grad_(True)
    value = ContrastiveLoss(margin=4.0)(points, LABELS)
    value.backward()
    assert float(value.detach()) == pytest.approx(LOSS)
    assert torch.allclose(points.grad[:, 1], GRAD_Y, atol=1e-6) and not points.grad[:, 0].any()


def test_global_batch_loss_on_two_ranks_is_the_loss_on_the_union():
    found = run_ranks(_loss_on_rank)
    for rank, value, grad in found:
        grad = torch.tensor(grad)
        # the whole batch's loss on every rank, as one process would log it
        assert value == pytest.approx(LOSS)
        # each rank's gradient is world_size x its rows of the union's gradient, so DDP's
        # average over ranks is exactly the one-process gradient
        assert torch.allclose(grad[:, 1], 2 * GRAD_Y[2 * rank: 2 * rank + 2], atol=1e-6)
        assert not grad[:, 0].any()


def test_ranks_that_read_different_data_fail_with_a_clear_error():
    found = run_ranks(_disagreeing_rank)
    for _, message in found:
        assert message.startswith("the processes disagree on the training data (rank 0: [100], rank 1: [101])")


def test_a_rank_that_stops_answering_at_the_epochs_end_is_a_distributed_error_naming_the_epoch():
    # CI saw the silent rank's timeout at the barrier after the checkpoint, outside the steps, as a bare RuntimeError
    (_, message), (_, silent) = run_ranks(_silent_at_the_epochs_end, sync=True)
    assert silent == "silent"
    assert message.startswith("rank 0: another of the 2 processes died or stopped answering in epoch 3 ("), message
    assert "Timed out" in message and message.endswith("train again with resume=True to continue from the last "
                                                      "checkpoint")


def test_only_a_lost_peer_becomes_a_distributed_error():
    two = DistributedContext(rank=1, world_size=2)
    with pytest.raises(RuntimeError, match="^CUDA out of memory$"), _peer_failures(two, epoch=0):
        raise RuntimeError("CUDA out of memory")
    one = DistributedContext()  # one process: no peer to lose
    with pytest.raises(RuntimeError, match="Connection reset by peer") as raised, _peer_failures(one, epoch=0):
        raise RuntimeError("Connection reset by peer")
    assert not isinstance(raised.value, DistributedError)
    lost = r"^rank 1: another of the 2 processes died or stopped answering in epoch 1 \(Connection reset by peer\)"
    with pytest.raises(DistributedError, match=lost), _peer_failures(two, epoch=0):
        raise RuntimeError("Connection reset by peer")


def test_one_process_passes_through_unchanged():
    points = POINTS.clone()
    assert float(GlobalBatchLoss(ContrastiveLoss(margin=4.0))(points, LABELS)) == pytest.approx(LOSS)
    check_same_on_every_rank("anything", [1], torch.device("cpu"))  # no group: nothing to compare


def test_rank_batches_are_disjoint_classes_that_make_up_the_one_process_batch():
    labels = np.repeat(np.arange(6), 5)
    single = list(balanced_batches(labels, 4, 3, steps=5, rng=np.random.default_rng(7)))
    parts = [list(balanced_batches(labels, 2, 3, steps=5, rng=np.random.default_rng(7), rank=r, world_size=2))
             for r in range(2)]
    for step, whole in enumerate(single):
        first, second = parts[0][step], parts[1][step]
        assert len(first) == len(second) == 6
        assert np.array_equal(np.concatenate([first, second]), whole)
        assert not set(labels[first]) & set(labels[second])
    # with fewer classes than world_size x classes_per_batch, each rank still gets an equal share
    shares = [next(iter(balanced_batches(labels, 4, 2, 1, np.random.default_rng(0), rank=r, world_size=2)))
              for r in range(2)]
    assert [len(s) for s in shares] == [6, 6]


def test_rank_batches_refuse_what_cannot_be_split():
    labels = np.repeat(np.arange(3), 4)
    with pytest.raises(DataError, match="4 processes need at least 4 leaf classes .* got 3"):
        next(iter(balanced_batches(labels, 2, 2, 1, np.random.default_rng(0), rank=0, world_size=4)))
    with pytest.raises(DataError, match=r"rank must be in \[0, world_size\), got rank 2 of 2"):
        next(iter(balanced_batches(labels, 2, 2, 1, np.random.default_rng(0), rank=2, world_size=2)))


def test_context_reads_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert DistributedContext.from_environment(env) == DistributedContext(3, 4, 1, 2)
    assert DistributedContext.from_environment({}) == DistributedContext()
    assert DistributedContext.from_environment({"RANK": "1", "WORLD_SIZE": "2"}).local_world_size == 2
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        DistributedContext.from_environment({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\), got rank 4 of 4"):
        DistributedContext.from_environment({"RANK": "4", "WORLD_SIZE": "4"})
    with process_group(DistributedContext(), "cpu") as device:  # one process: no group to join
        assert device == torch.device("cpu") and not dist.is_initialized()


def test_batch_norm_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert TrainConfig().resolved_batch_norm(1, cpu) == "batch"
    assert TrainConfig().resolved_batch_norm(1, cuda) == "batch"
    assert TrainConfig().resolved_batch_norm(2, cpu) == "frozen"
    assert TrainConfig().resolved_batch_norm(2, cuda) == "sync"
    assert TrainConfig(batch_norm="batch").resolved_batch_norm(2, cpu) == "batch"
    with pytest.raises(ValueError, match="batch_norm 'sync' needs CUDA"):
        TrainConfig(batch_norm="sync").resolved_batch_norm(2, cpu)
    with pytest.raises(ValueError, match="batch_norm must be one of auto, batch, sync, frozen, got 'global'"):
        TrainConfig(batch_norm="global")
