"""How much memory the sessions may hold by default: a fraction of what the device has free;
and allocating a cache (``allocate``: an out-of-memory becomes a clear ``TooLarge``).

Without a budget every new session and every long prompt allocates until the kernel's OOM
killer ends the server (and every session in it). The default is measured once, after the
model is loaded: on CUDA a fraction of the device's free memory; elsewhere a fraction of the
RAM the system has available, capped by the cgroup limit of a container (where the OOM killer
acts long before the host runs out).
"""

from __future__ import annotations

import os
from pathlib import Path

from superlinear.errors import TooLarge

# What is left outside the budget: activations of a prefill chunk, the scratch conversation,
# snapshots being read or written, the rest of the process (and on CPU other processes).
CUDA_FRACTION = 0.8
HOST_FRACTION = 0.5


def host_available_bytes() -> int | None:
    """RAM this process could still get: MemAvailable, lowered by a cgroup memory limit."""
    available = _meminfo_available()
    limit = _cgroup_room()
    candidates = [v for v in (available, limit) if v is not None]
    if not candidates:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return min(candidates)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """``limit - usage`` of this process's cgroup (v2, then v1); None when unlimited/unknown."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit, usage = int(raw), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # v1 writes "unlimited" as a huge number
            return None
        return max(0, limit - usage)
    return None


def device_available_bytes(device) -> int | None:
    """Free memory of ``device`` (a torch device or its name) right now."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_bytes()


def default_budget(device) -> int | None:
    """The default session memory budget on ``device`` (None if nothing can be measured)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    free = device_available_bytes(device)
    if free is None:
        return None
    return int(free * (CUDA_FRACTION if kind == "cuda" else HOST_FRACTION))


# -- allocating a cache ---------------------------------------------------------------------------
def allocate(build, max_seq_len: int):
    """Run ``build()`` (which allocates a cache); an out-of-memory becomes ``TooLarge``."""
    try:
        return build()
    except TooLarge:
        raise
    except (MemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        free_memory()
        raise TooLarge(f"not enough memory for a cache of {max_seq_len} tokens "
                       f"({str(exc).splitlines()[0][:200]}); use a smaller max_seq_len, or close or save "
                       "other sessions", param="max_seq_len") from exc


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except Exception:  # noqa: BLE001
        pass
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def free_memory() -> None:
    """Give freed cache memory back to the device (CUDA caching allocator). Tensors are freed
    by reference counting as soon as a cache is dropped; only CUDA needs this extra step."""
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
