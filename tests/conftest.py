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
