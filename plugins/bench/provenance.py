"""What a benchmark result must say to be reproduced: the code (git commit), the packages that
compute it (torch, triton, transformers, fla), the device and its driver, the date and the
command. Every ``spl bench`` JSON carries ``provenance()``.

The commit comes from ``SPL_GIT_COMMIT`` when set (a source tree copied to a GPU machine has no
``.git``: the scripts/gpu_*.sh callers pass it), else from ``git`` in the source tree.
torch is imported only when called.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# distribution names per reported package (fla ships as fla-core or flash-linear-attention)
PACKAGES = {"torch": ("torch",), "triton": ("triton",), "transformers": ("transformers",),
            "fla": ("fla-core", "flash-linear-attention")}


def package_versions() -> dict[str, str | None]:
    from superlinear import __version__

    out = {"spl": __version__, "python": platform.python_version()}
    for name, dists in PACKAGES.items():
        out[name] = None
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> dict:
    """``{"git_commit": sha or None, "git_dirty": bool or None}``."""
    given = os.environ.get("SPL_GIT_COMMIT", "").strip()
    if given:
        return {"git_commit": given, "git_dirty": None}
    sha = _git("rev-parse", "HEAD")
    if sha is None:
        return {"git_commit": None, "git_dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": sha, "git_dirty": None if status is None else bool(status)}


def nvidia_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def device_info(device) -> dict:
    """Name, driver, CUDA runtime and compute capability of a CUDA device; the processor and
    thread count otherwise. ``None``: the host of a command that runs no model itself (a load
    generator, ``spl bench serve``): its processor and CPU count, without importing torch."""
    if device is None:
        return {"type": "host", "name": platform.processor() or platform.machine() or "cpu", "cpus": os.cpu_count()}
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "driver": nvidia_driver(),
                "cuda_runtime": torch.version.cuda, "capability": f"{major}.{minor}",
                "memory_gib": round(props.total_memory / 2**30, 1)}
    return {"type": device.type, "name": platform.processor() or platform.machine() or "cpu",
            "threads": torch.get_num_threads()}


def provenance(device=None) -> dict:
    """The block every bench JSON carries (see the module docstring)."""
    return {"date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), **git_commit(),
            "versions": package_versions(), "device_info": device_info(device),
            "command": " ".join(["spl", *sys.argv[1:]]) if sys.argv else None}


def provenance_line(result: dict) -> str:
    """One markdown line: commit, package versions, device and driver (what ``provenance`` put
    into ``result``; absent entries are left out)."""
    commit = result.get("git_commit")
    parts = [f"commit {commit[:12]}{' (dirty)' if result.get('git_dirty') else ''}" if commit else "commit unknown"]
    parts += [f"{name} {version}" for name, version in (result.get("versions") or {}).items()
              if version and name not in ("python", "spl")]
    device = result.get("device_info") or {}
    if device.get("driver"):
        parts.append(f"{device.get('name')} driver {device['driver']}, CUDA {device.get('cuda_runtime')}")
    return " · ".join(parts)
