"""What a model directory is, from its config.json and the safetensors headers alone, without
torch: ``spl models info`` answers in well under a second this way (loading the model to ask it
took 10-14 s on a small machine, most of it importing torch and reading the weights).

The keys are those of ``Model.info()`` that do not need the model in memory; the forward paths
and the CUDA graph do, so ``spl models info --load`` (or ``--device``/``--dtype``) loads it.
"""

from __future__ import annotations

import os
from pathlib import Path

from superlinear.errors import InvalidRequest
from superlinear.model import layer_types
from superlinear.model.checkpoint_meta import (
    RETROFIT_SPAN,
    architecture,
    family,
    model_fingerprint,
    read_config,
    read_meta,
    shard_files,
    span_dict,
    weights_fingerprint,
)

_ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# What a Nemotron-H layout needs from the config; a config that leaves one to transformers'
# defaults is summarised by loading the model instead.
_MAMBA_KEYS = ("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel")


def would_load_on() -> tuple[str, str]:
    """``(device, dtype)`` a load without options picks (``loaders.default_device`` and
    ``default_dtype``), guessed without torch: CUDA when an NVIDIA device node exists."""
    if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl"):
        return "cuda", "bfloat16"
    return "cpu", "float32"


def _header_tensors(files: list[Path]) -> list[tuple[str, list[int]]]:
    from safetensors import SafetensorError, safe_open

    tensors = []
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as fh:
                tensors += [(name, fh.get_slice(name).get_shape()) for name in fh.keys()]
        except (SafetensorError, OSError) as exc:
            raise InvalidRequest(f"{file} is not a readable safetensors file: {exc}") from exc
    return tensors


def _layout(config: dict, types: list[str] | None) -> dict | None:
    """Attention layers, KV heads, head dim and the Mamba state's shapes; None when the config
    leaves any of them to transformers' defaults."""
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads and config.get("hidden_size")
                                          else None)
    if not (kv_heads and head_dim and (types or config.get("num_hidden_layers"))):
        return None
    if not types:
        return {"attention": config["num_hidden_layers"], "kv_heads": kv_heads, "head_dim": head_dim,
                "mamba": 0, "conv": 0, "ssm": 0}
    if any(config.get(k) is None for k in _MAMBA_KEYS):
        return None
    inner = config["mamba_num_heads"] * config["mamba_head_dim"]
    return {"attention": types.count(layer_types.ATTENTION), "kv_heads": kv_heads, "head_dim": head_dim,
            "mamba": types.count(layer_types.MAMBA),
            "conv": (inner + 2 * config["n_groups"] * config["ssm_state_size"]) * config["conv_kernel"],
            "ssm": config["mamba_num_heads"] * config["mamba_head_dim"] * config["ssm_state_size"]}


def summarize(path: Path, name: str) -> dict | None:
    """``Model.info()``'s keys for the model directory ``path`` (less the forward paths), or
    None when the config alone cannot say (then load the model to ask it)."""
    from superlinear.kernels.attention.params import SpanParams

    path = Path(path)
    config = read_config(path)
    kind, routing = family(config, str(path / "config.json"))
    types = layer_types.from_config(config)
    layout = _layout(config, types)
    if layout is None:
        return None
    device, dtype = would_load_on()
    element = _ELEMENT_BYTES[dtype]
    keys = {k: v for k, v in config.items() if k.startswith("span_attention_")}
    try:
        span = SpanParams.from_config(keys or RETROFIT_SPAN)
    except ValueError as exc:
        raise InvalidRequest(f"bad span_attention_* config: {exc}") from exc
    files = shard_files(path)
    parameters = sum(_numel(shape) for _, shape in _header_tensors(files))
    kinds = types or [layer_types.ATTENTION] * config["num_hidden_layers"]
    weights_hash = read_meta(path).get("weights_hash") or weights_fingerprint(path)
    return {
        "name": name,
        "kind": kind,
        "source": str(path),
        "parameters": parameters,
        "bytes_on_disk": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "dtype": dtype,
        "device": device,
        "attention": {"mode": "superlinear", "routing_query": routing, **span_dict(span), "window": span.window_len},
        "kv_bytes_per_token": layout["attention"] * 2 * layout["kv_heads"] * layout["head_dim"] * element,
        # SSM state is kept in fp32 (it accumulates over the whole sequence)
        "recurrent_bytes_per_sequence": layout["mamba"] * (layout["conv"] * element + layout["ssm"] * 4),
        "layers": len(kinds),
        "layer_types": {k: kinds.count(k) for k in dict.fromkeys(kinds)},
        "vocab_size": int(config.get("vocab_size") or 0),
        "max_position_embeddings": int(config.get("max_position_embeddings") or 0),
        "loaded": False,
        "fingerprint": model_fingerprint(architecture(config), "superlinear", span, routing, weights_hash),
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
