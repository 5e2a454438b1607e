"""LightningModule for torchvision-style detectors, evaluated with visattn.evaluation."""
from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from pycocotools import mask as mask_utils
from torch import nn

__all__ = ["NAN_POLICIES", "DetectionModule", "WarmupCosineLR", "configure_optimizers", "gather_predictions"]

NAN_POLICIES = ("raise", "skip")


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_ratio`` of the base rate at
    ``total_steps``. Step it every optimiser step. ``total_steps=None`` is filled in by
    :class:`DetectionModule` from the trainer's ``estimated_stepping_batches``."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 min_ratio: float = 0.01) -> None:
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        total = self.total_steps or (step + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def configure_optimizers(module: L.LightningModule, optimizer: OptimizerCallable | None,
                         scheduler: LRSchedulerCallable | None, interval: str):
    """Lightning's optimiser config from factories: AdamW (lr 1e-3, wd 1e-4) by default; a
    :class:`WarmupCosineLR` without ``total_steps`` gets the trainer's step count."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4) if optimizer is None else optimizer(params)
    if scheduler is None:
        return opt
    sched = scheduler(opt)
    if isinstance(sched, WarmupCosineLR) and sched.total_steps is None:
        sched.total_steps = int(module.trainer.estimated_stepping_batches)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}


def detector_num_classes(model: nn.Module) -> int | None:
    """Object classes (without background) a torchvision detector predicts, or None if unknown."""
    roi = getattr(model, "roi_heads", None)
    if roi is not None and hasattr(roi, "box_predictor"):
        return roi.box_predictor.cls_score.out_features - 1
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if head is not None and hasattr(head, "num_classes"):
        return head.num_classes - 1
    return None


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_predictions(per_image: dict[int, list[dict]]) -> dict[int, list[dict]]:
    """Merge ``{image_id: [COCO results]}`` from every process. A DistributedSampler pads the last
    batch by repeating images; keeping one entry per image id stops repeats counting as false
    positives."""
    if _world_size() == 1:
        return per_image
    parts: list = [None] * _world_size()
    dist.all_gather_object(parts, per_image)
    merged: dict[int, list[dict]] = {}
    for part in parts:
        for image_id, preds in part.items():
            merged.setdefault(image_id, preds)
    return merged


def to_coco_results(output: dict, target: dict, to_category: dict[int, int], with_masks: bool) -> list[dict]:
    """One image's detector output in COCO result format, in the original image's pixels."""
    h0, w0 = target["orig_size"]
    h1, w1 = target["size"]
    sx, sy = w0 / w1, h0 / h1
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    x0, y0 = boxes[:, 0] * sx, boxes[:, 1] * sy
    ws, hs = (boxes[:, 2] - boxes[:, 0]) * sx, (boxes[:, 3] - boxes[:, 1]) * sy
    results = []
    masks = None
    if with_masks and "masks" in output and len(boxes):
        m = output["masks"].detach().float()
        if (h1, w1) != (h0, w0):
            m = F.interpolate(m, size=(h0, w0), mode="bilinear", align_corners=False)
        masks = (m[:, 0] > 0.5).cpu().numpy().astype(np.uint8)
    for i, label in enumerate(labels):
        if label not in to_category:
            continue  # background / unused index
        r = {"image_id": int(target["image_id"]), "category_id": int(to_category[label]),
             "bbox": [round(float(v), 3) for v in (x0[i], y0[i], ws[i], hs[i])], "score": round(float(scores[i]), 5)}
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i]))
            r["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        results.append(r)
    return results


class DetectionModule(L.LightningModule):
    """Train a torchvision-API detector and evaluate it with COCO metrics.

    Args:
        model: a built detector (:func:`visattn.models.build_detector`), ``model(images, targets)``
            -> loss dict in training, list of predictions in eval.
        optimizer: optimiser factory ``params -> Optimizer`` (default AdamW, lr 1e-3, wd 1e-4).
        scheduler: scheduler factory ``optimizer -> LRScheduler`` (default none).
        scheduler_interval: ``"epoch"`` or ``"step"`` (use ``"step"`` with :class:`WarmupCosineLR`).
        nan_policy: a non-finite loss ``"raise"``\\ s ``FloatingPointError`` naming the step and the
            loss terms (default), or is ``"skip"``\\ ped: that batch contributes a zero gradient and
            ``train/skipped_steps`` counts it.
        iou_type: ``"bbox"`` or ``"segm"`` (Mask R-CNN) for validation.
        eval_backend: ``"faster_coco_eval"`` (default, same numbers) or ``"pycocotools"``.
        eval_errors: also compute the TIDE-style error breakdown at validation (slower).
        channels_last: run the backbone and neck in channels-last memory format (faster convolutions
            on GPUs with tensor cores, especially under bf16).

    Logged: ``train/loss`` and each loss term; ``val/AP``, ``val/AP50``, ``val/AP75``, ``val/APs``,
    ``val/APm``, ``val/APl``, ``val/AR100``, ``val/AP_<size bin>`` (``very_tiny``, ``tiny``, ...)
    and, when the ground truth carries occlusion, ``val/AP_occ_none``, ``val/AP_occ_partial``,
    ``val/AP_occ_heavy`` and ``val/occluded_recall`` (``test/...`` for ``trainer.test``).
    The last full result is kept in ``self.last_eval``.
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerCallable | None = None,
                 scheduler: LRSchedulerCallable | None = None, scheduler_interval: str = "epoch",
                 nan_policy: str = "raise", iou_type: str = "bbox", eval_backend: str = "faster_coco_eval",
                 eval_errors: bool = False, channels_last: bool = False) -> None:
        super().__init__()
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.skipped_steps = 0
        self.last_eval: dict | None = None
        self._predictions: dict[int, list[dict]] = {}
        if channels_last and hasattr(model, "backbone"):
            model.backbone.to(memory_format=torch.channels_last)
            model.backbone.register_forward_pre_hook(_to_channels_last)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        want = getattr(dm, "num_classes", None)
        have = detector_num_classes(self.model)
        if want is not None and have is not None and have != want:
            raise ValueError(f"the detector was built for num_classes={have} but the data has {want} "
                             f"categories; set model.init_args.model.init_args.num_classes: {want}")

    def forward(self, images: list[torch.Tensor]):
        return self.model(images)

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        images, targets = batch
        targets = [{k: v for k, v in t.items() if isinstance(v, torch.Tensor)} for t in targets]
        losses = self.model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            if self.hparams.nan_policy == "raise":
                raise FloatingPointError(
                    f"non-finite training loss {loss.item()} at global step {self.global_step} (epoch "
                    f"{self.current_epoch}, batch {batch_idx}): {terms}. Lower the learning rate, add "
                    "warm-up, or set model.nan_policy=skip to skip such batches")
            self.skipped_steps += 1
            warnings.warn(f"skipping non-finite loss at global step {self.global_step}: {terms}", stacklevel=1)
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=len(images))
            # zero loss still tied to every parameter, so DDP's gradient sync stays in step
            return sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)
        bs = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=bs)
        return loss

    def configure_optimizers(self):
        return configure_optimizers(self, self.optimizer_factory, self.scheduler_factory,
                                    self.hparams.scheduler_interval)

    # -- evaluation -----------------------------------------------------------------------------
    def _categories(self):
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "categories"):
            raise RuntimeError("DetectionModule evaluation needs a datamodule with `categories` and "
                               "`val_annotations` (e.g. visattn.data.CocoDataModule)")
        return dm

    def _results(self, batch) -> dict[int, list[dict]]:
        """``{image_id: COCO results}`` for one batch, in the dataset's pixels and category ids."""
        images, targets = batch
        outputs = self.model(images)
        to_category = self._categories().categories.to_category
        segm = self.hparams.iou_type == "segm"
        return {int(t["image_id"]): to_coco_results(out, t, to_category, segm)
                for out, t in zip(outputs, targets, strict=True)}

    def _eval_step(self, batch) -> None:
        self._predictions.update(self._results(batch))

    def on_validation_epoch_start(self) -> None:
        self._predictions = {}

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_epoch_end(self, prefix: str) -> None:
        from ..evaluation import evaluate, load_gt

        merged = gather_predictions(self._predictions)
        self._predictions = {}
        if self.trainer.sanity_checking:
            return
        dm = self._categories()
        gt = load_gt(dm.val_gt() if hasattr(dm, "val_gt") else dm.val_annotations)
        seen = set(merged)
        if len(seen) < len(gt["images"]):  # fast_dev_run / limit_val_batches: score the images we saw
            gt = {**gt, "images": [im for im in gt["images"] if im["id"] in seen],
                  "annotations": [a for a in gt["annotations"] if a["image_id"] in seen]}
        preds = [p for ps in merged.values() for p in ps]
        result = evaluate(gt, preds, iou_type=self.hparams.iou_type, backend=self.hparams.eval_backend,
                          errors=self.hparams.eval_errors, per_class=True)
        self.last_eval = result
        metrics = {f"{prefix}/{k}": result[k] for k in ("AP50", "AP75", "APs", "APm", "APl", "AR100")}
        for name, r in result.get("size", {}).items():
            metrics[f"{prefix}/AP_{name}"] = r["AP"]
        for name, r in result.get("occlusion", {}).items():
            metrics[f"{prefix}/AP_occ_{name}"] = r["AP"]
        if "occluded_recall" in result:
            metrics[f"{prefix}/occluded_recall"] = result["occluded_recall"]["recall"]
        # every process computed the same numbers from the gathered predictions
        self.log_dict({k: float(v) for k, v in metrics.items()}, prog_bar=False, sync_dist=False)
        self.log(f"{prefix}/AP", float(result["AP"]), prog_bar=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch, batch_idx: int) -> list[dict]:
        return [r for results in self._results(batch).values() for r in results]
