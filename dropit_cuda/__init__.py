"""dropit_cuda: DropIT (dropping intermediate tensors) for memory-efficient PyTorch training.

Conv and linear layers cache their input only for the weight gradient; DropIT caches only the
largest-magnitude ``1 - gamma`` fraction of every chunk of that input, packed, and computes the
weight gradient from the sparse copy.
"""

from ._native import extension_info
from .ops import Packed, pack, unpack
from . import functional, strategies
from .strategies import STRATEGIES
from .settings import Settings
from .modules import (
    DropITConv1d,
    DropITConv2d,
    DropITConv3d,
    DropITConvTranspose1d,
    DropITConvTranspose2d,
    DropITConvTranspose3d,
    DropITLinear,
    DropITMultiheadAttention,
)
from .convert import convert, report, revert
from .fidelity import FidelityMonitor, FidelityReport, Plan, fidelity, tune
from .relu import MaskedReLU, masked_relu
from . import memory

__all__ = [
    "DropITConv1d",
    "DropITConv2d",
    "DropITConv3d",
    "DropITConvTranspose1d",
    "DropITConvTranspose2d",
    "DropITConvTranspose3d",
    "DropITLinear",
    "DropITMultiheadAttention",
    "FidelityMonitor",
    "FidelityReport",
    "MaskedReLU",
    "Packed",
    "Plan",
    "STRATEGIES",
    "Settings",
    "convert",
    "extension_info",
    "fidelity",
    "functional",
    "masked_relu",
    "memory",
    "pack",
    "report",
    "revert",
    "strategies",
    "tune",
    "unpack",
]
__version__ = "0.1.0"
