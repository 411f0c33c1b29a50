"""One server per session store: two servers on one snapshot directory would both restore the
same sessions and both write their journals, each overwriting the other's. A server holds an
exclusive lock on ``<store>/.spl-server.lock`` while it runs (the kernel drops it when the process
ends, however it ends); a second one is refused before it binds its port, naming the first."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import IO

from superlinear.errors import Conflict

LOCK_NAME = ".spl-server.lock"


def lock_store(root: Path, url: str) -> IO:
    """Hold ``root``'s server lock; keep the returned file open for as long as the server runs."""
    root.mkdir(parents=True, exist_ok=True)
    f = open(root / LOCK_NAME, "a+")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = {}
        with contextlib.suppress(ValueError):
            holder = json.loads(f.read() or "{}")
        f.close()
        who = f"pid {holder.get('pid')}, {holder.get('url')}" if isinstance(holder, dict) and holder else "?"
        raise Conflict(f"the session store {root} is in use by another spl server ({who}); this one is not "
                       "started: stop that one, or give this one its own store with "
                       "SPL_SNAPSHOT_DIR=DIR") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "url": url}))
    f.flush()
    return f
