"""`hiervec train` under torchrun: two gloo processes on loopback train as one process on the global batch.

Each test starts real `torchrun --standalone` jobs of the CLI (a few seconds of start-up
each), on a tiny generated folder tree, with mobilenet_v2 from random weights: a third of
resnet18's weights, so a step's all-reduce and optimizer step take less than half the time
(a 2-process 40-step job: 21 s against 34 s here).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedder import load_checkpoint

pytestmark = pytest.mark.slow

LEAVES = {
    "clothing/tops/shirt": (220, 30, 30),
    "clothing/tops/coat": (200, 60, 40),
    "clothing/bottoms/trouser": (30, 30, 220),
    "footwear/boots/boot": (30, 200, 30),
}
TINY = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--dim", "8", "--per-class", "2",
        "--val-fraction", "0.2", "--levels", "department,category,item"]
JOB_DEADLINE_S = 300


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torchrun") / "images"
    rng = np.random.default_rng(0)
    for leaf, colour in LEAVES.items():
        (root / leaf).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(np.array(colour) + rng.integers(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / leaf / f"{i}.png")
    return root


def environment() -> dict[str, str]:
    return os.environ | {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "PYTHONUNBUFFERED": "1"}


def torchrun(processes: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "cli.main", "train", *map(str, args)]


def one_process(*args) -> list[str]:
    return [sys.executable, "-m", "cli.main", "train", *map(str, args)]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[2], env=environment(), text=True,
                            capture_output=True, timeout=JOB_DEADLINE_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def loss_lines(stderr: str) -> list[tuple[str, list[float]]]:
    """The logged steps and their losses, without the speed (the speed differs, the losses must not)."""
    lines = [line.rsplit(" ", 2)[0] for line in stderr.splitlines() if " step " in line and "img/s" in line]
    return [(re.sub(r"-?\d+\.\d+", "#", line), [float(x) for x in re.findall(r"-?\d+\.\d+", line)])
            for line in lines]


def same_losses(a: list[tuple[str, list[float]]], b: list[tuple[str, list[float]]]) -> bool:
    """The same steps and terms with the same losses, to the printed 4 decimals give or take
    one unit: an all-reduce sums the two halves in another order than one process does, which
    can move a value across a rounding boundary (5.75185 prints 5.7518 or 5.7519)."""
    return len(a) == len(b) > 0 and all(
        ta == tb and len(va) == len(vb) and all(abs(x - y) <= 1.5e-4 for x, y in zip(va, vb))
        for (ta, va), (tb, vb) in zip(a, b))


def test_two_processes_train_as_one_process_on_the_global_batch(tree, tmp_path):
    # no validation split: the checkpoints hold the trained weights, never an earlier, better epoch's
    common = [tree, *TINY, "--epochs", "1", "--steps-per-epoch", "3", "--no-augment", "--val-fraction", "0"]
    ddp = run(torchrun(2, *common, "--out", tmp_path / "ddp.pt", "--classes-per-batch", "2"), tmp_path)
    # the same global batches in one process: twice the classes per batch, batch norm as
    # torchrun's default on CPUs (frozen: torch's SyncBatchNorm does not run there)
    one = run(one_process(*common, "--out", tmp_path / "one.pt", "--classes-per-batch", "4",
                          "--batch-norm", "frozen"), tmp_path)
    assert "distributed: 2 processes on cpu, 4 images per process and step (8 in all), batch norm frozen" in ddp.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.pt", "one.pt"]  # one checkpoint, no stray files
    assert same_losses(loss_lines(ddp.stderr), loss_lines(one.stderr)), (ddp.stderr, one.stderr)
    assert ddp.stdout.count("wrote ") == 1  # rank 0 alone reports

    a, b = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(tmp_path / "ddp.pt")
    assert a.epoch == b.epoch == 1 and b.train_state["world_size"] == 2 and b.train_state["batch_norm"] == "frozen"
    assert a.selection is None and b.selection is None  # no validation: the last epoch's weights
    differences = torch.cat([(a.state_dict[k].float() - b.state_dict[k].float()).abs().reshape(-1)
                             for k in a.state_dict])
    # AdamW moves every weight by about lr * sign(gradient) whatever the gradient's size, so
    # the few weights whose gradient is zero up to float rounding (summed in another order
    # across ranks) may step the other way: a handful of weights by up to 2 lr per step.
    # Measured on this test's mobilenet_v2 (2.9 million values): none differs by more than 1e-4,
    # the largest by 2.6e-5; on resnet18, 253 of 11.7 million did (0.002%), and without the
    # gradient scaling or the gathered negatives 17-21% did, by up to 5e-3.
    assert float((differences > 1e-4).float().mean()) < 1e-4
    assert float(differences.max()) <= 2 * 1e-3 * 3
    assert float(differences.median()) == 0.0


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children, by their RANK variable)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    ranks = {}
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = int(pid)
    return ranks


def wait_for(condition, what: str, seconds: float = JOB_DEADLINE_S):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"{what} did not happen within {seconds} s")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through Linux's /proc")
def test_a_killed_rank_fails_the_job_and_resume_continues_on_any_number_of_processes(tree, tmp_path):
    out = tmp_path / "m.pt"
    common = [tree, *TINY, "--out", out, "--steps-per-epoch", "10", "--classes-per-batch", "2", "--dist-timeout", "60",
              "--patience", "0"]  # every epoch runs, whatever validation says
    launcher = subprocess.Popen(torchrun(2, *common, "--epochs", "6"), cwd=Path(__file__).resolve().parents[2],
                                env=environment(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(out.is_file, "the first epoch's checkpoint")
        os.kill(wait_for(lambda: rank_pids(launcher).get(1), "torchrun's rank 1"), signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=JOB_DEADLINE_S)  # no hang: the job ends by itself
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0
    assert "Signal 9 (SIGKILL) received by PID" in stderr or "died or stopped answering" in stderr, stderr[-3000:]
    stopped_at = load_checkpoint(out).epoch
    assert 1 <= stopped_at < 6

    again = run(torchrun(2, *common, "--epochs", stopped_at + 1, "--resume"), tmp_path)
    assert f"resuming {out} after epoch {stopped_at}" in again.stderr
    assert load_checkpoint(out).epoch == stopped_at + 1
    alone = run(one_process(*common, "--epochs", stopped_at + 2, "--resume"), tmp_path)
    assert f"resuming {out} after epoch {stopped_at + 1}" in alone.stderr
    final = load_checkpoint(out)
    assert final.epoch == stopped_at + 2
    assert [h["epoch"] for h in final.history] == list(range(0, stopped_at + 3))  # epoch 0: the start, validated


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through Linux's /proc")
def test_a_rank_that_stops_answering_fails_the_job_after_the_timeout(tree, tmp_path):
    out = tmp_path / "m.pt"
    launcher = subprocess.Popen(
        torchrun(2, tree, *TINY, "--out", out, "--steps-per-epoch", "10", "--classes-per-batch", "2", "--epochs", "6",
                 "--dist-timeout", "5"),
        cwd=Path(__file__).resolve().parents[2], env=environment(), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    stopped = None
    try:
        wait_for(out.is_file, "the first epoch's checkpoint")
        ranks = wait_for(lambda: len(rank_pids(launcher)) == 2 and rank_pids(launcher), "torchrun's two ranks")
        stopped = ranks[1]
        os.kill(stopped, signal.SIGSTOP)  # alive, silent: only the process group's timeout can tell
        wait_for(lambda: not Path(f"/proc/{ranks[0]}").exists() or launcher.poll() is not None,
                 "rank 0 giving up on its silent peer")
        os.kill(stopped, signal.SIGKILL)  # torchrun would wait 30 s for a stopped process to take SIGTERM
        _, stderr = launcher.communicate(timeout=JOB_DEADLINE_S)
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0
    assert "Error: rank 0: another of the 2 processes died or stopped answering" in stderr, stderr[-3000:]
    assert "--resume" in stderr


def mid_epoch_step(path: Path) -> int:
    """The step inside an epoch that the checkpoint at `path` was saved at (0: none yet, or an epoch's end)."""
    if not path.is_file():
        return 0
    return load_checkpoint(path).train_state.get("step") or 0  # written atomically: never read half-written


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through Linux's /proc")
def test_a_rank_killed_mid_epoch_resumes_at_its_step_and_ends_with_the_uninterrupted_weights(tree, tmp_path):
    # no validation: the checkpoints hold the weights training reached, to compare with the uninterrupted run's
    common = [tree, *TINY, "--epochs", "1", "--steps-per-epoch", "24", "--classes-per-batch", "2",
              "--checkpoint-every", "3", "--val-fraction", "0", "--workers", "0", "--dist-timeout", "60"]
    run(torchrun(2, *common, "--out", tmp_path / "whole.pt"), tmp_path)
    out = tmp_path / "killed.pt"
    launcher = subprocess.Popen(torchrun(2, *common, "--out", out), cwd=Path(__file__).resolve().parents[2],
                                env=environment(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: mid_epoch_step(out), "a checkpoint inside the first epoch")
        os.kill(wait_for(lambda: rank_pids(launcher).get(1), "torchrun's rank 1"), signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=JOB_DEADLINE_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0, "the job ended before the kill: give it more steps"
    killed_at = load_checkpoint(out)
    step = killed_at.train_state["step"]
    assert killed_at.epoch == 0 and 3 <= step < 24 and step % 3 == 0  # inside the epoch

    again = run(torchrun(2, *common, "--out", out, "--resume"), tmp_path)
    assert f"resuming epoch 1 at step {step + 1}/24" in again.stderr
    whole, resumed = load_checkpoint(tmp_path / "whole.pt"), load_checkpoint(out)
    assert resumed.epoch == whole.epoch == 1
    assert whole.state_dict.keys() == resumed.state_dict.keys()
    worst = max(float((whole.state_dict[k].float() - resumed.state_dict[k].float()).abs().max())
                for k in whole.state_dict)
    assert worst <= 1e-6, worst
