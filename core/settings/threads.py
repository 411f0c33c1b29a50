"""How many CPU threads the server's torch uses (``--threads``, ``$SPL_THREADS``, ``threads``).

torch defaults to every logical core. Its operators split each call across that many threads
and wait for the slowest, so on a small or shared machine a thread that loses its core to
another process stalls every call: on a loaded 2-core machine a 1-token turn took 5-14 s with
torch's default and 0.44 s with one thread (issue 21). Like llama.cpp (``-t``) and ollama
(``num_thread``) the default is the physical cores this process may run on, at most 8 (the
default model's matrices are too small to gain past that), and 1 on a machine of 2 cores or
fewer, where sharing is the common case.
"""

from __future__ import annotations

import os

MAX_DEFAULT_THREADS = 8


def usable_cores() -> int:
    """Physical cores this process may run on (its CPU affinity, e.g. a container's limit)."""
    import psutil

    logical = psutil.cpu_count(logical=True) or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    physical = psutil.cpu_count(logical=False) or logical
    # with hyperthreads, the allowed logical CPUs hold about allowed * physical / logical cores
    return max(1, min(allowed, allowed * physical // logical))


def default_threads() -> int:
    cores = usable_cores()
    return 1 if cores <= 2 else min(cores, MAX_DEFAULT_THREADS)


def limit_threads_before_torch(threads: int) -> None:
    """Make torch start with ``threads`` threads in this process: the OpenMP/MKL variables are
    read when torch loads; call before anything imports it (``use_threads`` sets it after)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def use_threads(threads: int) -> int:
    """Set torch's intra-op threads for the calling thread and those it starts; the count
    torch reports back."""
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()
