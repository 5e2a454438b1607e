"""LightningModule for semantic segmenters (torchvision DeepLabV3 / FCN API)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from .detection import (
    INTERVALS,
    CheckedModule,
    _check_choice,
    _check_factory,
    _check_int,
    _check_model,
)

__all__ = ["IGNORE_INDEX", "SegmentationModule", "pad_batch", "segmenter_num_classes"]

IGNORE_INDEX = 255


def pad_batch(images: list[torch.Tensor], targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images of different sizes, zero-padding bottom/right; pad label maps with IGNORE_INDEX."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    x = images[0].new_zeros(len(images), 3, h, w)
    y = torch.full((len(images), h, w), IGNORE_INDEX, dtype=torch.int64, device=images[0].device)
    for i, (im, t) in enumerate(zip(images, targets, strict=True)):
        x[i, :, : im.shape[1], : im.shape[2]] = im
        y[i, : im.shape[1], : im.shape[2]] = t["semantic"]
    return x, y


def segmenter_num_classes(model: nn.Module) -> int | None:
    """Classes (background included) a torchvision-style segmenter predicts, or None if unknown."""
    classifier = getattr(model, "classifier", None)
    last = classifier[-1] if isinstance(classifier, nn.Sequential) and len(classifier) else classifier
    return last.out_channels if isinstance(last, nn.Conv2d) else None


class SegmentationModule(CheckedModule):
    """Train a segmenter (``model(x)["out"]``, optional ``"aux"``) with cross-entropy; validate with
    mean IoU over classes present in ground truth or prediction.

    Targets need ``semantic`` label maps: ``CocoDataModule(..., semantic=True)`` builds them from
    instance masks (0 = background, 1..K = categories). Logged: ``train/loss``, ``val/mIoU``,
    ``val/pixel_acc``.

    Args:
        model: a built segmenter (:func:`visattn.models.build_segmenter`).
        num_classes: classes the model predicts, background included (>= 2); checked against the
            model's classifier where it can be found.
        optimizer, scheduler, scheduler_interval: as in :class:`~visattn.lit.DetectionModule`.
        aux_weight: weight (>= 0) of the auxiliary head's loss.

    A non-finite loss raises ``FloatingPointError``; checkpoints are checked as described in
    :class:`~visattn.lit.detection.CheckedModule`.
    """

    def __init__(self, model: nn.Module, num_classes: int, optimizer: OptimizerCallable | None = None,
                 scheduler: LRSchedulerCallable | None = None, scheduler_interval: str = "epoch",
                 aux_weight: float = 0.5) -> None:
        super().__init__()
        _check_model(model)
        _check_int("num_classes", num_classes, 2)
        _check_factory("optimizer", optimizer)
        _check_factory("scheduler", scheduler)
        _check_choice("scheduler_interval", scheduler_interval, INTERVALS)
        if isinstance(aux_weight, bool) or not isinstance(aux_weight, int | float) or not 0 <= aux_weight < math.inf:
            raise ValueError(f"aux_weight must be a finite number >= 0, got {aux_weight!r:.60}")
        have = segmenter_num_classes(model)
        if have is not None and have != num_classes:
            raise ValueError(f"num_classes={num_classes} but the model's classifier predicts {have} classes "
                             "(background included); build both with the same num_classes")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.register_buffer("confusion", torch.zeros(num_classes, num_classes, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]

    def training_step(self, batch, batch_idx: int):
        x, y = pad_batch(*batch)
        out = self.model(x)
        loss = F.cross_entropy(out["out"], y, ignore_index=IGNORE_INDEX)
        if "aux" in out:
            loss = loss + self.hparams.aux_weight * F.cross_entropy(out["aux"], y, ignore_index=IGNORE_INDEX)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at global step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def on_validation_epoch_start(self) -> None:
        self.confusion.zero_()

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = pad_batch(*batch)
        pred = self.model(x)["out"].argmax(1)
        k = self.hparams.num_classes
        valid = y != IGNORE_INDEX
        idx = y[valid] * k + pred[valid]
        self.confusion += torch.bincount(idx, minlength=k * k).reshape(k, k)

    def on_validation_epoch_end(self) -> None:
        conf = self.trainer.strategy.reduce(self.confusion.float(), reduce_op="sum")
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        present = union > 0
        miou = (tp[present] / union[present]).mean() if present.any() else torch.tensor(0.0)
        acc = tp.sum() / conf.sum().clamp(min=1)
        self.log_dict({"val/mIoU": float(miou), "val/pixel_acc": float(acc)}, prog_bar=True)
