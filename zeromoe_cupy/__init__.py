"""zeromoe_cupy: a Mixture-of-Experts layer with zero-computation experts on CuPy and NumPy.

Importing compiles nothing and needs no GPU; kernels compile on first use, once per device.
"""
from . import ops, parallel, reference
from ._arrays import gpu_available
from .config import MoEConfig
from .experts import ExpertOutput
from .layer import ZeroExpertMoE
from .routing import RoutingResult

__version__ = "0.1.0"

__all__ = [
    "ExpertOutput",
    "MoEConfig",
    "RoutingResult",
    "ZeroExpertMoE",
    "__version__",
    "gpu_available",
    "ops",
    "parallel",
    "reference",
]
