"""Backbones, detectors and segmenters with attention plugged in.

    >>> from visattn.models import build_detector, build_segmenter
"""
from .backbone import Body, build_body, resolve_backbone
from .detection import ARCHS, build_detector, default_anchor_sizes
from .neck import DeformableEncoder, DynamicHead, FPNNeck, ScaleAwareAttention
from .segmentation import SEGMENTER_ARCHS, build_segmenter

__all__ = [
    "ARCHS", "SEGMENTER_ARCHS", "Body", "DeformableEncoder", "DynamicHead", "FPNNeck", "ScaleAwareAttention", "build_body",
    "build_detector", "build_segmenter", "default_anchor_sizes", "resolve_backbone",
]
