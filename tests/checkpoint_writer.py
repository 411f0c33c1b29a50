"""Write checkpoints the way their publishers do: NVIDIA's layout (``backbone.`` prefix, one
tensor per expert) in several safetensors shards with a ``model.safetensors.index.json``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

Named = Iterable[tuple[str, torch.Tensor]]


def nvidia_names(state: Named, materialize: Callable[[torch.Tensor], torch.Tensor] = torch.clone) -> Named:
    """Our names -> NVIDIA's: ``model.`` -> ``backbone.``, fused ``experts.up_proj [E, I, H]`` ->
    ``experts.{j}.up_proj.weight [I, H]``. ``materialize`` makes each tensor written (from a
    meta tensor too: a large checkpoint is generated one tensor at a time)."""
    for name, tensor in state:
        if name.startswith("model."):
            name = "backbone." + name[len("model."):]
        if name.endswith(("mixer.experts.up_proj", "mixer.experts.down_proj")):
            head, proj = name.rsplit(".", 1)
            for j in range(tensor.shape[0]):
                yield f"{head}.{j}.{proj}.weight", materialize(tensor[j])
            continue
        yield name, materialize(tensor)


def write_shards(path: Path, tensors: Named, max_shard_bytes: int) -> list[Path]:
    """Save ``tensors`` in shards of at most ``max_shard_bytes`` (one tensor may exceed it) plus
    the index; only one shard is held in memory at a time (``tensors`` may be a generator)."""
    path.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        nonlocal current, size
        if current:
            file = path / f"model-{len(files) + 1:05d}.safetensors"
            save_file(current, str(file))
            weight_map.update(dict.fromkeys(current, file.name))
            files.append(file)
            current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.contiguous()
        size += nbytes
    flush()
    total = sum(f.stat().st_size for f in files)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return files
