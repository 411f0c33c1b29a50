"""One token through a mixture of experts (the decode step's MoE layer), beside its oracles.

- ``reference``: ``moe_decode_reference`` and ``expert_rows_reference`` (fp32 PyTorch, tests);
- ``fused``: ``fused_moe_decode``, router + top-k + routed and shared experts in three Triton
  kernels (``triton_fused``);
- ``triton_rows``: ``expert_rows``, the picked experts' matrix-vector products in one kernel.

The Triton modules are imported where they run (CUDA, or the CPU tests under
``TRITON_INTERPRET=1``, which must be set before a kernel is decorated).
"""

from .fused import fused_moe_decode
from .reference import ACTIVATIONS, activation, expert_rows_reference, moe_decode_reference

__all__ = ["ACTIVATIONS", "activation", "expert_rows_reference", "fused_moe_decode", "moe_decode_reference"]
