"""The tokens of a decode step through a mixture of experts, beside their oracle.

- ``reference``: ``moe_decode_reference`` (fp32 PyTorch, one token and one expert at a time);
- ``fused``: ``fused_moe_decode``, router + top-k + routed and shared experts in three Triton
  kernels (``triton_fused``), no host sync (a CUDA graph captures it).

The Triton module is imported where it runs (CUDA, or the CPU tests under
``TRITON_INTERPRET=1``, which must be set before a kernel is decorated).
"""

from .fused import fused_moe_decode
from .reference import ACTIVATIONS, activation, moe_decode_reference

__all__ = ["ACTIVATIONS", "activation", "fused_moe_decode", "moe_decode_reference"]
