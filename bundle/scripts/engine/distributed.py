"""One multi-process set-up for training, evaluation and inference under torchrun: MONAI's bundle CLI has none, and
its DistributedSampler refuses a split smaller than the number of processes."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist


def device(distributed: bool = False) -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` under torchrun with `distributed`, else `cuda` or `cpu`."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if distributed else "cuda")


def initialize(distributed: bool = False) -> None:
    """With `distributed` and more than one process: join the process group (nccl on GPUs, gloo on CPUs), use
    this process's GPU, and leave logging to rank 0 (other ranks log warnings only)."""
    if not distributed or int(os.environ.get("WORLD_SIZE", 1)) < 2 or dist.is_initialized():
        return
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(device(True))
    if dist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)


def finalize() -> None:
    """Leave the process group, if this process joined one, once every process is done (a process leaving while
    another still talks to it can abort gloo)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that logs, writes TensorBoard, checkpoints and reports."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shard(cases: Sequence[dict], pad: bool = False) -> list[dict]:
    """This process's share of `cases`: every case once across the processes (all of them without a process group).

    With `pad`, shorter shares are filled with copies of the first case marked `padding: True`, so every process
    runs as many iterations as the others (evaluators gather metrics at each epoch's end); the metrics skip them.
    """
    cases = list(cases)
    if not dist.is_initialized():
        return cases
    rank, world = dist.get_rank(), dist.get_world_size()
    own = cases[rank::world]
    if pad and cases:
        own += [dict(cases[0], padding=True)] * (-(-len(cases) // world) - len(own))
    return own
