"""The layer kinds of a Nemotron-H-family hybrid, read from a config in every spelling.

Checkpoints and transformers releases spell the same four kinds differently:
``hybrid_override_pattern`` uses one character a layer (``M*E-``), transformers 5.3 named them
``mamba`` / ``attention`` / ``moe`` / ``mlp``, later releases ``linear_attention`` /
``full_attention`` / ``moe`` / ``mlp``. Our forward and cache layout dispatch on the canonical
names below, whatever the installed transformers calls them, and the module is built from the
pattern string, which every release reads the same way.
"""

from __future__ import annotations

MAMBA = "linear_attention"
ATTENTION = "full_attention"
MOE = "moe"
MLP = "mlp"

_ALIASES = {
    "M": MAMBA, "mamba": MAMBA, "mamba2": MAMBA, "linear_attention": MAMBA,
    "*": ATTENTION, "attention": ATTENTION, "full_attention": ATTENTION,
    "E": MOE, "moe": MOE,
    "-": MLP, "mlp": MLP,
}
_PATTERN = {MAMBA: "M", ATTENTION: "*", MOE: "E", MLP: "-"}
# Only Nemotron-H's own key: other families' ``layer_types`` (Qwen's full/sliding attention)
# mean something else. transformers maps a Nemotron-H config's ``layer_types`` onto this one.
_LIST_KEY = "layers_block_type"


def canonical(types) -> list[str]:
    """``types`` (a list in any spelling, or a pattern string) -> the canonical names; a
    ValueError names the first unknown entry."""
    out = []
    for i, kind in enumerate(types):
        if kind not in _ALIASES:
            raise ValueError(f"layer {i} has unknown type {kind!r} (known: {', '.join(sorted(_ALIASES))})")
        out.append(_ALIASES[kind])
    return out


def from_config(config) -> list[str] | None:
    """The canonical layer types of a config (a dict or a transformers config object); None
    when it names none (an attention-only model)."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    value = get(_LIST_KEY)
    if value:
        return canonical(value)
    pattern = get("hybrid_override_pattern")
    return canonical(pattern) if pattern else None


def to_pattern(types) -> str:
    """The ``hybrid_override_pattern`` string of canonical layer types."""
    return "".join(_PATTERN[kind] for kind in types)
