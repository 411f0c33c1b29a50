"""The config file (TOML, `[server]`): precedence flag > environment > file > default, shared by
`spl serve`/`spl server start` and the client, and one clear line (exit 2) for a bad file.
No model is loaded here."""

from __future__ import annotations

import json

import pytest
from cli_helpers import isolated_env, one_error_line, run_spl

from superlinear.errors import InvalidRequest


def write_config(tmp_path, text: str):
    path = tmp_path / "config" / "spl" / "config.toml"  # $XDG_CONFIG_HOME/spl/config.toml
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def config_env(tmp_path, monkeypatch):
    for key, value in isolated_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    for key in list(__import__("os").environ):
        if key.startswith("SPL_") and key not in ("SPL_STATE_DIR",):
            monkeypatch.delenv(key, raising=False)
    return tmp_path


def test_precedence_flag_env_file_default(config_env, monkeypatch):
    from superlinear.settings.options import resolve_options

    write_config(config_env, '[server]\nport = 9101\nmodel = "from-file"\nmemory_budget = "2GB"\n'
                             'max_seq_len = 4096\npersist = "shutdown"\nlog_level = "WARNING"\n')
    options, sources = resolve_options()
    assert (options.port, options.model, options.memory_budget) == (9101, "from-file", 2 << 30)
    assert (options.max_seq_len, options.persist, options.log_level) == (4096, "shutdown", "warning")
    assert options.host == "127.0.0.1" and sources["host"] == "default" and sources["port"] == "config"

    monkeypatch.setenv("SPL_PORT", "9102")
    monkeypatch.setenv("SPL_MODEL", "from-env")
    options, sources = resolve_options()
    assert (options.port, options.model, sources["port"]) == (9102, "from-env", "$SPL_PORT")
    assert options.memory_budget == 2 << 30  # the file still fills what the environment leaves out

    options, sources = resolve_options(port=9103, model=None)
    assert (options.port, options.model, sources["port"], sources["model"]) == (9103, "from-env", "flag", "$SPL_MODEL")


def test_spl_config_overrides_the_location(config_env, monkeypatch, tmp_path):
    from superlinear.settings.options import resolve_options

    write_config(config_env, "[server]\nport = 9101\n")
    other = tmp_path / "elsewhere.toml"
    other.write_text("[server]\nport = 9201\n")
    monkeypatch.setenv("SPL_CONFIG", str(other))
    assert resolve_options()[0].port == 9201
    monkeypatch.setenv("SPL_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(InvalidRequest, match="does not exist"):
        resolve_options()


@pytest.mark.parametrize("text, expected", [
    ("[server\nport = 1", "is not valid TOML"),
    ("[server]\nprot = 9000\n", "unknown key 'prot' in [server]"),
    ("[server]\nport = \"nine\"\n", "[server] port must be an integer"),
    ("[server]\nport = 70000\n", "[server] port must be between 0 and 65535"),
    ("[server]\nport = true\n", "[server] port must be an integer"),
    ("[server]\npersist = \"never\"\n", "[server] persist must be one of turn, shutdown"),
    ("[server]\nmemory_budget = \"lots\"\n", "[server] memory_budget not a size"),
    ("[sever]\nport = 9000\n", "unknown table or key 'sever'"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(config_env, text, expected):
    from superlinear.settings.config import read_config

    path = write_config(config_env, text)
    with pytest.raises(InvalidRequest) as caught:
        read_config()
    assert str(path) in caught.value.message and expected in caught.value.message
    assert len(caught.value.message.splitlines()) == 1


def test_every_command_reports_a_bad_config_file(tmp_path):
    path = write_config(tmp_path, "[server]\nport = 70000\n")
    env = isolated_env(tmp_path)
    for args in (("server", "status"), ("serve",), ("server", "start"), ("chat", "--once", "hi"), ("ls",)):
        line = one_error_line(run_spl(env, *args, timeout=60))
        assert str(path) in line and "[server] port must be between 0 and 65535" in line, (args, line)


def test_a_bad_environment_value_is_one_line(tmp_path):
    line = one_error_line(run_spl(isolated_env(tmp_path, SPL_PORT="eighty"), "server", "status"))
    assert "$SPL_PORT must be an integer" in line


def test_server_config_shows_values_and_sources(tmp_path):
    path = write_config(tmp_path, '[server]\nport = 9301\napi_key = "secret-key"\n')
    env = isolated_env(tmp_path, SPL_MAX_SEQ_LEN="2048")
    result = run_spl(env, "server", "config", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["config_file"] == str(path) and data["config_file_exists"]
    settings = data["settings"]
    assert settings["port"] == {"value": 9301, "source": "config", "env": "SPL_PORT"}
    assert settings["max_seq_len"]["value"] == 2048 and settings["max_seq_len"]["source"] == "$SPL_MAX_SEQ_LEN"
    assert settings["api_key"]["value"] == "***" and "secret-key" not in result.stdout
    assert data["url"] == "http://127.0.0.1:9301"
    # The client side resolves the same port: with no server running it would talk to (and
    # start one at) the configured port.
    status = json.loads(run_spl(env, "server", "status", "--json").stdout)
    assert status["url"] == "http://127.0.0.1:9301" and status["source"] == "configured"
