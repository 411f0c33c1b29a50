"""Checkpoint weights from disk into a module built on the meta device, shard by shard.

A checkpoint is ``model.safetensors.index.json`` and the shards it names, or else every
``*.safetensors`` file of the directory. ``plan_load`` reads only the files' headers and says
where every tensor goes (a parameter, one expert's slice of a fused experts parameter, or
nowhere: ignored) and what does not fit (missing, unexpected, wrong shape, duplicate), before
any weight is read. ``stream_weights`` then opens one shard at a time (memory-mapped), and puts
each tensor straight into its parameter, allocated on the target device and dtype: the host
holds at most one shard's pages at once, never the whole state dict, and per-expert tensors are
copied into the fused parameter on the device instead of being stacked on the host.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from superlinear.errors import InvalidRequest

ALIASES_DOC = "docs/models.md, 'Weight names'"

# A checkpoint name -> (our parameter, expert index or None), or None: a tensor inference ignores.
Target = tuple[str, int | None] | None
TargetFn = Callable[[str], Target]


def same_name(name: str) -> Target:
    return name, None


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, as its file's header describes it."""

    name: str
    file: Path
    dtype: str  # safetensors' name: BF16, F16, F32...
    shape: tuple[int, ...]


def read_entries(files: list[Path]) -> list[Entry]:
    """Every tensor's name, dtype and shape, from the headers only (no weight is read)."""
    from safetensors import SafetensorError, safe_open

    entries = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():
                    view = fh.get_slice(name)
                    entries.append(Entry(name, file, view.get_dtype(), tuple(view.get_shape())))
        except (SafetensorError, OSError) as exc:
            raise InvalidRequest(f"{file} is not a readable safetensors file: {exc}") from exc
    return entries


@dataclass
class Source:
    """Where one checkpoint tensor goes: ``target`` (None: ignored) and the expert slice."""

    entry: Entry
    target: str | None
    expert: int | None
    status: str = "ok"  # ok | ignored | unexpected | wrong shape | duplicate

    @property
    def target_label(self) -> str | None:
        if self.target is None:
            return None
        return self.target if self.expert is None else f"{self.target}[{self.expert}]"


@dataclass
class LoadPlan:
    sources: list[Source]
    expected: dict[str, torch.Tensor]  # our names -> meta tensors (shape and dtype)
    missing: list[str] = field(default_factory=list)  # our names; an expert slice as name[j]
    tied: bool = False

    def names(self, status: str) -> list[str]:
        return [s.entry.name for s in self.sources if s.status == status]

    @property
    def ignored(self) -> list[str]:
        return self.names("ignored")

    @property
    def ok(self) -> bool:
        return not self.missing and all(s.status in ("ok", "ignored") for s in self.sources)

    def problems(self) -> list[tuple[str, str]]:
        """``(kind, name)`` for everything that does not fit: missing ones by our name, the
        others by the checkpoint's name (a wrong shape with both shapes)."""
        out = [("missing", name) for name in self.missing]
        for s in self.sources:
            if s.status == "wrong shape":
                want = tuple(self.expected[s.target].shape[1 if s.expert is not None else 0:])
                out.append((s.status, f"{s.entry.name} {s.entry.shape} != {want}"))
            elif s.status not in ("ok", "ignored"):
                out.append((s.status, s.entry.name))
        return out


def plan_load(hf: torch.nn.Module, entries: list[Entry], target_of: TargetFn = same_name) -> LoadPlan:
    """Match every checkpoint tensor to the module's parameters and persistent buffers."""
    expected = dict(hf.state_dict())
    tied = bool(getattr(hf.config, "tie_word_embeddings", False)) and "lm_head.weight" in expected
    sources: list[Source] = []
    filled: dict[str, set[int | None]] = {}
    for entry in entries:
        target = target_of(entry.name)
        if target is None:
            sources.append(Source(entry, None, None, "ignored"))
            continue
        name, expert = target
        source = Source(entry, name, expert)
        sources.append(source)
        meta = expected.get(name)
        if meta is None or (expert is not None and not (meta.dim() > 1 and 0 <= expert < meta.shape[0])):
            source.status = "unexpected"
            continue
        have = filled.setdefault(name, set())  # a wrong shape counts as there: not missing too
        want = tuple(meta.shape[1:] if expert is not None else meta.shape)
        if entry.shape != want:
            source.status = "wrong shape"
            have.add(expert)
            continue
        # the whole tensor and any slice of it, or one slice twice, would both write the same values
        if expert in have or (expert is None and have) or None in have:
            source.status = "duplicate"
            continue
        have.add(expert)
    missing = []
    for name, meta in expected.items():
        have = filled.get(name, set())
        if None in have or (tied and name == "lm_head.weight"):
            continue
        if have:  # some experts' slices: name the absent ones
            missing.extend(f"{name}[{j}]" for j in range(meta.shape[0]) if j not in have)
        else:
            missing.append(name)
    return LoadPlan(sources, expected, missing, tied)


