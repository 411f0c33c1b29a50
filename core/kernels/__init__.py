"""Superlinear attention kernels (docs/attention-spec.md): one prefill and one decode entry.

```python
from superlinear.kernels import SpanParams, superlinear_prefill, superlinear_decode
from superlinear.kernels import KVRows, superlinear_decode_rows  # B sequences of different lengths
```
The backend is chosen by device (Triton on CUDA, the PyTorch reference elsewhere) and can be
forced with ``backend=`` or the environment variable ``SPL_ATTENTION_BACKEND``. See docs/kernels.md.
"""

from .api import (
                  append_kv_rows,
                  available_backends,
                  resolve_backend,
                  superlinear_decode,
                  superlinear_decode_rows,
                  superlinear_prefill,
)
from .params import SpanParams, get_tables
from .rows import KVRows

__all__ = [
    "KVRows",
    "append_kv_rows",
    "SpanParams",
    "available_backends",
    "get_tables",
    "resolve_backend",
    "superlinear_decode",
    "superlinear_decode_rows",
    "superlinear_prefill",
]
