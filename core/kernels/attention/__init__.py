"""Superlinear attention (docs/attention-spec.md): one prefill and one decode entry.

``naive`` is the definition as a float64 loop (the oracle), ``reference`` the exact PyTorch
backend (CPU), ``triton_prefill`` / ``triton_decode`` the CUDA kernels; ``api`` checks the
arguments and picks the backend by device. ``rows`` / ``triton_decode_rows``: the decode over B
sequences each in its own K/V tensors (device tables of their addresses), one launch per stage.
The entries are exported by ``superlinear.kernels``.
"""