# ---------------------------------------------------------------------------------------------
# the one error that lists every mismatch, grouped by layer
# ---------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^(?:model|backbone)\.layers\.(\d+)\.(.*)$")
_MAX_GROUPS = 16
_MAX_ITEMS = 8


def layer_of(name: str) -> tuple[int | None, str]:
    """``(layer index, the name within the layer)``; ``(None, name)`` outside the layers."""
    m = _LAYER.match(name)
    return (int(m[1]), m[2]) if m else (None, name)


def mismatch_message(plan: LoadPlan, *, where, model: str, layer_kinds: list[str] | None = None) -> str:
    """One line: every problem grouped by layer and kind, e.g. ``layer 12 (attention): missing
    routing_q_proj.weight``."""
    groups: dict[int | None, dict[str, list[str]]] = {}
    for kind, name in plan.problems():
        layer, short = layer_of(name)
        groups.setdefault(layer, {}).setdefault(kind, []).append(short)
    parts = []
    for layer in sorted(groups, key=lambda i: -1 if i is None else i):
        if layer is None:
            head = "model"
        elif layer_kinds and layer < len(layer_kinds):
            head = f"layer {layer} ({layer_kinds[layer]})"
        else:
            head = f"layer {layer} (no such layer)"
        kinds = "; ".join(f"{kind} {show_names(names)}" for kind, names in groups[layer].items())
        parts.append(f"{head}: {kinds}")
    if len(parts) > _MAX_GROUPS:
        parts = parts[:_MAX_GROUPS] + [f"(+{len(parts) - _MAX_GROUPS} more layers)"]
    return (f"weights in {where} do not match the model ({model}): " + " | ".join(parts)
            + f" (checkpoint names and their aliases: {ALIASES_DOC})")


def show_names(names: list[str]) -> str:
    head = ", ".join(names[:_MAX_ITEMS])
    return head + (f" (+{len(names) - _MAX_ITEMS} more)" if len(names) > _MAX_ITEMS else "")


# ---------------------------------------------------------------------------------------------
# streaming the weights in
# ---------------------------------------------------------------------------------------------

def keep_fp32(hf, name: str) -> bool:
    patterns = getattr(hf, "_keep_in_fp32_modules_strict", None) or []
    return any(p in name for p in patterns)


def target_dtype(hf, name: str, meta: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight is kept in: fp32 where transformers keeps it so, its own when it is
    not a float, else the model's."""
    if not meta.is_floating_point():
        return meta.dtype
    return torch.float32 if keep_fp32(hf, name) else dtype


def put_tensor(hf: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``hf`` by ``value``."""
    prefix, _, leaf = name.rpartition(".")
    module = hf.get_submodule(prefix)
    if leaf in dict(module.named_parameters(recurse=False)):
        setattr(module, leaf, torch.nn.Parameter(value, requires_grad=False))
    else:
        setattr(module, leaf, value)


@torch.no_grad()
def stream_weights(hf: torch.nn.Module, plan: LoadPlan, device: torch.device, dtype: torch.dtype) -> None:
    """Read the planned tensors shard by shard into parameters allocated on ``device``."""
    from safetensors import safe_open

    by_file: dict[Path, list[Source]] = {}
    for source in plan.sources:
        if source.status == "ok":
            by_file.setdefault(source.entry.file, []).append(source)
    allocated: dict[str, torch.Tensor] = {}
    for file, sources in by_file.items():
        # the mapping (and the pages read from it) ends with the block: one shard at a time
        with safe_open(str(file), framework="pt") as fh:
            for source in sources:
                target = allocated.get(source.target)
                if target is None:
                    meta = plan.expected[source.target]
                    target = torch.empty(meta.shape, device=device,
                                         dtype=target_dtype(hf, source.target, meta, dtype))
                    allocated[source.target] = target
                    put_tensor(hf, source.target, target)
                value = fh.get_tensor(source.entry.name)
                (target if source.expert is None else target[source.expert]).copy_(value)
                del value
    if plan.tied and "lm_head.weight" not in allocated:
        hf.lm_head.weight = hf.get_input_embeddings().weight


def materialize_buffers(hf: torch.nn.Module, device: torch.device) -> None:
    """Build on ``device`` the buffers a module computes from its config (rotary frequencies),
    which the meta device left empty: the module is built again there and its buffers taken."""
    for name, module in hf.named_modules():
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        config = getattr(module, "config", None)
        try:
            with torch.device(device):
                fresh = type(module)(config)
        except (TypeError, AttributeError) as exc:
            raise InvalidRequest(f"cannot build the buffers of {name or type(hf).__name__} "
                                 f"({type(module).__name__}) off the meta device: {exc}") from exc
        for leaf, buffer in fresh.named_buffers(recurse=False):
            if getattr(module, leaf).is_meta:
                setattr(module, leaf, buffer)


def unset_tensors(hf: torch.nn.Module) -> list[str]:
    """Parameters and buffers still on the meta device."""
    return [n for n, t in (*hf.named_parameters(), *hf.named_buffers()) if t.is_meta]
