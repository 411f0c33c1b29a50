"""Shared fixtures. ``default_model`` loads the embedded default model once per test session."""

import pytest


@pytest.fixture(scope="session")
def default_model():
    from superlinear.model import load_model

    return load_model("default")
