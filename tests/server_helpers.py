"""One real spl server (a subprocess on a free port, the default model) shared by the server
and admin test modules of a pytest run, plus helpers to talk to it.

The server gets its own SPL_STATE_DIR and SPL_SNAPSHOT_DIR (temporary), but keeps
XDG_CACHE_HOME, so the converted default model is reused, not converted again.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

API_KEY = "test-key-123"
MAX_CONCURRENCY = 4
TINY_BUDGET = 8 << 20  # the memory budget of conftest's ``tiny_server`` (~28 of its sessions)
TINY_MAX_SEQ_LEN = 64  # its default max_seq_len: every generation there stays short
SHUTDOWN_BUDGET = 32 << 20  # the memory budget of conftest's ``persist_shutdown_server``
SHUTDOWN_SESSION_LEN = 4096  # its sessions' length: 2 MiB of the tiny llama's KV each, allocated up front


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    api_key: str | None
    proc: subprocess.Popen
    tmp: Path
    log: Path

    @property
    def env(self) -> dict:
        """Environment for `spl` subprocesses that should talk to this server."""
        env = dict(os.environ)
        env.update({
            "SPL_SERVER_URL": self.url,
            "SPL_STATE_DIR": str(self.tmp / "client-state"),
            "SPL_SNAPSHOT_DIR": str(self.tmp / "snapshots"),
        })
        if self.api_key:
            env["SPL_API_KEY"] = self.api_key
        else:
            env.pop("SPL_API_KEY", None)
        return env

    def http(self, auth: bool = True, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if auth and self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_server(api_key: str | None = API_KEY, max_concurrency: int = MAX_CONCURRENCY,
                 extra_args: tuple[str, ...] = (), tmp: Path | None = None,
                 file_size_limit: int | None = None) -> RunningServer:
    """Start `spl serve`; ``tmp`` reuses the directories of an earlier server (a restart).
    ``file_size_limit``: no file the server writes may grow past this many bytes (RLIMIT_FSIZE:
    the kernel fails the write with EFBIG, as a full disk fails it with ENOSPC)."""
    tmp = Path(tmp) if tmp is not None else Path(tempfile.mkdtemp(prefix="spl-server-test-"))
    port = free_port()
    env = dict(os.environ)
    (tmp / "tmp").mkdir(exist_ok=True)  # the server's temporary files (uploads, exports): tests look for leaks
    env.update({"SPL_STATE_DIR": str(tmp / "state"), "SPL_SNAPSHOT_DIR": str(tmp / "snapshots"),
                "TMPDIR": str(tmp / "tmp"), "PYTHONUNBUFFERED": "1"})
    env.pop("SPL_API_KEY", None)
    args = [sys.executable, "-m", "superlinear.cli.main", "serve", "--port", str(port),
            "--max-concurrency", str(max_concurrency), "--max-seq-len", "2048", *extra_args]
    if api_key:
        args += ["--api-key", api_key]
    log = tmp / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_limit_files(file_size_limit) if file_size_limit else None)
    server = RunningServer(f"http://127.0.0.1:{port}", api_key, proc, tmp, log)
    try:
        wait_healthy(server.url, proc, lambda: log.read_text()[-3000:])
    except RuntimeError:
        server.stop()
        raise
    return server


def wait_healthy(url: str, proc: subprocess.Popen, output, timeout: float = 300) -> None:
    """Until the server at ``url`` (run by ``proc``) answers /health "ok"; ``output()``, the
    server's last output, goes into the error if it exits or never gets ready."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"spl serve exited: {output()}")
        try:
            if httpx.get(url + "/health", timeout=1.0).json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"spl serve did not get ready: {output()}")
        time.sleep(0.1)


def _limit_files(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail

    return apply


_shared: RunningServer | None = None


def shared_server() -> RunningServer:
    """The server shared by every test module of this pytest process (started on first use)."""
    global _shared
    if _shared is None or _shared.proc.poll() is not None:
        _shared = start_server()
        atexit.register(_cleanup, _shared)
    return _shared


def _cleanup(server: RunningServer) -> None:
    server.stop()
    shutil.rmtree(server.tmp, ignore_errors=True)


def spl(server: RunningServer, *args: str, env: dict | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `spl` CLI against ``server``."""
    return subprocess.run([sys.executable, "-m", "superlinear.cli.main", *args], capture_output=True,
                          text=True, env=env or server.env, timeout=timeout)


def openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """The error of an OpenAI-style error answer, checked: the status, the four fields, a message
    (and ``code`` if given)."""
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def sse_chunks(response: httpx.Response):
    """The JSON chunks of a streamed response (``data:`` lines before ``[DONE]``), each checked
    not to be an error body."""
    import json

    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        yield chunk


def comparable(event):
    """An event without what differs between two runs of the same turn: times."""
    import dataclasses

    from superlinear.api import Done, PrefillProgress

    if isinstance(event, PrefillProgress):
        return dataclasses.replace(event, elapsed_s=0.0)
    if isinstance(event, Done):
        return dataclasses.replace(event, timings={})
    return event


def declared_values(request_type: type) -> dict:
    """A valid value other than the default for each field the engine's ``request_type`` declares
    for clients (``request_field`` with a ``doc``), from its type and bounds: a new field is
    walked by the tests that use these without being written into them."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(request_type)
    values = {}
    for f in dataclasses.fields(request_type):
        if "doc" not in f.metadata:
            continue
        hint, bounds = str(hints[f.name]), f.metadata["bounds"]
        if hints[f.name] is bool:
            values[f.name] = not f.default
        elif hint.startswith("dict"):
            values[f.name] = {7: 1.5}
        elif hint.startswith("list"):
            values[f.name] = [7]
        else:
            low, high = bounds.get("ge", bounds.get("gt", 0)), bounds.get("le", 100)
            value = (low + high) / 2 if "float" in hint else (low + high) // 2
            values[f.name] = value if value != f.default else value + 1
    return values
