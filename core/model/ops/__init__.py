"""Fused kernels of the model's own ops (not attention, which is ``superlinear.kernels``), each
beside its PyTorch reference: ``moe_decode`` (router, top-k, experts and shared expert of one
token in three kernels) and ``mamba_step`` (the Mamba-2 decode step's prologue in one kernel).

Not on the default path yet: they run when ``SPL_FUSED_MOE_DECODE=1`` / ``SPL_FUSED_MAMBA_STEP=1``
is set when the model is loaded (``superlinear.model.hybrid``), until a GPU measures them.
"""

from __future__ import annotations

import os

SWITCHES = {"moe": "SPL_FUSED_MOE_DECODE", "mamba": "SPL_FUSED_MAMBA_STEP"}


def requested() -> set[str]:
    """The fused decode ops the environment switches on (``moe``, ``mamba``)."""
    return {op for op, var in SWITCHES.items() if os.environ.get(var, "").strip() not in ("", "0")}
