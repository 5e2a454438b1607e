"""Attention blocks, one paper per module. Use :func:`visattn.create_block` to build them by name."""
from ._base import AttentionBlock, SafeBatchNorm2d, check_input, make_divisible
from ._fused import fused_enabled, set_fused
from .adaptive import AdaptiveSparseAttention, entmax_bisect
from .axial import AxialAttention
from .bam import BottleneckAttention
from .cbam import CBAM
from .coord import CoordAttention
from .criss_cross import CrissCrossAttention
from .cross import CrossAttention
from .danet import DualAttention
from .deformable import DeformableAttention, MultiScaleDeformableAttention
from .eca import EfficientChannelAttention
from .external import ExternalAttention
from .gc import GlobalContext
from .linear import LinearAttention
from .mhsa import MultiHeadSelfAttention
from .non_local import NonLocal
from .quadtree import QuadtreeAttention
from .routing import BiLevelRoutingAttention
from .scse import SpatialChannelSE
from .se import SqueezeExcite
from .simam import SimAM
from .sk import SelectiveKernel
from .sra import SpatialReductionAttention
from .triplet import TripletAttention
from .window import WindowAttention

__all__ = [
    "CBAM",
    "AdaptiveSparseAttention",
    "AttentionBlock",
    "AxialAttention",
    "BiLevelRoutingAttention",
    "BottleneckAttention",
    "CoordAttention",
    "CrissCrossAttention",
    "CrossAttention",
    "DeformableAttention",
    "DualAttention",
    "EfficientChannelAttention",
    "ExternalAttention",
    "GlobalContext",
    "LinearAttention",
    "MultiHeadSelfAttention",
    "MultiScaleDeformableAttention",
    "NonLocal",
    "QuadtreeAttention",
    "SafeBatchNorm2d",
    "SelectiveKernel",
    "SimAM",
    "SpatialChannelSE",
    "SpatialReductionAttention",
    "SqueezeExcite",
    "TripletAttention",
    "WindowAttention",
    "check_input",
    "entmax_bisect",
    "fused_enabled",
    "make_divisible",
    "set_fused",
]
