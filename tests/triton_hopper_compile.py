"""Compile the MoE-decode, Mamba-2-step and batched-decode attention Triton kernels for an
H100/H200 (sm_90) on a machine without a GPU:
the interpreter runs Python, not the compiler, so this is what catches a kernel that would not
compile on the device. Run as a script (TRITON_INTERPRET unset): prints one line per kernel."""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from superlinear.kernels.attention import triton_decode_rows
from superlinear.kernels.mamba2_step import triton_prologue
from superlinear.kernels.moe_decode import triton_fused

BF16, F32, I32, I64 = "*bf16", "*fp32", "i32", "*i64"


def signature(fn, types: dict[str, str]) -> dict[str, str]:
    """Every argument of ``fn``: its type from ``types``, else a constexpr."""
    return {name: types.get(name, "constexpr") for name in fn.arg_names}


KERNELS = [
    (triton_fused._router, {"x_ptr": BF16, "w_ptr": BF16, "scores_ptr": F32, "E": I32, "H": I32},
     {"BLOCK_E": 4, "BLOCK_H": 128}),
    (triton_fused._up, {"x_ptr": BF16, "xr_ptr": BF16, "scores_ptr": F32, "bias_ptr": F32, "up_ptr": BF16,
                             "sup_ptr": BF16, "hidden_ptr": F32, "shidden_ptr": F32, "ids_ptr": "*i32",
                             "wts_ptr": F32, "E": I32, "H": I32, "HR": I32, "INNER": I32, "SHARED_INNER": I32,
                             "ROUTED_BLOCKS": I32, "scaling": "fp32"},
     {"K": 6, "BLOCK_E": 128, "NORM": True, "ACT": 0, "BLOCK_I": 32, "BLOCK_H": 128}),
    (triton_fused._down, {"hidden_ptr": F32, "shidden_ptr": F32, "ids_ptr": "*i32", "down_ptr": BF16,
                               "sdown_ptr": BF16, "out_ptr": BF16, "OUT": I32, "INNER": I32, "SHARED_INNER": I32},
     {"K": 6, "SHARED": True, "BLOCK_O": 16, "BLOCK_I": 128}),
    (triton_prologue._prologue, {"proj_ptr": BF16, "state_ptr": BF16, "w_ptr": BF16, "b_ptr": BF16,
                                   "dt_bias_ptr": BF16, "a_log_ptr": BF16, "q_ptr": F32, "k_ptr": F32, "v_ptr": F32,
                                   "g_ptr": F32, "INNER": I32, "CONV_DIM": I32, "H": I32, "N": I32,
                                   "dt_min": "fp32", "dt_max": "fp32"},
     {"P": 64, "PER_GROUP": 8, "KW": 4, "HAS_BIAS": True, "BLOCK_X": 512, "BLOCK_N": 128, "BLOCK_HG": 8}),
    # the decode over B sequences' own K/V tensors (int64 address tables cast to pointers), 30B heads
    (triton_decode_rows._append_rows_kernel, {"k_new_ptr": BF16, "v_new_ptr": BF16, "kp_ptr": I64, "vp_ptr": I64,
                                              "cap_ptr": I64, "pos_ptr": I64, "sn_b": I32, "sn_h": I32,
                                              "sv_b": I32, "sv_h": I32},
     {"HKV": 2, "D": 128, "BLOCK_D": 128}),
    (triton_decode_rows._score_rows_kernel, {"q1_ptr": BF16, "kp_ptr": I64, "cap_ptr": I64, "pos_ptr": I64,
                                             "offs_ptr": I64, "score_ptr": F32, "sq_b": I32, "sq_h": I32,
                                             "NS": I32, "S1": I32, "NC": I32},
     {"HQ": 32, "G": 16, "GP": 16, "D": 128, "BLOCK_D": 128, "BLOCK_C": 32, "NC_PAD": 64, "IEEE": False}),
    (triton_decode_rows._partial_rows_kernel, {"q2_ptr": BF16, "kp_ptr": I64, "vp_ptr": I64, "cap_ptr": I64,
                                               "pos_ptr": I64, "lo_ptr": "*i32", "hi_ptr": "*i32", "part_m_ptr": F32,
                                               "part_l_ptr": F32, "part_acc_ptr": F32, "sq_b": I32, "sq_h": I32,
                                               "W": I32, "SCALE": "fp32", "NSPLIT": I32},
     {"HQ": 32, "G": 16, "GP": 16, "D": 128, "BLOCK_D": 128, "NUM_SPANS": 3, "CHUNK": 128, "BLOCK_N": 64,
      "IEEE": False}),
]


def main() -> None:
    for fn, types, constants in KERNELS:
        source = ASTSource(fn=fn, signature=signature(fn, types), constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        print(f"{fn.__name__}: sm_90 cubin {len(compiled.asm['cubin'])} bytes")


if __name__ == "__main__":
    main()
