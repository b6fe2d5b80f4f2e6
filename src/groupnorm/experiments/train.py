"""One training run: a :class:`~groupnorm.experiments.model.SmallResNet` on Fashion-MNIST.

The protocol (:class:`Protocol`) is fixed per preset and identical for every normalization;
a run (:class:`RunSpec`) only says which normalization, how many images per worker and which
seed. Two ways to get W data-parallel workers:

* virtual (default, fast): one process takes a batch of W*B images per step; batch norm takes
  its statistics per chunk of B (:class:`~groupnorm.experiments.model.GhostBatchNorm`), and
  the loss is the mean over all W*B images, whose gradient is the average of the W workers'
  gradients. This is the same computation as the real thing, in one process.
* real (``--workers K``): K processes on this machine, ``torch.distributed`` with the gloo
  backend and ``DistributedDataParallel``; each process holds its own BN statistics.

In both, step ``t`` uses images ``perm[t*W*B:(t+1)*W*B]`` of the epoch's permutation (worker
``k`` gets the ``k``-th block of B), so both see the same data in the same order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .model import SmallResNet, average_bn_buffers, set_virtual_workers

__all__ = ["Protocol", "RunSpec", "train_run", "train_run_ddp", "evaluate"]

#: images per step (in one process) up to which training runs without oneDNN convolutions
SMALL_STEP = 8


@dataclass(frozen=True)
class Protocol:
    """Everything about training that is the same for every normalization and batch size.

    Attributes:
        workers: W, the number of data-parallel workers (the paper used 8 GPUs).
        train_size: training images used (a random subset of the 60,000, fixed per seed).
        epochs: passes over the training subset; the same for every batch size, so small
            batches take more, smaller steps.
        base_lr: learning rate for a total batch of ``lr_batch`` images; the rate used is
            ``base_lr * W * B / lr_batch`` (linear scaling, as in the paper).
        lr_batch: see ``base_lr``.
        warmup: fraction of the steps with a linear warm-up from 0; then cosine decay to 0.
        momentum, weight_decay: SGD settings (weight decay on all parameters, as the paper).
        width, blocks, stem_stride: the network (see ``SmallResNet``).
        groups: G for group norm (capped at the channels of a layer).
        eval_batch: batch size for the test-set pass (no effect on the result).
    """

    workers: int = 8
    train_size: int = 60000
    epochs: int = 1
    base_lr: float = 0.1
    lr_batch: int = 256
    warmup: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    width: int = 16
    blocks: int = 1
    stem_stride: int = 2
    groups: int = 8
    eval_batch: int = 1000

    def to_dict(self) -> dict[str, Any]:
        """Field -> value, for the results file and the report."""
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the protocol: results from different protocols never mix."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RunSpec:
    """One point of the grid: normalization, images per worker, seed (and G for the sweep).

    ``groups`` overrides ``Protocol.groups`` for ``gn`` (the group-count sweep); ``None`` keeps
    the protocol's.
    """

    norm: str
    images_per_worker: int
    seed: int
    groups: int | None = None

    @property
    def key(self) -> str:
        """Unique name of the run inside a results file."""
        g = f"-G{self.groups}" if self.groups is not None else ""
        return f"{self.norm}{g}/b{self.images_per_worker}/s{self.seed}"


def build_model(protocol: Protocol, run: RunSpec) -> SmallResNet:
    """The network of this run, initialised from ``run.seed`` (same weights in every worker)."""
    torch.manual_seed(run.seed)
    return SmallResNet(
        run.norm,
        width=protocol.width,
        blocks=protocol.blocks,
        groups=run.groups if run.groups is not None else protocol.groups,
        stem_stride=protocol.stem_stride,
    )


def _small_steps(images_per_step: int, device: torch.device) -> bool:
    """Whether this process's steps run on torch's im2col convolutions: at most
    :data:`SMALL_STEP` images on CPU, where they take less time than oneDNN's (whose cost per
    call hardly shrinks with the batch); above, oneDNN's are faster."""
    return device.type == "cpu" and images_per_step <= SMALL_STEP


def _small_step_layout(model: nn.Module, images_per_step: int, device: torch.device) -> nn.Module:
    """``model`` in channels-last when its steps are small (:func:`_small_steps`): the im2col
    convolutions take about a quarter less time in that layout, and the norms' kernels read it
    as it is. Above, the model keeps the default layout: oneDNN's channels-last backward of a
    strided 1x1 convolution corrupts memory in this torch build. Only the speed and the last
    bits of the arithmetic depend on the layout."""
    if _small_steps(images_per_step, device):
        return model.to(memory_format=torch.channels_last)
    return model


