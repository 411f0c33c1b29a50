"""What a user switching from vLLM or llama.cpp types works: `spl serve MODEL --max-model-len N
--served-model-name X` (vLLM's flags), `-m` / `-c` / `--ctx-size` (llama.cpp's), and the client
commands driven by the OpenAI client's variables (`OPENAI_BASE_URL`, `OPENAI_API_KEY`), with a
base URL that ends in /v1 or not. One real server on a free port (a tiny llama: fast to load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from server_helpers import free_port

KEY = "switch-key-7"


@pytest.fixture(scope="module")
def vllm_style_server(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("switch")
    port = free_port()
    env = dict(os.environ, SPL_STATE_DIR=str(tmp / "state"), SUPERLINEAR_SNAPSHOT_DIR=str(tmp / "snapshots"),
               SPL_API_KEY=KEY)
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below
    # exactly how one starts vLLM (the model positional, its flag names); the key from the environment
    proc = subprocess.Popen([sys.executable, "-m", "superlinear.cli.main", "serve", str(tiny_llama),
                             "--max-model-len", "512", "--served-model-name", "tiny-chat", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, (tmp / "server.log").read_text()
        try:
            if httpx.get(url + "/health", timeout=1).json().get("status") == "ok":
                break
        except (httpx.HTTPError, ValueError):
            pass
        assert time.monotonic() < deadline, (tmp / "server.log").read_text()
        time.sleep(0.2)
    yield url, tmp
    proc.terminate()
    proc.wait(30)
    log.close()


def test_vllm_style_command_line_serves_the_name_and_limit(vllm_style_server):
    url, _ = vllm_style_server
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-chat"]
    assert models[0].model_extra["max_model_len"] == 512
    done = client.completions.create(model="tiny-chat", prompt="hello", max_tokens=2, temperature=0)
    assert done.model == "tiny-chat" and done.usage.completion_tokens >= 1


def client_env(tmp, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPL_", "OPENAI_"))}
    env.update(SPL_STATE_DIR=str(tmp / "client-state"), **extra)
    return env


def spl(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "superlinear.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=180)


def test_openai_base_url_alone_drives_ls_and_chat(vllm_style_server):
    url, tmp = vllm_style_server
    env = client_env(tmp, OPENAI_BASE_URL=url + "/v1", OPENAI_API_KEY=KEY)
    r = spl(env, "chat", "--once", "hi", "--max-tokens", "3", "--temp", "0", "--session", "via-openai-env",
            "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["session_id"] == "via-openai-env"
    r = spl(env, "ls", "--json")
    assert r.returncode == 0, r.stderr
    assert "via-openai-env" in [s["id"] for s in json.loads(r.stdout)["sessions"]["data"]]


def test_spl_server_url_with_v1_and_the_missing_key_hint(vllm_style_server):
    url, tmp = vllm_style_server
    r = spl(client_env(tmp, SPL_SERVER_URL=url + "/v1/", SPL_API_KEY=KEY), "session", "ls", "--json")
    assert r.returncode == 0, r.stderr  # not "no route GET /v1/v1/sessions"
    # one shape for one listing: `spl session ls --json`, `spl ls --json` and GET /v1/sessions
    http = httpx.get(url + "/v1/sessions", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert json.loads(r.stdout) == http and http["object"] == "list" and http["data"]
    r = spl(client_env(tmp, SPL_SERVER_URL=url, SPL_API_KEY=KEY), "ls", "--json")
    assert json.loads(r.stdout)["sessions"] == http
    r = spl(client_env(tmp, SPL_SERVER_URL=url), "session", "ls")
    assert r.returncode == 2 and "missing API key" in r.stderr and "SPL_API_KEY" in r.stderr, r.stderr


def test_llama_cpp_and_vllm_flag_names_resolve(monkeypatch):
    """-m, -c, --ctx-size and --max-model-len set the same options as --model and --max-seq-len."""
    import click
    from click.testing import CliRunner

    from superlinear.settings.options import server_options

    for name in list(os.environ):
        if name.startswith("SPL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SPL_CONFIG", os.devnull)

    @click.command()
    @server_options
    def probe(options):
        click.echo(json.dumps([options.model, options.max_seq_len, options.served_model_name]))

    cases = {("-m", "m1", "-c", "4096"): ["m1", 4096, None],
             ("--ctx-size", "2048", "m2"): ["m2", 2048, None],
             ("m3", "--max-model-len", "1024", "--served-model-name", "x"): ["m3", 1024, "x"]}
    for args, expected in cases.items():
        result = CliRunner().invoke(probe, list(args))
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == expected
    result = CliRunner().invoke(probe, ["m1", "--model", "m2"])
    assert result.exit_code == 2 and "two models given" in result.output
