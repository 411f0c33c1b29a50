"""`spl serve` with a model spec no loader knows: one error line and exit 2, before the port
is bound (no uvicorn start-up lines); a model that fails to load: the error is the last line."""

from __future__ import annotations

import os
import subprocess
import sys

from server_helpers import free_port


def test_serve_unknown_model_fails_before_binding(tmp_path):
    env = dict(os.environ, SPL_STATE_DIR=str(tmp_path / "state"), SPL_SNAPSHOT_DIR=str(tmp_path / "s"))
    r = subprocess.run([sys.executable, "-m", "superlinear.cli.main", "serve", "--model", "nope", "--port",
                        str(free_port())], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == [
        "spl: error: unknown model 'nope': use `default`, a local model directory (config.json + safetensors + "
        "tokenizer) or a hub id like org/name"], r.stderr
    assert r.stdout == ""  # no "serving …", no uvicorn lines: nothing was started


def test_serve_broken_model_ends_with_the_error(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    env = dict(os.environ, SPL_STATE_DIR=str(tmp_path / "state"), SPL_SNAPSHOT_DIR=str(tmp_path / "s"))
    r = subprocess.run([sys.executable, "-m", "superlinear.cli.main", "serve", "--model", str(broken), "--port",
                        str(free_port())], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"spl: error: loading model {broken} failed: ") and "config.json" in last, r.stderr
