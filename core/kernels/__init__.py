"""Our kernels, one folder per op, each a PyTorch oracle beside its Triton kernels
(core/kernels/README.md): ``attention`` (superlinear attention), ``moe_decode`` (one token
through a mixture of experts), ``mamba2_step`` (the Mamba-2 decode step's prologue).

The attention entries are re-exported here, the public API:

```python
from superlinear.kernels import SpanParams, superlinear_prefill, superlinear_decode
from superlinear.kernels import KVRows, append_kv_rows, superlinear_decode_rows  # B sequences, own caches
```
The backend is chosen by device (Triton on CUDA, the PyTorch reference elsewhere) and can be
forced with ``backend=`` or the environment variable ``SPL_ATTENTION_BACKEND``. See docs/kernels.md.
Kernels import only the standard library, torch, triton, numpy and each other.
"""

from .attention.params import SpanParams, get_tables

_API = ("append_kv_rows", "available_backends", "resolve_backend", "superlinear_decode", "superlinear_decode_rows",
        "superlinear_prefill")


def __getattr__(name: str):
    # the entries import torch; SpanParams does not, so `spl models info` reads a model's span
    # parameters without loading torch
    if name in _API:
        from .attention import api

        return getattr(api, name)
    if name == "KVRows":
        from .attention.rows import KVRows

        return KVRows
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KVRows",
    "SpanParams",
    "append_kv_rows",
    "available_backends",
    "get_tables",
    "resolve_backend",
    "superlinear_decode",
    "superlinear_decode_rows",
    "superlinear_prefill",
]
