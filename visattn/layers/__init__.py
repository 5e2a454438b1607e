"""Attention blocks, one paper per module. Use :func:`visattn.create_block` to build them by name."""
from ._base import AttentionBlock, SafeBatchNorm2d, check_input, make_divisible
from .bam import BottleneckAttention
from .cbam import CBAM
from .coord import CoordAttention
from .danet import DualAttention
from .eca import EfficientChannelAttention
from .gc import GlobalContext
from .scse import SpatialChannelSE
from .se import SqueezeExcite
from .simam import SimAM
from .sk import SelectiveKernel
from .triplet import TripletAttention

__all__ = [
    "AttentionBlock",
    "BottleneckAttention",
    "CBAM",
    "CoordAttention",
    "DualAttention",
    "EfficientChannelAttention",
    "GlobalContext",
    "SafeBatchNorm2d",
    "SelectiveKernel",
    "SimAM",
    "SpatialChannelSE",
    "SqueezeExcite",
    "TripletAttention",
    "check_input",
    "make_divisible",
]
