"""Joining the process group that ``torchrun`` describes in the environment."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str | None = None) -> tuple[int, int, torch.device]:
    """``(rank, world size, this rank's device)``. Under ``torchrun`` (``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK`` set) it joins the default group, NCCL on CUDA and gloo on CPU, once; a plain
    process is rank 0 of 1. ``device``: cpu / cuda (default: cuda if available)."""
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(kind)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    here = torch.device(f"cuda:{local}") if kind == "cuda" else torch.device("cpu")
    if here.type == "cuda":
        torch.cuda.set_device(here)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if here.type == "cuda" else "gloo",
                                device_id=here if here.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), here
