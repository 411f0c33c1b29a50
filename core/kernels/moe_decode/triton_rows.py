"""The picked experts' matrix-vector products in one Triton kernel (the MoE decode step).

``expert_rows(x, weight, experts, rows_per_x)``: row ``r`` of the output is
``weight[experts[r]] @ x[r // rows_per_x]``. Each program reads one block of the picked expert's
weight rows once and accumulates in fp32; the expert id is read on the device, so the step has
no host sync and a fixed launch (it is captured in the decode CUDA graph). Any dtype: this is the
path for fp16 (and for GPUs without torch's CUTLASS grouped GEMM), where ``torch._grouped_mm``
copies the group offsets to the host. ``reference.expert_rows_reference`` is its PyTorch oracle.
Imported only where it runs (CUDA, or the CPU tests under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# rows of the weight per program; the reduction runs over the input in BLOCK_K slices
BLOCK_N = 32
BLOCK_K = 256


@triton.jit
def _expert_rows_kernel(x_ptr, w_ptr, experts_ptr, out_ptr, n_out, n_in, rows_per_x,
                        stride_x, stride_we, stride_wn, stride_out,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    block = tl.program_id(1)
    expert = tl.load(experts_ptr + row).to(tl.int64)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    w_rows = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn
    x_row = x_ptr + (row // rows_per_x).to(tl.int64) * stride_x
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, n_in, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < n_in
        x = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def expert_rows(x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor, rows_per_x: int = 1) -> torch.Tensor:
    """``x [T, K_in]``, ``weight [E, N, K_in]`` (rows contiguous), ``experts [T * rows_per_x]``
    -> ``[T * rows_per_x, N]`` in ``x``'s dtype."""
    if weight.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("expert_rows needs the weight's and the input's last dimension contiguous")
    rows = experts.numel()
    n_out, n_in = weight.shape[1], weight.shape[2]
    out = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
    grid = (rows, triton.cdiv(n_out, BLOCK_N))
    _expert_rows_kernel[grid](x, weight, experts.reshape(-1), out, n_out, n_in, rows_per_x,
                              x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
                              BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out
