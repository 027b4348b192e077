"""The CPU backend: C++ kernels built at run time (csrc/, kernels.py) under the model's modules (modules.py)."""

from .modules import CpuAttentionOps, CpuLinear, CpuRMSNorm, attach, pays, row_exact_reason, warm_up

__all__ = ["CpuAttentionOps", "CpuLinear", "CpuRMSNorm", "attach", "pays", "row_exact_reason", "warm_up"]
