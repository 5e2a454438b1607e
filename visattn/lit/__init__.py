"""LightningModules: detection (COCO metrics from visattn.evaluation) and segmentation (mIoU)."""
from .detection import (
           NAN_POLICIES,
           DetectionModule,
           WarmupCosineLR,
           gather_predictions,
           to_coco_results,
)
from .segmentation import SegmentationModule, pad_batch

__all__ = ["NAN_POLICIES", "DetectionModule", "SegmentationModule", "WarmupCosineLR", "gather_predictions",
           "pad_batch", "to_coco_results"]
