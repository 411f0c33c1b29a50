"""Models: loaders, per-sequence caches, chunked prefill and decode (see docs/architecture.md).

```python
from superlinear.model import load_model
model = load_model("default")                      # or a directory, a hub id; attention="dense"
cache = model.new_cache(4096)
logits = model.prefill(cache, token_ids)           # [V] fp32 of the last token
logits = model.decode_step(cache, next_token_id)
```
Importing this package does not import torch until a name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from superlinear.model.cache import Cache, CacheLayout
    from superlinear.model.model import Cancelled, Model
    from superlinear.model.registry import load_model

_EXPORTS = {
    "Cache": "superlinear.model.cache",
    "CacheLayout": "superlinear.model.cache",
    "Cancelled": "superlinear.model.model",
    "Model": "superlinear.model.model",
    "load_model": "superlinear.model.registry",
    "BUILTIN_LOADERS": "superlinear.model.registry",
}

__all__ = ["BUILTIN_LOADERS", "Cache", "CacheLayout", "Cancelled", "Model", "load_model"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'superlinear.model' has no attribute {name!r}")
