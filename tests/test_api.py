"""The API (``superlinear.api``): one scenario (create a session, two turns, fork, save, load,
ask) through ``connect("local")`` and through a real server with ``connect(url)``: the same
results and the very same events. And the notebook example of docs/notebook.md, run as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import comparable, start_server

import superlinear
from superlinear.api import Completion, chat_turn
from superlinear.engine import SamplingParams
from superlinear.errors import NotFound

REPO = Path(__file__).resolve().parents[1]
SESSION_FIELDS = ("id", "position", "max_seq_len", "message_count", "ephemeral")


def turn(api, session_id: str, text: str) -> list:
    events = api.chat(chat_turn([{"role": "user", "content": text}], session_id=session_id, temperature=0.0,
                                max_tokens=6))
    return [comparable(e) for e in events]


def fields(info: dict) -> dict:
    return {k: info[k] for k in SESSION_FIELDS}


def scenario(api) -> list:
    """Everything the scenario returns and yields, in order."""
    out: list = [fields(api.create_session("main"))]
    out.append(turn(api, "main", "Say hello."))
    out.append(turn(api, "main", "And again."))
    out.append(fields(api.fork("main", "branch")))
    snapshot = api.save("branch", title="branch", tags=["scenario"])
    out.append({k: snapshot[k] for k in ("title", "tags")})
    out.append(fields(api.load(snapshot["id"], session_id="asked", ephemeral=True)))
    out.append(turn(api, "asked", "A question?"))
    out.append(api.history("asked"))
    out.append(api.tokenize("hello there")["tokens"])
    out.append([comparable(e) for e in api.chat(chat_turn([{"role": "user", "content": "No session."}],
                                                          temperature=0.0, max_tokens=4))])
    plain = Completion("Once upon a time", SamplingParams(temperature=0.0, max_tokens=4))
    out.append([comparable(e) for e in api.complete(plain)])
    with pytest.raises(NotFound):
        api.get_session("nope")
    out.append(api.close_session("asked")["id"])
    out.append(sorted(s["id"] for s in api.list_sessions()["sessions"]))
    return out


def test_the_same_scenario_in_process_and_over_http_gives_the_same_events(tiny_llama, tmp_path):
    local = superlinear.connect("local", model=str(tiny_llama), max_seq_len=2048,
                                snapshots_dir=str(tmp_path / "local-snapshots"))
    try:
        in_process = scenario(local)
    finally:
        local.close()
    server = start_server(api_key=None, extra_args=("--model", str(tiny_llama)))
    try:
        with superlinear.connect(server.url) as remote:
            over_http = scenario(remote)
    finally:
        server.stop()
        shutil.rmtree(server.tmp, ignore_errors=True)
    assert over_http == in_process
    first_turn = in_process[1]
    assert [type(e).__name__ for e in first_turn[:2]] == ["Started", "PrefillProgress"]
    assert [type(e).__name__ for e in first_turn[-2:]] == ["Persisted", "Done"]
    asked = in_process[6]
    assert asked[-2].ok is False  # an ephemeral session's turn is never written to disk


def test_the_notebook_example_runs_as_written(tiny_llama, tmp_path):
    """docs/notebook.md's code blocks, in order, in a fresh interpreter."""
    text = (REPO / "docs" / "notebook.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    assert "superlinear.connect(" in code
    env = dict(os.environ, SPL_MODEL=str(tiny_llama), SPL_SNAPSHOT_DIR=str(tmp_path / "snapshots"),
               SPL_STATE_DIR=str(tmp_path / "state"), OMP_NUM_THREADS="1")
    env.pop("SPL_SERVER_URL", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokens in the answer:" in r.stdout
