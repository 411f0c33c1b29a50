"""Process helpers shared by the snapshot store (stale temp dirs) and the server client (pid files).

A pid alone does not name a process: once it exits, the system hands the number to the next one.
So a pid file records the process's *identity* (pid, start time, command line; see
``identity``) and nothing is signalled or waited for unless ``matches`` says the live process
is still that one. psutil reads start times and command lines the same way on Linux, macOS
and Windows.
"""

from __future__ import annotations

import os
import time

# Start times are read back from the same source (psutil), so they agree to the clock tick;
# the slack only absorbs rounding. A reused pid with the same command line started within it
# is not a case worth guarding.
_START_TIME_SLACK_S = 1.0


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists (one we may not signal counts as alive)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _process(pid: int | None):
    """The live psutil process with this pid, or None (gone, a zombie, or unreadable)."""
    import psutil

    if not pid or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.Error, OSError):
        return None


def identity(pid: int, cmdline: list[str] | None = None) -> dict | None:
    """``{"pid", "create_time", "cmdline"}`` of a running process (None if it is gone).

    ``cmdline`` is the command the caller started it with, when it knows it: right after a
    fork the child may still show its parent's command line.
    """
    import psutil

    proc = _process(pid)
    if proc is None:
        return None
    try:
        boot = psutil.boot_time()  # read first: create_time is computed from it (see ``matches``)
        return {"pid": pid, "create_time": proc.create_time(), "boot_time": boot,
                "cmdline": list(cmdline or proc.cmdline())}
    except (psutil.Error, OSError):
        return None


def matches(ident: dict | None) -> bool:
    """Whether the process recorded as ``ident`` (see ``identity``) still runs: same pid, same
    start time, same command line."""
    import psutil

    if not ident or "create_time" not in ident or "cmdline" not in ident:
        return False
    proc = _process(ident.get("pid"))
    if proc is None:
        return False
    try:
        # A start time is the boot time (wall clock) plus ticks since boot, and each process reads
        # the boot time once: after the clock is stepped (NTP), two processes disagree on every
        # start time by the step. Compared as time since boot, they agree.
        boot = psutil.boot_time()
        started = proc.create_time()
        if "boot_time" in ident:
            started, recorded = started - boot, float(ident["create_time"]) - float(ident["boot_time"])
        else:  # a record from an older spl
            recorded = float(ident["create_time"])
        if abs(started - recorded) > _START_TIME_SLACK_S:
            return False
        return list(proc.cmdline()) == list(ident["cmdline"])
    except (psutil.Error, OSError, TypeError, ValueError):
        return False  # gone meanwhile, or another user's: not the recorded process


def cmdline(pid: int | None) -> list[str] | None:
    """The command line of a running process (None if it is gone or cannot be read)."""
    import psutil

    proc = _process(pid)
    if proc is None:
        return None
    try:
        return list(proc.cmdline())
    except (psutil.Error, OSError):
        return None


def owner(pid: int | None) -> str | None:
    """The user name a process runs as (None if it cannot be read)."""
    import psutil

    proc = _process(pid)
    if proc is None:
        return None
    try:
        return proc.username()
    except (psutil.Error, OSError, KeyError):
        return None


def _gone(proc, timeout: float) -> bool:
    """Wait until the process has exited; a zombie counts as exited (its parent, maybe not
    us, reaps it when it likes). True if it went within ``timeout`` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def terminate(ident: dict, grace: float) -> bool:
    """SIGTERM the recorded process, wait ``grace`` seconds, then SIGKILL.

    True if it stopped by itself (or was already gone). Nothing is signalled unless the live
    process is the recorded one; psutil re-checks the start time right before each signal, so
    a pid reused in between is left alone too.
    """
    import psutil

    if not matches(ident):
        return True
    proc = _process(ident["pid"])
    if proc is None:
        return True
    try:
        proc.terminate()
    except psutil.NoSuchProcess:
        return True
    if _gone(proc, grace):
        return True
    try:
        proc.kill()
    except psutil.NoSuchProcess:
        return False
    _gone(proc, 5.0)
    return False
