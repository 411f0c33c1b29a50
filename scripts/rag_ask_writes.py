"""Bytes a server writes to disk while it answers `spl rag ask` on a workspace with a context
snapshot (docs/architecture.md quotes it). Starts `spl serve` (the default model, temporary
state and snapshot folders), ingests a generated corpus, then reads the server's
/proc/PID/io write_bytes around one ask.

    python scripts/rag_ask_writes.py [--paragraphs 40]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/PID/io")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--paragraphs", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="spl-rag-writes-"))
    docs = tmp / "docs"
    docs.mkdir()
    for i in range(args.paragraphs):
        (docs / f"note{i:03d}.md").write_text(f"# Note {i}\n\nThe walrus number {i} lives on shelf {i * 7 % 13}. "
                                               "It likes cold water and long naps on the ice.\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SPL_STATE_DIR=str(tmp / "state"), SPL_SNAPSHOT_DIR=str(tmp / "snapshots"),
               SPL_WORKSPACES_DIR=str(tmp / "ws"), SPL_SERVER_URL=f"http://127.0.0.1:{port}")
    env.pop("SPL_API_KEY", None)
    spl = [sys.executable, "-m", "superlinear.cli.main"]
    server = subprocess.Popen([*spl, "serve", "--port", str(port), "--max-seq-len", "8192"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        ingest = json.loads(subprocess.run([*spl, "rag", "ingest", str(docs), "-w", "w", "--json"], env=env,
                                           check=True, capture_output=True, text=True).stdout)
        context = ingest["context"]
        if not context.get("snapshot_id"):
            raise SystemExit(f"no context snapshot was built: {context}")
        snapshot = httpx.get(f"http://127.0.0.1:{port}/v1/snapshots/{context['snapshot_id']}").json()
        before = written(server.pid)
        subprocess.run([*spl, "rag", "ask", "Where does walrus 7 live?", "-w", "w", "--max-tokens", "8"],
                       env=env, check=True, capture_output=True)
        after = written(server.pid)
        print(json.dumps({"context_tokens": context.get("tokens"), "context_snapshot_bytes": snapshot.get("bytes"),
                          "bytes_written_by_the_ask": after - before}))
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
