"""``--threads`` / ``$SPL_THREADS`` / ``threads`` in [server]: torch's CPU threads in the server,
reported by /health and `spl server status`."""

from __future__ import annotations

import pytest
from server_helpers import spl

from superlinear.settings import threads


def test_a_server_started_with_threads_1_runs_torch_on_one_thread(one_thread_server):
    server = one_thread_server  # conftest's: started with --threads 1
    with server.http() as http:
        assert http.get("/health").json()["threads"] == 1  # torch.get_num_threads() on the worker
        # the model still answers on one thread
        r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
    status = spl(server, "server", "status")
    assert "threads 1" in status.stdout, status.stdout


def test_threads_resolve_from_env_and_config(tmp_path, monkeypatch):
    from superlinear.settings.options import resolve_options

    config = tmp_path / "config.toml"
    config.write_text("[server]\nthreads = 3\n")
    monkeypatch.setenv("SPL_CONFIG", str(config))
    monkeypatch.delenv("SPL_THREADS", raising=False)
    options, sources = resolve_options()
    assert (options.threads, sources["threads"]) == (3, "config")
    assert "--threads" in options.to_args() and options.to_args()[options.to_args().index("--threads") + 1] == "3"
    monkeypatch.setenv("SPL_THREADS", "2")
    assert resolve_options()[0].threads == 2
    assert resolve_options(threads=5)[0].threads == 5
    monkeypatch.setenv("SPL_THREADS", "0")
    with pytest.raises(Exception, match="SPL_THREADS"):
        resolve_options()


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (4, 4), (8, 8), (64, 8)])
def test_default_threads(monkeypatch, cores, expected):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    assert threads.default_threads() == expected


def test_usable_cores_is_within_the_affinity():
    import os

    assert 1 <= threads.usable_cores() <= len(os.sched_getaffinity(0))
