"""Superlinear attention kernels (docs/attention-spec.md): one prefill and one decode entry.

```python
from superlinear.kernels import SpanParams, superlinear_prefill, superlinear_decode
```
The backend is chosen by device (Triton on CUDA, the PyTorch reference elsewhere) and can be
forced with ``backend=`` or the environment variable ``SPL_ATTENTION_BACKEND``. See docs/kernels.md.
"""

from .api import available_backends, resolve_backend, superlinear_decode, superlinear_prefill
from .params import SpanParams, get_tables

__all__ = [
    "SpanParams",
    "available_backends",
    "get_tables",
    "resolve_backend",
    "superlinear_decode",
    "superlinear_prefill",
]
