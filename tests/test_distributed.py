"""Distributed training on the CPU: two processes over gloo against one process.

The end-to-end tests start the real command line under torchrun, exactly as
docs/scaling.md shows it (``python -m torch.distributed.run`` is ``torchrun``):

    torchrun --standalone --nproc_per_node=2 -m ilseg train --config synth-demo --set ... --out RUN_DIR
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from tiny import tiny_sets
from torch import nn
from torch.utils.data import DataLoader

import processes
import ilseg
from ilseg.config import RunConfig, load_config, preset_dir
from ilseg.data.datasets import SeededItems
from ilseg.data.synth import generate_synth
from ilseg.engine import distributed as D
from ilseg.engine.run import evaluate_checkpoint, run_training
from ilseg.errors import IlsegError, ReportedByMainRank
from ilseg.models import CPUSyncBatchNorm, convert_sync_batchnorm
from ilseg.runs.checkpoint import load_checkpoint
from ilseg.runs.folder import model_from_config
from ilseg.tasks import get_task

# The tiny run (tests/tiny.py), with a global batch of 8 (4 per process): BN
# statistics of 4 images per process are well enough conditioned for float32
# round-off to stay at round-off over a few iterations; SGD, whose update is
# proportional to the gradient (Adam's first steps are not).
# The default CE reduction ("valid": the mean over non-ignored pixels, whose
# number differs between processes) is exact under DDP: the losses divide by
# the global count (methods.losses.per_process_share).
BATCH_8_SGD = ["optim.batch_size=8", "optim.optimizer=sgd", "optim.lr=0.01"]
TIMEOUT_S = 120  # a hung job fails the test instead of the test suite


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_synth(root, seed=3, num_images=55, size=32, workers=1)  # 11 test images: shards of 6 and 5
    return root


def _sets(root: Path, cache: Path, *extra: str) -> list[str]:
    return tiny_sets(root, *BATCH_8_SGD, *extra, cache_dir=cache)


def torchrun(args: list[str], *, nproc: int = 2,
             script: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``torchrun --standalone --nproc_per_node=N -m ilseg ARGS`` (or ``SCRIPT ARGS``) in a subprocess."""
    src = str(Path(ilseg.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    target = [str(script)] if script is not None else ["-m", "ilseg"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *target, *args]
    t0 = time.monotonic()
    done = processes.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return done, time.monotonic() - t0


def _set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _epoch_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(l["step"], l["train/loss"]) for l in lines if "train/loss" in l]


# -- samplers and per-item seeding (no processes) -------------------------------------
@pytest.mark.parametrize("length, batch", [(23, 6), (12, 6), (7, 6)])
def test_global_batches_of_the_ranks_are_the_single_process_batches(length, batch):
    for epoch in (0, 1):
        single = D.GlobalBatchSampler(length, batch, rank=0, world_size=1, seed=5)
        single.set_epoch(epoch)
        expected = list(single)
        assert len(expected) == len(single) == length // batch
        assert all(len(b) == batch for b in expected)
        for world in (2, 3, 6):
            ranks = []
            for rank in range(world):
                s = D.GlobalBatchSampler(length, batch, rank=rank, world_size=world, seed=5)
                s.set_epoch(epoch)
                ranks.append(list(s))
                assert len(s) == len(expected)
            joined = [sum((r[i] for r in ranks), []) for i in range(len(expected))]
            assert joined == expected, (world, epoch)
    a = D.GlobalBatchSampler(23, 6, rank=0, world_size=1, seed=5)
    b = D.GlobalBatchSampler(23, 6, rank=0, world_size=1, seed=5)
    b.set_epoch(1)
    assert list(a) != list(b)  # a new order every epoch
    with pytest.raises(IlsegError, match="global batch"):
        D.GlobalBatchSampler(23, 6, rank=0, world_size=4, seed=5)


@pytest.mark.parametrize("length, world", [(11, 2), (11, 3), (3, 4), (12, 4)])
def test_evaluation_shards_hold_every_image_once(length, world):
    shards = [list(D.ShardSampler(length, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(length))
    assert [len(D.ShardSampler(length, r, world)) for r in range(world)] == [len(s) for s in shards]


class _RandomItems:
    """Item i is drawn from torch's global RNG, as a random augmentation is."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)


def test_seeded_items_do_not_depend_on_order_or_workers():
    items = SeededItems(_RandomItems(), seed=7)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    forward = [items[i] for i in range(8)]
    backward = [items[i] for i in reversed(range(8))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert len({tuple(x.tolist()) for x in forward}) == 8
    items.set_epoch(1)
    assert not torch.equal(items[0], forward[0])
    loaded = torch.cat(list(DataLoader(items, batch_size=3, num_workers=2)))
    assert torch.equal(loaded, torch.stack([items[i] for i in range(8)]))


# -- synchronised BN and rank-0 work, in two spawned processes ----------------------
def _sync_worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        # channel 1 has a large mean and a small spread, like flat image regions after the first conv
        spread, offset = torch.tensor([1.0, 0.01, 3.0]), torch.tensor([0.0, 5.0, 1.0])
        x = torch.randn(4, 3, 6, 6) * spread.view(1, 3, 1, 1) + offset.view(1, 3, 1, 1)
        target = torch.randn(4, 4, 6, 6)
        net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.01), nn.Conv2d(4, 4, 1),
                            nn.BatchNorm2d(4, momentum=None))
        ref = copy.deepcopy(net)
        sync = convert_sync_batchnorm(copy.deepcopy(net), device_type="cpu")
        assert sum(isinstance(m, CPUSyncBatchNorm) for m in sync.modules()) == 2
        assert list(sync.state_dict()) == list(ref.state_dict())
        model = nn.parallel.DistributedDataParallel(sync)
        x_ref = x.clone().requires_grad_()
        y_ref = ref(x_ref)
        ((y_ref - target) ** 2).mean().backward()
        half = slice(2 * rank, 2 * rank + 2)  # this rank's half of the batch
        x_own = x[half].clone().requires_grad_()
        y_own = model(x_own)
        ((y_own - target[half]) ** 2).mean().backward()
        torch.testing.assert_close(y_own, y_ref[half], rtol=1e-5, atol=1e-5)
        # the input gradient is that of the sum of both ranks' losses; DDP averages the parameters'
        torch.testing.assert_close(x_own.grad / world, x_ref.grad[half], rtol=1e-4, atol=1e-7)
        for (name, p), q in zip(sync.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        for (name, b), c in zip(sync.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-7, msg=name)  # running statistics too
        sync.eval(), ref.eval()
        torch.testing.assert_close(sync(x), ref(x))  # eval mode: plain BN with the running statistics

        assert D.on_main(lambda: [dist.get_rank(), 7]) == [0, 7]  # rank 0's result everywhere
        assert D.average_over_ranks({"loss": float(rank)}) == {"loss": 0.5}

        def scan() -> None:
            raise IlsegError("mask 00001.png is corrupt")

        with pytest.raises(ReportedByMainRank if rank else IlsegError, match="00001.png"):
            D.on_main(scan)  # every rank fails at once: nobody waits for a rank that is gone
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_on_the_cpu_matches_batchnorm_on_the_whole_batch(tmp_path):
    # fork: the workers start in a blink with everything already imported; but not after a backward pass
    # on CUDA in this process (the GPU tests): autograd's device threads cannot be forked, so spawn then.
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_sync_worker, args=(2, str(tmp_path / "init")), nprocs=2, start_method=method)


def test_convert_sync_batchnorm_keeps_frozen_bn_and_uses_torch_on_cuda():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    net[1].eval()
    net[1].weight.requires_grad_(False)
    cpu = convert_sync_batchnorm(copy.deepcopy(net), device_type="cpu")
    assert type(cpu[1]) is CPUSyncBatchNorm and type(cpu[2][0]) is CPUSyncBatchNorm
    assert not cpu[1].training and not cpu[1].weight.requires_grad
    cuda = convert_sync_batchnorm(copy.deepcopy(net), device_type="cuda")
    assert type(cuda[1]) is nn.SyncBatchNorm and not cuda[1].training
    assert list(cuda.state_dict()) == list(net.state_dict()) == list(cpu.state_dict())


# -- the command line under torchrun ---------------------------------------------------
@pytest.fixture(scope="module")
def two_process_run(synth_root, tmp_path_factory):
    """Steps 0 and 1 (ILT, with its teacher) on 2 processes, through the real CLI."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    sets = _sets(synth_root, out.parent / "cache")
    done, seconds = torchrun(["train", "--config", "synth-demo", *_set_args(sets), "--steps", "0:2", "--quiet",
                              "--out", str(out)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, sets, done


def test_two_processes_train_like_one(two_process_run, tmp_path):
    out2, sets, done = two_process_run
    cfg = load_config(preset_dir() / "synth-demo.yaml", sets)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1)
    try:
        run_training(cfg, tmp_path / "one", steps="0", quiet=True)
    finally:
        torch.set_num_threads(threads)
    losses1, losses2 = _epoch_losses(tmp_path / "one"), _epoch_losses(out2)
    assert [s for s, _ in losses2] == [0, 0, 1]
    assert [l for _, l in losses2[:2]] == pytest.approx([l for _, l in losses1], rel=1e-4)
    one = torch.load(tmp_path / "one" / "step0.pth", weights_only=True)["model"]
    two = torch.load(out2 / "step0.pth", weights_only=True)["model"]
    assert list(two) == list(one)  # same keys: SyncBN left no trace in the checkpoint
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    # the later step's checkpoint (trained with a teacher) loads into the plain model
    task = get_task("synth", "6-2-2")
    model_from_config(cfg, task.classifier_sizes(1), pretrained=False).load_state_dict(
        torch.load(out2 / "step1.pth", weights_only=True)["model"])
    # rank 0 alone wrote the log and printed the results
    assert (out2 / "train.log").read_text().count("step 0 done") == 1
    assert done.stdout.count("# ilt on synth 6-2-2") == 1
    assert "ilseg: error" not in done.stderr


def test_distributed_evaluation_counts_every_image_once(two_process_run, synth_root):
    out2, sets, _ = two_process_run
    cfg = load_config(preset_dir() / "synth-demo.yaml", sets)
    ids = (synth_root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(ids) % 2 == 1
    saved = torch.load(out2 / "step0.pth", weights_only=True)["confusion_matrix"]  # from 2 shards, summed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate_checkpoint(cfg, out2 / "step0.pth")["confusion_matrix"]
    finally:
        torch.set_num_threads(threads)
    assert saved == single
    seen = get_task("synth", "6-2-2").seen_classes(0)
    labelled = sum(int(np.isin(np.array(Image.open(synth_root / "SegmentationClassAug" / f"{i}.png")), seen).sum())
                   for i in ids)
    assert int(np.sum(saved)) == labelled


_FAILING_RANK = """\
import os, sys
from ilseg.cli import main
from ilseg.engine import step
from ilseg.errors import IlsegError

real = step.train_one_epoch

def fail_on_rank_1(**kwargs):
    if os.environ["RANK"] == "1":
        raise IlsegError("rank 1 failed on purpose")
    return real(**kwargs)  # rank 0 goes on into DDP's collectives and would wait for rank 1

step.train_one_epoch = fail_on_rank_1
raise SystemExit(main(sys.argv[1:]))
"""


def test_an_error_on_one_rank_ends_the_job(synth_root, tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(_FAILING_RANK)
    sets = _sets(synth_root, tmp_path / "cache", "runtime.backend=gloo", "runtime.collective_timeout_s=300")
    done, seconds = torchrun(["train", "--config", "synth-demo", *_set_args(sets), "--steps", "0", "--quiet",
                              "--out", str(tmp_path / "run")], script=script)
    assert done.returncode != 0
    assert seconds < 60  # not the 300 s collective timeout
    assert "ilseg: error (rank 1 of 2): rank 1 failed on purpose" in done.stderr


def test_a_bad_mask_seen_by_rank_0_ends_every_rank(synth_root, tmp_path):
    root = tmp_path / "synth"
    shutil.copytree(synth_root, root)
    first = (root / "ImageSets/Segmentation/train_aug.txt").read_text().split()[0]
    (root / "SegmentationClassAug" / f"{first}.png").write_bytes(b"not a png")
    sets = _sets(root, tmp_path / "cache", "runtime.collective_timeout_s=300")
    done, seconds = torchrun(["train", "--config", "synth-demo", *_set_args(sets), "--quiet",
                              "--out", str(tmp_path / "run")])
    assert done.returncode != 0
    assert seconds < 60
    # only rank 0 read the masks (rank 1 receives the image list, or here the error, from it) and printed it
    errors = [line for line in done.stderr.splitlines() if line.startswith("ilseg: error")]
    assert len(errors) == 1 and errors[0].startswith("ilseg: error: cannot read mask") and f"{first}.png" in errors[0]


_DYING_RANK = """\
import os, signal, sys
from ilseg.cli import main
from ilseg.methods import Method

real = Method.__call__
calls = {"n": 0}

def die_on_rank_1(self, *args, **kwargs):
    calls["n"] += 1
    if os.environ["RANK"] == "1" and calls["n"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no message, no cleanup: a crashed or OOM-killed process
    return real(self, *args, **kwargs)

Method.__call__ = die_on_rank_1
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_killed_rank_ends_the_job_with_one_ilseg_line(synth_root, tmp_path):
    script = tmp_path / "dying_rank.py"
    script.write_text(_DYING_RANK)
    out = tmp_path / "run"
    sets = _sets(synth_root, tmp_path / "cache", "runtime.collective_timeout_s=300")
    done, seconds = torchrun(["train", "--config", "synth-demo", *_set_args(sets), "--steps", "0", "--quiet",
                              "--out", str(out)], script=script)
    assert done.returncode != 0 and seconds < 60
    ours = [line for line in done.stderr.splitlines() if line.startswith("ilseg:")]
    assert len(ours) == 1, done.stderr
    assert ours[0].startswith("ilseg: error: another process of this job stopped")
    assert f"ilseg train --resume {out.resolve()}" in ours[0]
    # and rank 0's own traceback is gone: the first lines of the output are ours or torchrun's summary
    assert "Traceback" not in done.stderr.split("ilseg: error", 1)[0]


_FROZEN_RANK = """\
import os, sys, time
from ilseg.cli import main
from ilseg.methods import Method

real = Method.__call__

def freeze_rank_1(self, *args, **kwargs):
    if os.environ["RANK"] == "1":
        time.sleep(20)  # stuck (a hung file system, a GPU fault): no message, no exit
    return real(self, *args, **kwargs)

Method.__call__ = freeze_rank_1
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_after_the_collective_timeout(synth_root, tmp_path):
    script = tmp_path / "frozen_rank.py"
    script.write_text(_FROZEN_RANK)
    out = tmp_path / "run"
    sets = _sets(synth_root, tmp_path / "cache", "runtime.collective_timeout_s=4")
    done, seconds = torchrun(["train", "--config", "synth-demo", *_set_args(sets), "--steps", "0", "--quiet",
                              "--out", str(out)], script=script)
    assert done.returncode != 0
    assert seconds < 45  # the 4 s timeout, the frozen process's sleep, torchrun's shutdown: not 600 s
    ours = [line for line in done.stderr.splitlines() if line.startswith("ilseg:")]
    assert ours and ours[0].startswith("ilseg: error: another process of this job stopped"), done.stderr


def test_persistent_workers_draw_each_epochs_augmentation():
    """The training loader keeps its workers between epochs; the epoch travels with each index."""
    from ilseg.engine.loaders import EpochKeys, make_loader

    items = SeededItems(_RandomItems(), seed=7)
    batches = D.GlobalBatchSampler(8, 4, rank=0, world_size=1, seed=3)
    persistent = make_loader(items, batch_sampler=EpochKeys(batches), workers=2, persistent=True)
    assert persistent.persistent_workers
    seen = []
    for epoch in range(3):
        batches.set_epoch(epoch)
        items.set_epoch(0)  # a stale epoch in the main process must not matter either
        got = torch.cat(list(persistent))
        order = [i for batch in batches for i in batch]
        items.set_epoch(epoch)
        assert torch.equal(got, torch.stack([items[i] for i in order])), epoch
        seen.append(got)
    assert not torch.equal(seen[0], seen[1])  # each epoch its own draws
    assert persistent._iterator is not None  # the same workers served all three epochs


def train_on_two_processes_and_one(sets: list[str], tmp_path: Path, steps: str = "0:2") -> RunConfig:
    """The synth-demo run with ``sets``, trained for ``steps`` on two torchrun processes into ``tmp_path/two``
    and in this process with one thread (as each rank has) into ``tmp_path/one``; returns its config."""
    done, _ = torchrun(["train", "--config", "synth-demo", *_set_args(sets), "--steps", steps, "--quiet",
                        "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cfg = load_config(preset_dir() / "synth-demo.yaml", sets)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(cfg, tmp_path / "one", steps=steps, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return cfg


def test_plop_on_two_processes_calibrates_and_trains_like_one(synth_root, tmp_path):
    """PLOP's thresholds come from the whole training set (histograms summed over the processes), so
    two processes pseudo-label, distil and train as one does."""
    sets = _sets(synth_root, tmp_path / "cache", "method.name=plop", "data.crop_size=64")
    train_on_two_processes_and_one(sets, tmp_path)

    def thresholds(run: Path) -> str:
        return next(line for line in (run / "train.log").read_text().splitlines() if "thresholds" in line)

    assert thresholds(tmp_path / "two").rsplit("): ", 1)[1] == thresholds(tmp_path / "one").rsplit("): ", 1)[1]
    two, one = _epoch_losses(tmp_path / "two"), _epoch_losses(tmp_path / "one")
    assert [s for s, _ in two] == [s for s, _ in one] == [0, 0, 1]
    assert [l for _, l in two] == pytest.approx([l for _, l in one], rel=1e-3)


def test_reminder_on_two_processes_keeps_the_prototypes_of_one(synth_root, tmp_path):
    """REMINDER's old-class prototypes come from a pass over the previous step's training set whose per-class
    sums are reduced over the processes: two processes keep the prototypes one process keeps, and train as it."""
    sets = _sets(synth_root, tmp_path / "cache", "method.name=reminder", "data.crop_size=64")
    cfg = train_on_two_processes_and_one(sets, tmp_path)
    two, one = (load_checkpoint(tmp_path / run / "step1.pth")["method_state"]["prototypes"] for run in ("two", "one"))
    assert two.shape == one.shape == (7, cfg.model.head_channels)
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-5)
    losses_two, losses_one = _epoch_losses(tmp_path / "two"), _epoch_losses(tmp_path / "one")
    assert [l for _, l in losses_two] == pytest.approx([l for _, l in losses_one], rel=1e-3)


def test_rcil_on_two_processes_draws_and_trains_like_one(synth_root, tmp_path):
    """RCIL's drop-path draws come from a generator every process seeds alike, and its frozen first branches
    stay out of DDP's buckets: two processes train the branched model as one does."""
    sets = _sets(synth_root, tmp_path / "cache", "method.name=rcil")
    train_on_two_processes_and_one(sets, tmp_path)
    losses_two, losses_one = _epoch_losses(tmp_path / "two"), _epoch_losses(tmp_path / "one")
    assert [s for s, _ in losses_two] == [s for s, _ in losses_one] == [0, 0, 1]
    assert [l for _, l in losses_two] == pytest.approx([l for _, l in losses_one], rel=1e-3)


# -- "N processes train as 1" at 2 images per process (docs/scaling.md#how-exactly-n-processes-match-one) ---
SMALL_BATCH_SGD = ["optim.batch_size=4", "optim.optimizer=sgd", "optim.lr=0.01", "optim.iterations=2"]


@pytest.mark.slow
def test_two_images_per_process_match_one_process_iteration_by_iteration(synth_root, tmp_path):
    """Global batch 4 on 2 processes (2 images each), synchronised BN (the default): the first two iterations'
    losses and the weights and BN statistics after them are one process's to float round-off (measured: 3e-7
    relative on the loss, 2.3e-7 on the parameters, 3e-6 on the running variances).  Per-process BN
    (runtime.sync_bn=false) is a different computation: 1.1e-2 on the loss, 0.04 on a parameter, 0.9 on a
    running variance.

    Only the first iterations are compared on purpose: with lr 0.01 at this batch, training amplifies any
    rounding 10-100x per iteration from the third one on, so after ten iterations two processes differ
    from one by ~1e-2 in the weights, exactly as one process with 2 threads differs from one with 1 thread, or
    from itself with the initial weights moved by 1 ulp (docs/scaling.md).
    """
    sets = tiny_sets(synth_root, *SMALL_BATCH_SGD, cache_dir=tmp_path / "cache")
    cfg = load_config(preset_dir() / "synth-demo.yaml", sets)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1)
    try:
        run_training(cfg, tmp_path / "one", steps="0", quiet=True)
    finally:
        torch.set_num_threads(threads)
    one = torch.load(tmp_path / "one" / "step0.pth", weights_only=True)["model"]
    loss1 = _epoch_losses(tmp_path / "one")
    assert [s for s, _ in loss1] == [0]  # one (partial) epoch of 2 iterations

    def two_processes(sync_bn: bool) -> tuple[float, dict[str, torch.Tensor]]:
        out = tmp_path / f"two-sync-{sync_bn}"
        done, _ = torchrun(["train", "--config", "synth-demo", *_set_args([*sets, f"runtime.sync_bn={sync_bn}"]),
                            "--steps", "0", "--quiet", "--out", str(out)])
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (_, loss), = _epoch_losses(out)
        return loss, torch.load(out / "step0.pth", weights_only=True)["model"]

    loss2, two = two_processes(sync_bn=True)
    assert loss2 == pytest.approx(loss1[0][1], rel=1e-5, abs=0)
    assert list(two) == list(one)
    for key in one:  # parameters, running means and variances, batch counters
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5, msg=key)

    loss_own, own = two_processes(sync_bn=False)  # each process normalises its own 2 images
    assert abs(loss_own - loss1[0][1]) > 1e-3 * loss1[0][1]
    assert max(float((own[k] - one[k]).abs().max()) for k in one if one[k].is_floating_point()) > 1e-2
