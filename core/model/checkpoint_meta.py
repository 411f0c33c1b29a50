"""What a model directory says about itself, torch-free: spl's metadata file (written by the
default model's conversion), the weights' fingerprint, and the superlinear attention given to
a model not trained with it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path

from superlinear import paths
from superlinear.errors import InvalidRequest, NotFound

# Attention-only families whose transformers attention module writes through ``cache.update``
# and calls the registered attention function (the retrofit needs nothing else).
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
HYBRID = ("nemotron_h",)
SUPERLINEAR_EXP = "superlinear-exp"

META = "spl.json"  # written last: its presence marks a complete conversion
INDEX = "model.safetensors.index.json"

# Superlinear attention for a model not trained with it: routing query = attention query and a
# window of W = 45**2 - 1 = 2024 tokens, so ordinary chats are computed exactly (plain causal
# attention while the context fits the window); beyond it, 3 spans of ~(3+1)*sqrt(t) keys.
RETROFIT_SPAN = {
    "span_attention_sw_index": 44,
    "span_attention_num_spans": 3,
    "span_attention_backward_factor": 3.0,
    "span_attention_forward_factor": 1.0,
    "span_attention_span_power": 0.5,
    "span_attention_inv_search_power": 2,
}


def family(config: dict, where: str) -> tuple[str, str]:
    """``(kind, routing)`` of a config: how spl runs it and where its routing query comes from."""
    model_type = config.get("model_type")
    if model_type in LLAMA_FAMILY or model_type in HYBRID:
        return f"{model_type} (superlinear retrofit)", "attention query"
    if model_type == SUPERLINEAR_EXP:
        if not any(k.startswith("span_attention_") for k in config):
            raise InvalidRequest(f"{where}: a superlinear-exp config needs the span_attention_* keys")
        return "superlinear-exp", "separate projection (routing_q_proj)"
    raise InvalidRequest(f"{where}: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(LLAMA_FAMILY + HYBRID)}, {SUPERLINEAR_EXP})")


def architecture(config: dict) -> dict:
    """The config keys that make the architecture (the fingerprint's part; not paths or versions)."""
    return {k: v for k, v in config.items()
            if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                         "auto_map", "quantization_config")}


def span_dict(params) -> dict:
    """A ``SpanParams``' set fields by name ({} for None)."""
    if params is None:
        return {}
    return {f.name: getattr(params, f.name) for f in fields(params) if getattr(params, f.name) is not None}


def model_fingerprint(arch_config: dict, attention: str, span_params, routing: str, weights_hash: str) -> str:
    """What identifies a loaded model for snapshots: architecture, attention, span parameters,
    routing and the weights' hash; not its path or name."""
    blob = json.dumps({"config": arch_config, "attention": attention,
                       "span": span_dict(span_params) if attention == "superlinear" else None,
                       "routing": routing, "weights": weights_hash}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_config(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text(), object_hook=_special_floats)
    except FileNotFoundError as exc:
        raise NotFound(f"no config.json in {path}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{Path(path) / 'config.json'} is not valid JSON: {exc}") from exc


def _special_floats(obj: dict):
    # transformers writes inf/nan as {"__float__": "Infinity"} to keep config.json strict JSON.
    if len(obj) == 1 and "__float__" in obj:
        return float(obj["__float__"])
    return obj


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return {}


# Weight files up to this size are hashed whole; larger ones by size, header and 1 MiB of every
# 64 MiB (hashing a 60 GB checkpoint on every start is not affordable). Cached per (path, mtime).
_FULL_HASH_LIMIT = 4 << 30


def shard_files(path: Path) -> list[Path]:
    """The weight files of a model directory: the index's shards, or every ``*.safetensors``."""
    path = Path(path)
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequest(f"{index} is not a safetensors index (no weight_map): {exc}") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise NotFound(f"{index} names shards that are not there: {', '.join(absent[:5])}"
                           + (f" (+{len(absent) - 5} more)" if len(absent) > 5 else ""))
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NotFound(f"no *.safetensors weights in {path}")
    return files


def weights_fingerprint(path: Path, remember: bool = True) -> str:
    files = shard_files(path)  # the files a load reads: a shard the index does not name is not hashed
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = f"{Path(path).resolve()}|{stats}"
    store = paths.cache_dir() / "fingerprints.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if remember and key in known:
        return known[key]
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                while block := fh.read(1 << 23):
                    h.update(block)
            else:
                for offset in range(0, size, 64 << 20):
                    fh.seek(offset)
                    h.update(fh.read(1 << 20))
    digest = h.hexdigest()
    if not remember:
        return digest
    known[key] = digest
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, store)
    except OSError:
        pass
    return digest
