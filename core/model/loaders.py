"""Turn a ``--model`` value into a ``Model``.

The built-in loaders live in ``superlinear.model.registry`` (``default``, a local directory, a
hub id). ``load_model`` asks the loaders its caller passes first (the plugins' loaders, which the
plugin layer collects from ``register_model_loaders``), then the built-in ones. ``load_dir``
builds the model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from superlinear.errors import InvalidRequest, Unavailable
from superlinear.model.cache import CacheLayout
from superlinear.model.checkpoint_meta import (
    HYBRID,
    LLAMA_FAMILY,
    RETROFIT_SPAN,
    SUPERLINEAR_EXP,
    architecture,
    family,
    read_config,
    read_meta,
    shard_files,
    weights_fingerprint,
)
from superlinear.model.model import Model

from . import attention as attention_mod
from . import layer_types, weights

log = logging.getLogger("spl.model")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
             "float32": torch.float32, "float": torch.float32}
    if str(dtype).lower() not in table:
        raise InvalidRequest(f"unknown dtype {dtype!r}: use bf16, fp16 or fp32")
    return table[str(dtype).lower()]


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------

def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "SPL_OFFLINE", "TRANSFORMERS_OFFLINE"))


def download(repo_id: str) -> Path:
    """Fetch the files a model needs from the hub (or its local hub cache); one clear line if
    the hub cannot be reached."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"],
            local_files_only=offline(), etag_timeout=10,
        )
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = "offline mode (HF_HUB_OFFLINE) and not in the local hub cache" if offline() else reason
        raise Unavailable(f"cannot fetch model {repo_id!r} from the Hugging Face hub: {where[:200]}; "
                          f"pass a local directory or `default`") from exc
    return Path(path)


# ---------------------------------------------------------------------------------------------
# building a model from a directory
# ---------------------------------------------------------------------------------------------

def load_dir(path: Path, *, name: str, device=None, dtype=None, attention: str = "superlinear",
             cuda_graph: bool | None = None, backend: str | None = None, span_params=None) -> Model:
    path = Path(path)
    config = read_config(path)
    model_type = config.get("model_type")
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    hf, kind, routing = build_empty(config, where=str(path / "config.json"))
    load_weights(hf, path, checkpoint_names(model_type), device, dtype)
    hf.eval()
    tokenizer = load_tokenizer(path)
    if span_params is None:
        span_params = span_params_from(config)
    meta = read_meta(path)
    weights_hash = meta.get("weights_hash") or weights_fingerprint(path)
    arch = architecture(config)
    return Model(hf, tokenizer, name=name, kind=kind, layout=layout_of(hf.config),
                 span_params=span_params, attention=attention, routing=routing, source=str(path),
                 bytes_on_disk=dir_bytes(path), weights_hash=weights_hash, arch_config=arch,
                 cuda_graph=cuda_graph, backend=backend)


def build_empty(config: dict, *, where: str):
    """The transformers module (meta weights) for a config: ``(hf, kind, routing)``."""
    kind, routing = family(config, where)  # refuses an unsupported model_type
    attention_mod.register()  # the modules are built for attn_implementation "spl"
    model_type = config.get("model_type")
    if model_type in LLAMA_FAMILY:
        return _build_auto(config), kind, routing
    if model_type in HYBRID:
        from superlinear.model.superlinear_exp import nemotron_config

        return _build_nemotron(nemotron_config(config)), kind, routing
    from superlinear.model.superlinear_exp import build

    return build(config), kind, routing


def span_params_from(config: dict):
    from superlinear.kernels import SpanParams

    keys = {k: v for k, v in config.items() if k.startswith("span_attention_")}
    try:
        return SpanParams.from_config(keys or RETROFIT_SPAN)
    except ValueError as exc:
        raise InvalidRequest(f"bad span_attention_* config: {exc}") from exc


def _build_auto(config: dict):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    body = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
    cfg = CONFIG_MAPPING[config["model_type"]].from_dict(body)
    cfg._attn_implementation = attention_mod.ATTN_IMPLEMENTATION
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attention_mod.ATTN_IMPLEMENTATION)


def _build_nemotron(cfg):
    from transformers import NemotronHForCausalLM

    cfg._attn_implementation = attention_mod.ATTN_IMPLEMENTATION
    with torch.device("meta"):
        return NemotronHForCausalLM(cfg)


def checkpoint_names(model_type: str | None) -> weights.TargetFn:
    """How a family's checkpoint names map to our parameters (``weights.Target``)."""
    if model_type in HYBRID + (SUPERLINEAR_EXP,):
        from superlinear.model.superlinear_exp import checkpoint_target

        return checkpoint_target
    return weights.same_name


# how messages to users name the layer kinds
_KIND_NAMES = {layer_types.ATTENTION: "attention", layer_types.MAMBA: "mamba", layer_types.MOE: "moe",
               layer_types.MLP: "mlp"}


def layer_kinds(hf) -> list[str]:
    """Each layer's type as users name it (attention, mamba, moe, mlp)."""
    types = layer_types.from_config(hf.config) or [layer_types.ATTENTION] * hf.config.num_hidden_layers
    return [_KIND_NAMES[t] for t in types]


def load_weights(hf, path: Path, target_of: weights.TargetFn, device: torch.device, dtype: torch.dtype) -> None:
    """Stream the directory's checkpoint into ``hf`` (meta weights) on ``device``; one error that
    lists every tensor that does not fit, before any weight is read."""
    plan = weights.plan_load(hf, weights.read_entries(shard_files(path)), target_of)
    if not plan.ok:
        raise InvalidRequest(weights.mismatch_message(plan, where=path, model=type(hf).__name__,
                                                      layer_kinds=layer_kinds(hf)))
    if plan.ignored:
        log.warning("%s: ignored %d checkpoint tensors inference does not use (%s)", path, len(plan.ignored),
                    weights.show_names(plan.ignored))
    weights.stream_weights(hf, plan, device, dtype)
    weights.materialize_buffers(hf, device)
    unset = weights.unset_tensors(hf)
    if unset:
        raise InvalidRequest(f"weights in {path} leave parameters unset: {', '.join(unset[:12])}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: Path):
    """The directory's tokenizer; None when it has no tokenizer files at all (a weights-only
    directory still runs prefill/decode, e.g. for benchmarks; chat needs a tokenizer)."""
    from transformers import AutoTokenizer

    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise InvalidRequest(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0][:200]}") from exc
    return tok


def layout_of(cfg) -> CacheLayout:
    types = layer_types.from_config(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if not types:
        return CacheLayout(tuple(range(cfg.num_hidden_layers)), cfg.num_key_value_heads, head_dim)
    attn = tuple(i for i, t in enumerate(types) if t == layer_types.ATTENTION)
    mamba = tuple(i for i, t in enumerate(types) if t == layer_types.MAMBA)
    inner = cfg.mamba_num_heads * cfg.mamba_head_dim
    conv_dim = inner + 2 * cfg.n_groups * cfg.ssm_state_size
    return CacheLayout(attn, cfg.num_key_value_heads, head_dim, mamba,
                       conv_shape=(conv_dim, cfg.conv_kernel),
                       ssm_shape=(cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())



