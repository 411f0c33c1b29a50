"""``random:NAME``: a model of a shipped shape with random weights built on the device.

For benchmarks anyone with a GPU can reproduce without the weights: speed does not depend on
the values. The shapes are config files in ``superlinear/model/shapes/`` (``default``: the
default model's; ``superlinear-exp-30b``: the 30B hybrid's). Nothing is read from or written
to disk but the shape file; no tokenizer (prefill and decode run on token ids).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from superlinear.errors import NotFound

SHAPES_DIR = Path(__file__).parent / "shapes"
PREFIX = "random:"


def shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def read_shape(name: str) -> dict:
    path = SHAPES_DIR / f"{name}.json"
    if not path.is_file():
        raise NotFound(f"unknown shape {name!r} for random weights: use one of {', '.join(shape_names())}")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def load_random(spec: str, *, device=None, dtype=None, attention: str = "superlinear",
                cuda_graph: bool | None = None, backend: str | None = None, span_params=None, seed: int = 0):
    """``random:NAME``: the shape ``NAME`` with random weights."""
    name = spec[len(PREFIX):]
    return random_model(read_shape(name), name=spec, source=str(SHAPES_DIR / f"{name}.json"), device=device,
                        dtype=dtype, attention=attention, cuda_graph=cuda_graph, backend=backend,
                        span_params=span_params, seed=seed)


def random_model(config: dict, *, name: str = "random", source: str = "", device=None, dtype=None,
                 attention: str = "superlinear", cuda_graph: bool | None = None, backend: str | None = None,
                 span_params=None, seed: int = 0):
    """A ``Model`` of any supported config with random weights (also used by tests)."""
    from superlinear.model.model import Model

    from . import loaders

    device = torch.device(device) if device is not None else loaders.default_device()
    dtype = loaders.parse_dtype(dtype) or loaders.default_dtype(device)
    hf, kind, routing = loaders.build_empty(config, where=name)
    fill_random(hf, device, dtype, seed)
    hf.eval()
    return Model(hf, None, name=name, kind=f"{kind}, random weights", layout=loaders.layout_of(hf.config),
                 span_params=span_params or loaders.span_params_from(config), attention=attention,
                 routing=routing, source=source, weights_hash=f"{name}:seed{seed}", arch_config=config,
                 cuda_graph=cuda_graph, backend=backend)


@torch.no_grad()
def fill_random(hf: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Materialise the meta weights on ``device`` (fp32 where transformers keeps them fp32)
    and fill them: normal(0, 0.02) for matrices and embeddings, ones for norm weights, the
    standard Mamba-2 init for ``A_log``/``D``/``dt_bias``, zeros for biases and for the
    checkpoint's buffers (router score biases, which the modules build as zeros). Buffers
    computed from the config (rotary frequencies) are built on the device."""
    from superlinear.model.weights import materialize_buffers, put_tensor, target_dtype

    generator = torch.Generator(device=device).manual_seed(seed)
    parameters = {name for name, _ in hf.named_parameters(remove_duplicate=False)}
    for name, meta in hf.state_dict().items():
        leaf = name.rpartition(".")[2]
        value = torch.empty(meta.shape, dtype=target_dtype(hf, name, meta, dtype), device=device)
        if leaf == "A_log":
            value.copy_(torch.log(torch.arange(1, value.numel() + 1, dtype=torch.float32)).view_as(value))
        elif leaf in ("D", "dt_bias") or (leaf == "weight" and value.dim() == 1):
            value.fill_(1.0)
        elif leaf == "bias" or name not in parameters:
            value.zero_()
        else:
            value.normal_(0.0, 0.02, generator=generator)
        put_tensor(hf, name, value)
    materialize_buffers(hf, device)
    if getattr(hf.config, "tie_word_embeddings", False):
        hf.tie_weights()