def _subset(run: RunSpec, protocol: Protocol, n_available: int) -> Tensor:
    """Indices of the training subset: depends on the seed only, not on norm or batch."""
    if protocol.train_size > n_available:
        raise ValueError(
            f"train_size {protocol.train_size} is larger than the {n_available} training images"
        )
    g = torch.Generator().manual_seed(10_000 + run.seed)
    return torch.randperm(n_available, generator=g)[: protocol.train_size]


def _epoch_order(run: RunSpec, epoch: int, n: int) -> Tensor:
    g = torch.Generator().manual_seed(run.seed * 1_000 + epoch)
    return torch.randperm(n, generator=g)


def _lr_at(step: int, total_steps: int, peak: float, warmup: float) -> float:
    warm = max(1, int(round(warmup * total_steps))) if warmup > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total_steps - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    """Top-1 error in percent of ``model`` (in eval mode: BN uses running statistics)."""
    model.eval()
    wrong = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            pred = model(x[i : i + batch]).argmax(1)
            wrong += int((pred != y[i : i + batch]).sum())
    return 100.0 * wrong / max(1, x.shape[0])


def _train_loop(
    model: nn.Module,
    protocol: Protocol,
    run: RunSpec,
    train_x: Tensor,
    train_y: Tensor,
    *,
    rank: int,
    local_workers: int,
    max_steps: int | None,
    progress: Any,
) -> dict[str, Any]:
    """SGD over the epochs; this process computes ``local_workers`` of the W workers."""
    w, b = protocol.workers, run.images_per_worker
    total_batch = w * b
    subset = _subset(run, protocol, train_x.shape[0])
    steps_per_epoch = protocol.train_size // total_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"train_size {protocol.train_size} is smaller than one batch of {total_batch} images"
        )
    total_steps = steps_per_epoch * protocol.epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    peak_lr = protocol.base_lr * total_batch / protocol.lr_batch
    opt = torch.optim.SGD(
        model.parameters(),
        lr=peak_lr,
        momentum=protocol.momentum,
        weight_decay=protocol.weight_decay,
        foreach=True,  # a few calls over all parameters instead of a few per parameter
    )
    lo, hi = rank * local_workers * b, (rank + 1) * local_workers * b
    # (only the speed depends on which convolutions run)
    onednn = torch.backends.mkldnn.enabled
    if train_x.device.type == "cpu":
        torch.backends.mkldnn.enabled = onednn and not _small_steps(hi - lo, train_x.device)
    try:
        info = _sgd_epochs(
            model, protocol, run, train_x, train_y, opt, subset, lo, hi, total_steps, peak_lr,
            steps_per_epoch, total_batch, progress,
        )  # fmt: skip
    finally:
        torch.backends.mkldnn.enabled = onednn
    return info


def _sgd_epochs(
    model, protocol, run, train_x, train_y, opt, subset, lo, hi, total_steps, peak_lr,
    steps_per_epoch, total_batch, progress,
) -> dict[str, Any]:  # fmt: skip
    step = 0
    loss_sum, loss_count, last_epoch_loss = 0.0, 0, float("nan")
    model.train()
    for epoch in range(protocol.epochs):
        order = subset[_epoch_order(run, epoch, protocol.train_size)]
        loss_sum, loss_count = 0.0, 0
        for i in range(steps_per_epoch):
            if step >= total_steps:
                break
            idx = order[i * total_batch : (i + 1) * total_batch][lo:hi]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total_steps, peak_lr, protocol.warmup)
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"run {run.key}: loss became {value} at step {step}")
            loss_sum += value
            loss_count += 1
            step += 1
            if progress is not None:
                progress.update(1)
        if loss_count:
            last_epoch_loss = loss_sum / loss_count
    return {
        "steps": step,
        "total_batch": total_batch,
        "lr": peak_lr,
        "train_loss": last_epoch_loss,
    }


def _total_steps(protocol: Protocol, run: RunSpec, max_steps: int | None) -> int:
    steps = protocol.train_size // (protocol.workers * run.images_per_worker) * protocol.epochs
    return steps if max_steps is None else min(steps, max_steps)


