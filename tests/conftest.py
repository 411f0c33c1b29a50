"""Shared fixtures. ``default_model`` loads the embedded default model once per test session;
``sleeper`` is an unrelated live process (a real ``sleep``) whose pid tests can misuse."""

import subprocess

import pytest


@pytest.fixture(scope="session")
def default_model():
    from superlinear.model import load_model

    return load_model("default")


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random llama with the default model's tokenizer (``sessions_tiny``): for servers
    whose tests need real model code but not the default model's speed or text."""
    from sessions_tiny import write_tiny_llama_with_default_tokenizer

    return write_tiny_llama_with_default_tokenizer(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_server(tiny_llama):
    """One real server on ``tiny_llama`` with a small memory budget, shared by the bad-input
    sweep and the memory-budget tests (a server start costs seconds)."""
    import shutil

    from server_helpers import TINY_BUDGET, TINY_MAX_SEQ_LEN, start_server

    server = start_server(api_key=None, extra_args=("--model", str(tiny_llama), "--memory-budget", str(TINY_BUDGET),
                                                    "--max-seq-len", str(TINY_MAX_SEQ_LEN)))
    yield server
    server.stop()
    shutil.rmtree(server.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def persist_shutdown_server(tiny_llama):
    """One real server on ``tiny_llama`` with ``--persist shutdown`` (sessions reach disk only at
    a clean stop, so past its memory budget it refuses instead of evicting), a small budget and 4K
    sessions: shared by the budget-refusal tests and the check that a turn writes no journal.
    Also ``--lenient-fields`` (an unknown chat or completion field is ignored and logged, which
    none of those tests sends) for the test of that flag."""
    import shutil

    from server_helpers import SHUTDOWN_BUDGET, SHUTDOWN_SESSION_LEN, start_server

    server = start_server(api_key=None, extra_args=("--model", str(tiny_llama), "--persist", "shutdown",
                                                    "--memory-budget", str(SHUTDOWN_BUDGET),
                                                    "--max-seq-len", str(SHUTDOWN_SESSION_LEN), "--lenient-fields"))
    yield server
    server.stop()
    shutil.rmtree(server.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def one_thread_server():
    """One real default-model server on one torch thread (``--threads 1``: a prefill's pace does
    not depend on the cores), an 8K context and 256-token scheduler steps and prefill chunks
    (a long prompt is many steps), shared by the scheduler's timing tests, the ``--threads``
    test and the pty ingest's progress bar."""
    import shutil

    from server_helpers import start_server

    server = start_server(api_key=None, extra_args=("--threads", "1", "--max-seq-len", "8192",
                                                    "--max-step-tokens", "256", "--chunk-size", "256"))
    yield server
    server.stop()
    shutil.rmtree(server.tmp, ignore_errors=True)


# The one default-model server of the run (server_helpers.shared_server) and its clients, for the
# test modules that need no server of their own (a module's own ``server`` fixture wins).
@pytest.fixture(scope="module")
def server():
    from server_helpers import shared_server

    return shared_server()


@pytest.fixture(scope="module")
def http(server):
    with server.http(timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    """The official OpenAI client on the shared server."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=300)
