"""``spl models check DIR``: what a checkpoint directory is and whether it loads, from the files'
headers alone (the module is built on the meta device; no weight is read).

The report: architecture, layers by type, the checkpoint's files and dtypes, every checkpoint
tensor with our parameter it goes to (or why not: ignored, unexpected, wrong shape, duplicate),
the missing parameters, the superlinear attention parameters and window, and the memory a
sequence needs (weights + KV + recurrent state) at 128K, 1M and 10M tokens.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from superlinear.errors import NotFound
from superlinear.model.checkpoint_meta import family, read_config, shard_files

CONTEXTS = {"128K": 128 << 10, "1M": 1 << 20, "10M": 10 << 20}


def check_dir(path, dtype=None) -> dict:
    """The report for model directory ``path``; ``dtype``: the weights' dtype once loaded
    (default bf16, what a GPU load uses)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise NotFound(f"{path} is not a directory: give a model directory (config.json + *.safetensors)")
    config = read_config(path)
    family(config, str(path / "config.json"))  # an unsupported model_type
    files = shard_files(path)  # what is not a checkpoint is refused before torch is imported (seconds)
    import torch

    from superlinear.model import loaders, weights

    dtype = loaders.parse_dtype(dtype) or torch.bfloat16
    hf, kind, routing = loaders.build_empty(config, where=str(path / "config.json"))
    entries = weights.read_entries(files)
    plan = weights.plan_load(hf, entries, loaders.checkpoint_names(config.get("model_type")))
    span = loaders.span_params_from(config)
    layout = loaders.layout_of(hf.config)
    kinds = loaders.layer_kinds(hf)
    dtypes: dict[str, int] = {}
    for entry in entries:
        dtypes[entry.dtype] = dtypes.get(entry.dtype, 0) + 1
    problems: dict[str, list[str]] = {}
    for what, name in plan.problems():
        problems.setdefault(what, []).append(name)
    weight_bytes = sum(meta.numel() * torch.empty((), dtype=weights.target_dtype(hf, name, meta, dtype)).element_size()
                       for name, meta in plan.expected.items() if not (plan.tied and name == "lm_head.weight"))
    kv = layout.kv_bytes_per_token(dtype)
    recurrent = layout.recurrent_bytes(dtype)
    return {
        "path": str(path),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures") or [],
        "kind": kind,
        "routing_query": routing,
        "layers": len(kinds),
        "layer_types": {k: kinds.count(k) for k in dict.fromkeys(kinds)},
        "checkpoint": {"files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files),
                       "tensors": len(entries), "dtypes": dtypes},
        "tensors": [{"name": s.entry.name, "dtype": s.entry.dtype, "shape": list(s.entry.shape),
                     "target": s.target_label, "status": s.status} for s in plan.sources],
        "ok": plan.ok,
        "missing": problems.get("missing", []),
        "unexpected": problems.get("unexpected", []),
        "ignored": plan.ignored,
        "wrong_shape": problems.get("wrong shape", []),
        "duplicate": problems.get("duplicate", []),
        "error": None if plan.ok else weights.mismatch_message(plan, where=path, model=type(hf).__name__,
                                                                layer_kinds=kinds),
        "attention": {**{f.name: getattr(span, f.name) for f in fields(span) if getattr(span, f.name) is not None},
                      "window": span.window_len},
        "memory": {
            "dtype": str(dtype).replace("torch.", ""),
            "weights_bytes": weight_bytes,
            "kv_bytes_per_token": kv,
            "recurrent_bytes": recurrent,
            "contexts": [{"label": label, "tokens": tokens, "kv_bytes": kv * tokens,
                          "total_bytes": weight_bytes + kv * tokens + recurrent}
                         for label, tokens in CONTEXTS.items()],
        },
    }