def train_run(
    protocol: Protocol,
    run: RunSpec,
    data: Any,
    *,
    max_steps: int | None = None,
    progress: Any = None,
    return_model: bool = False,
) -> dict[str, Any]:
    """Train one run with W virtual workers in this process and test it.

    Args:
        protocol: the fixed training protocol.
        run: normalization, images per worker, seed.
        data: a :class:`~groupnorm.experiments.data.Dataset` (or anything with ``train_x``,
            ``train_y``, ``test_x``, ``test_y``).
        max_steps: stop early (tests); the learning-rate schedule is shortened to match.
        progress: an object with ``update(n)`` (a tqdm bar), or ``None``.
        return_model: put the trained model under the key ``"model"`` (not serialisable).

    Returns:
        A record: the run's fields, ``test_error`` (percent), ``train_loss`` (mean over the last
        epoch), ``steps``, ``total_batch``, ``lr``, ``wall_s``, ``mode``.
    """
    start = time.perf_counter()
    model = build_model(protocol, run)
    set_virtual_workers(model, protocol.workers)
    images = protocol.workers * run.images_per_worker
    model = _small_step_layout(model, images, data.train_x.device)
    info = _train_loop(
        model,
        protocol,
        run,
        data.train_x,
        data.train_y,
        rank=0,
        local_workers=protocol.workers,
        max_steps=max_steps,
        progress=progress,
    )
    model = model.to(memory_format=torch.contiguous_format)  # (testing runs on oneDNN)
    error = evaluate(model, data.test_x, data.test_y, protocol.eval_batch)
    record = _record(run, info, error, time.perf_counter() - start, "virtual")
    if return_model:
        record["model"] = model
    return record


def _record(run: RunSpec, info: dict, error: float, wall: float, mode: str) -> dict[str, Any]:
    return {
        "key": run.key,
        "norm": run.norm,
        "images_per_worker": run.images_per_worker,
        "seed": run.seed,
        "groups": run.groups,
        "test_error": error,
        **info,
        "wall_s": round(wall, 3),
        "mode": mode,
    }


def _ddp_worker(
    rank: int,
    world: int,
    init_method: str,
    protocol: Protocol,
    run: RunSpec,
    tensors: tuple[Tensor, Tensor, Tensor, Tensor],
    result_file: str,
    threads: int,
    max_steps: int | None,
    state_file: str | None,
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        train_x, train_y, test_x, test_y = tensors
        start = time.perf_counter()
        model = build_model(protocol, run)
        set_virtual_workers(model, protocol.workers // world)
        images = protocol.workers // world * run.images_per_worker
        model = _small_step_layout(model, images, train_x.device)
        # Buffers are not broadcast at each step: each worker keeps the running statistics of
        # its own batches, and they are averaged once at the end (see average_bn_buffers).
        # (Newer torch names the switch forward_sync_buffers; the old name warns there.)
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in params
            else {"broadcast_buffers": False}
        )
        ddp = nn.parallel.DistributedDataParallel(model, **no_sync)
        info = _train_loop(
            ddp,
            protocol,
            run,
            train_x,
            train_y,
            rank=rank,
            local_workers=protocol.workers // world,
            max_steps=max_steps,
            progress=None,
        )
        average_bn_buffers(model)
        if rank == 0:
            model = model.to(memory_format=torch.contiguous_format)
            error = evaluate(model, test_x, test_y, protocol.eval_batch)
            record = _record(run, info, error, time.perf_counter() - start, f"ddp-gloo-{world}")
            Path(result_file).write_text(json.dumps(record))
            if state_file is not None:
                torch.save(model.state_dict(), state_file)
        # Drop DDP's reducer (and its communication work) before the group goes away: tearing
        # the group down under a live reducer can abort the process in gloo.
        del ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Everything is written. Leave without running C++ static destructors: with gloo, about one
    # process exit in 15 aborts there ("terminate called without an active exception", after
    # this function has returned), which mp.spawn would report as a failed run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    """A TCP port on the loopback interface that is free right now (for the rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_run_ddp(
    protocol: Protocol,
    run: RunSpec,
    data: Any,
    processes: int,
    *,
    threads: int = 1,
    max_steps: int | None = None,
    state_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train one run with ``processes`` real worker processes (gloo, DistributedDataParallel).

    ``protocol.workers`` must be a multiple of ``processes``; each process computes
    ``workers / processes`` of the workers (one each when they are equal, the paper's set-up).
    Returns the same record as :func:`train_run`, from rank 0. ``state_file`` saves rank 0's
    final ``state_dict`` there (tests compare it with the virtual-worker run).
    """
    if processes < 1 or protocol.workers % processes:
        raise ValueError(
            f"--workers {processes} must divide the protocol's {protocol.workers} workers; "
            f"pick a divisor of {protocol.workers}"
        )
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="groupnorm-ddp-") as tmp:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        result_file = os.path.join(tmp, "result.json")
        tensors = (data.train_x, data.train_y, data.test_x, data.test_y)
        mp.spawn(
            _ddp_worker,
            args=(
                processes,
                init_method,
                protocol,
                run,
                tensors,
                result_file,
                threads,
                max_steps,
                None if state_file is None else str(state_file),
            ),
            nprocs=processes,
            join=True,
        )
        return json.loads(Path(result_file).read_text())
