"""Attention blocks, one paper per module. Use :func:`visattn.create_block` to build them by name."""
from ._base import AttentionBlock, SafeBatchNorm2d, check_input, make_divisible
from .axial import AxialAttention
from .bam import BottleneckAttention
from .cbam import CBAM
from .coord import CoordAttention
from .criss_cross import CrissCrossAttention
from .cross import CrossAttention
from .danet import DualAttention
from .eca import EfficientChannelAttention
from .external import ExternalAttention
from .gc import GlobalContext
from .linear import LinearAttention
from .mhsa import MultiHeadSelfAttention
from .non_local import NonLocal
from .scse import SpatialChannelSE
from .se import SqueezeExcite
from .simam import SimAM
from .sk import SelectiveKernel
from .sra import SpatialReductionAttention
from .triplet import TripletAttention
from .window import WindowAttention

__all__ = [
    "CBAM",
    "AttentionBlock",
    "AxialAttention",
    "BottleneckAttention",
    "CoordAttention",
    "CrissCrossAttention",
    "CrossAttention",
    "DualAttention",
    "EfficientChannelAttention",
    "ExternalAttention",
    "GlobalContext",
    "LinearAttention",
    "MultiHeadSelfAttention",
    "NonLocal",
    "SafeBatchNorm2d",
    "SelectiveKernel",
    "SimAM",
    "SpatialChannelSE",
    "SpatialReductionAttention",
    "SqueezeExcite",
    "TripletAttention",
    "WindowAttention",
    "check_input",
    "make_divisible",
]
