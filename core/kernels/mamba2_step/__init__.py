"""The Mamba-2 decode step's prologue (conv shift and conv, projection split, softplus, decay,
B/C per head) in one Triton kernel (``fused.step_prologue``, ``triton_prologue``) beside its
PyTorch oracle (``reference.step_prologue_reference``)."""

from .fused import step_prologue
from .reference import step_prologue_reference

__all__ = ["step_prologue", "step_prologue_reference"]
