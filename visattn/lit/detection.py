"""LightningModule for torchvision-style detectors, evaluated with visattn.evaluation."""
from __future__ import annotations

import contextvars
import copy
import io
import math
import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from pycocotools import mask as mask_utils
from torch import nn

from .._checks import check_bool as _check_bool
from .._checks import check_choice as _check_choice
from .._checks import check_int as _check_int
from ..predict import SlicingConfig, predict_images
from .checkpoint import (
    MODEL_RECORD,
    VerifiedCheckpointIO,
    _check_archive,
    _is_local,
    _is_plain,
    build_model_from_spec,
    check_finite_state,
    check_state_dict_matches,
    find_model_spec,
    read_checkpoint,
)

__all__ = ["NAN_POLICIES", "CheckedModule", "DetectionModule", "WarmupCosineLR", "check_resume", "configure_optimizers",
           "gather_predictions"]

NAN_POLICIES = ("raise", "skip")
INTERVALS = ("epoch", "step")
IOU_TYPES = ("bbox", "segm")

# Scheduler state that moves as training runs; every other entry of a scheduler's state_dict is
# its configuration, which a resumed run must not change silently.
_PROGRESS_KEYS = frozenset({"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial",
                            "base_lrs", "best", "num_bad_epochs", "cooldown_counter", "T_cur", "T_i",
                            "lr_lambdas", "verbose"})


def _check_factory(name: str, value) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a factory (a callable, e.g. a class or functools.partial) or None, "
                        f"got {type(value).__name__} {value!r:.60}")


def _check_model(value) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"model must be a built torch.nn.Module (e.g. visattn.models.build_detector(...)), "
                        f"got {type(value).__name__} {value!r:.60}")
    return value


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_ratio`` of the base rate at
    ``total_steps``. A step is one ``scheduler.step()``: an optimiser step with
    ``scheduler_interval="step"``, an epoch with ``"epoch"``. ``total_steps=None`` is filled in by
    :class:`DetectionModule` / :class:`SegmentationModule` from the trainer: its
    ``estimated_stepping_batches`` (``"step"``) or ``max_epochs`` (``"epoch"``).

    Resuming (``load_state_dict``) restores only the progress (the step counter and the base
    rates); ``warmup_steps``, ``total_steps`` and ``min_ratio`` stay those of the run being
    configured now, and the optimiser's rates are set for the restored step. So a run resumed with
    a longer ``max_epochs`` follows the schedule of an uninterrupted run of the new length, and a
    run resumed with the same settings continues exactly as it would have.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 min_ratio: float = 0.01) -> None:
        _check_int("warmup_steps", warmup_steps, 0)
        if total_steps is not None:
            _check_int("total_steps", total_steps, 1)
        if isinstance(min_ratio, bool) or not isinstance(min_ratio, int | float) or not 0 <= min_ratio <= 1:
            raise ValueError(f"min_ratio must be a number in [0, 1], got {min_ratio!r:.60}")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, float(min_ratio)
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        total = self.total_steps or (step + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the step counter and base rates from ``state_dict``; keep this run's
        ``warmup_steps`` / ``total_steps`` / ``min_ratio`` and set the optimiser's rates for the
        restored step (what ``step()`` would have set in an uninterrupted run)."""
        for key in ("last_epoch", "_step_count", "base_lrs", "_is_initial", "_get_lr_called_within_step"):
            if key in state_dict:
                setattr(self, key, state_dict[key])
        changed = {k: (state_dict[k], getattr(self, k)) for k in ("warmup_steps", "total_steps", "min_ratio")
                   if k in state_dict and state_dict[k] != getattr(self, k)}
        lrs = [base_lr * self._factor(self.last_epoch) for base_lr in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs
        if changed:
            rank_zero_info("WarmupCosineLR resumed at step " + str(self.last_epoch) + " with this run's schedule: "
                           + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))


def _schedule_length(trainer, interval: str) -> int:
    """Scheduler steps in the whole run: optimiser steps (``"step"``) or epochs (``"epoch"``)."""
    if interval == "epoch":
        epochs = trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ValueError(f"WarmupCosineLR with scheduler_interval='epoch' needs trainer.max_epochs >= 1 "
                             f"(got {epochs}) or an explicit total_steps")
        return int(epochs)
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise ValueError("WarmupCosineLR needs a finite run (trainer.max_epochs or trainer.max_steps) or an "
                         "explicit total_steps")
    return int(steps)


def configure_optimizers(module: L.LightningModule, optimizer: OptimizerCallable | None,
                         scheduler: LRSchedulerCallable | None, interval: str):
    """Lightning's optimiser config from factories: AdamW (lr 1e-3, wd 1e-4) by default; a
    :class:`WarmupCosineLR` without ``total_steps`` gets the run's length in scheduler steps
    (``interval``: optimiser steps or epochs) from the trainer."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4) if optimizer is None else optimizer(params)
    if scheduler is None:
        return opt
    sched = scheduler(opt)
    if isinstance(sched, WarmupCosineLR) and sched.total_steps is None:
        sched.total_steps = _schedule_length(module.trainer, interval)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values are different
        return False


def _scheduler_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Configuration entries (not progress) in which two scheduler state dicts differ."""
    changes = [f"{prefix}{k}: checkpoint {old.get(k, '<absent>')!r}, this run {new.get(k, '<absent>')!r}"
               for k in sorted(set(old) | set(new))
               if k not in _PROGRESS_KEYS and k != "_schedulers" and not _same(old.get(k), new.get(k))]
    old_subs, new_subs = old.get("_schedulers") or [], new.get("_schedulers") or []
    if len(old_subs) != len(new_subs):
        changes.append(f"{prefix}_schedulers: checkpoint has {len(old_subs)}, this run {len(new_subs)}")
    for i, (o, n) in enumerate(zip(old_subs, new_subs, strict=False)):
        changes += _scheduler_changes(o, n, f"{prefix}_schedulers[{i}].")
    return changes


def _optimizer_changes(old_groups: list[dict], new_groups: list[dict]) -> list[str]:
    """Hyper-parameters (base ``lr``, ``weight_decay``, ``betas`` ...) in which two optimisers differ."""
    if len(old_groups) != len(new_groups):
        return [f"parameter groups: checkpoint {len(old_groups)}, this run {len(new_groups)}"]
    changes = []
    for i, (old, new) in enumerate(zip(old_groups, new_groups, strict=True)):
        old_lr, new_lr = old.get("initial_lr", old.get("lr")), new.get("initial_lr", new.get("lr"))
        if not _same(old_lr, new_lr):
            changes.append(f"group {i} lr: checkpoint {old_lr!r}, this run {new_lr!r}")
        changes += [f"group {i} {k}: checkpoint {old[k]!r}, this run {new[k]!r}" for k in sorted(set(old) & set(new))
                    if k not in ("params", "lr", "initial_lr") and not _same(old[k], new[k])]
    return changes


def check_resume(checkpoint: dict, param_groups: list[dict] | None, scheduler_state: dict | None,
                 scheduler_name: str | None, interval: str, source: str) -> None:
    """Refuse (``ValueError`` naming ``source`` and each difference) a resume whose optimiser or
    scheduler configuration differs from the checkpoint's in a way the restore would silently undo.

    ``param_groups`` (without ``params``) and ``scheduler_state`` are as this run configured them,
    before the restore; ``scheduler_name`` is the scheduler's class name.
    :class:`WarmupCosineLR` is exempt from the scheduler comparison: it follows this run's
    schedule by design (see its ``load_state_dict``).
    """
    problems = []
    old_interval = (checkpoint.get("hyper_parameters") or {}).get("scheduler_interval")
    if old_interval is not None and old_interval != interval:
        problems.append(f"scheduler_interval: checkpoint {old_interval!r}, this run {interval!r}")
    old_opts = checkpoint.get("optimizer_states") or []
    if param_groups is not None and old_opts:
        problems += _optimizer_changes(old_opts[0].get("param_groups", []), param_groups)
    old_scheds = checkpoint.get("lr_schedulers") or []
    if bool(old_scheds) != (scheduler_state is not None):
        problems.append(f"scheduler: checkpoint {'has one' if old_scheds else 'has none'}, this run "
                        f"{scheduler_name or 'has none'}")
    elif old_scheds and scheduler_name != WarmupCosineLR.__name__:
        problems += [f"scheduler {scheduler_name} {c}" for c in _scheduler_changes(old_scheds[0], scheduler_state)]
    if problems:
        raise ValueError(f"cannot resume from checkpoint {source}: the restore would replace this run's "
                         f"settings with the checkpoint's: {'; '.join(problems)}. Resume with the "
                         "checkpoint's settings (only visattn.lit.WarmupCosineLR follows a changed run "
                         "length), or start a new run")


# The checkpoint ``load_from_checkpoint`` is loading (quoted), for the messages of the hooks it runs.
_LOADING: contextvars.ContextVar[str | None] = contextvars.ContextVar("visattn_loading_checkpoint", default=None)


def _cli_model_spec() -> dict | None:
    """The model's ``{"class_path", "init_args"}`` when LightningCLI is instantiating this module
    (it hands the module's configuration to ``save_hyperparameters`` through a context variable),
    else None. ``save_hyperparameters(ignore=["model"])`` drops it; the checkpoint keeps it apart."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # another Lightning: checkpoints then rely on config.yaml beside them
        return None
    given = _given_hyperparameters.get()
    spec = given.get("model") if isinstance(given, dict) else None
    if isinstance(spec, dict) and isinstance(spec.get("class_path"), str) and _is_plain(spec):
        return copy.deepcopy(spec)
    return None


class CheckedModule(L.LightningModule):
    """What :class:`DetectionModule` and :class:`SegmentationModule` share: optimisers from factories
    and checked checkpoints. Every way a checkpoint comes in is verified the same way:

    - ``--ckpt_path`` of ``train.py`` (:class:`~visattn.lit.checkpoint.VerifiedCheckpointIO`), a plain
      ``Trainer(...).fit/validate/test/predict(ckpt_path=...)`` (the file's zip CRCs are checked in
      :meth:`on_load_checkpoint`, before any weight is applied) and :meth:`load_from_checkpoint`
      (zip CRCs, ``weights_only=True``): a flipped byte or a truncated file is a ``ValueError``
      naming the file and the damaged member;
    - the ``state_dict`` must hold only finite values (else ``FloatingPointError`` naming the file
      and the tensors) and have the keys and shapes of the model being built (else ``ValueError``
      naming the file and the first mismatches);
    - resuming ``fit``: the optimiser's hyper-parameters, the scheduler's configuration and
      ``scheduler_interval`` must match the checkpoint's (see :func:`check_resume`);
      :class:`WarmupCosineLR` instead follows the new run's length;
    - saving: a ``state_dict`` with NaN or inf is refused with ``FloatingPointError``. A module the
      training CLI built records its model's ``class_path`` / ``init_args`` in each checkpoint, so
      ``load_from_checkpoint(path)`` can rebuild the model without ``model=``.

    Subclasses set ``self.optimizer_factory`` and ``self.scheduler_factory`` and save
    ``scheduler_interval`` as a hyper-parameter.
    """

    _configured: tuple | None = None
    _resume_checkpoint: dict | None = None
    _model_spec: dict | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._model_spec = _cli_model_spec()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict: bool | None = None,
                             weights_only: bool | None = None, *, config: str | os.PathLike | None = None,
                             **kwargs):
        """Load a checkpoint, verified as ``train.py --ckpt_path`` verifies it, and rebuild the model
        when ``model=`` is not given.

        The file is read once and those bytes are checked (every zip member against its CRC, then
        ``torch.load(weights_only=True)``, finite weights) before Lightning builds the module from
        them; the keys and shapes are checked against the model being built.

        Args:
            checkpoint_path: a local ``.ckpt`` (``str`` / ``os.PathLike``) or a binary file object;
                a URL is refused (download it, then load the file).
            map_location, hparams_file, strict: as in Lightning.
            weights_only: ``None`` / ``True`` (default): tensors and plain data only; ``False`` only
                for a checkpoint you trust.
            config: the training run's ``config.yaml`` to rebuild the model from (its
                ``model.init_args.model``). Without it and without ``model=``, the model is rebuilt
                from the checkpoint's own record (checkpoints this visattn's CLI writes), else from
                the ``config.yaml`` LightningCLI wrote beside the checkpoint
                (``lightning_logs/version_N/config.yaml``) if it is that run's config.
            kwargs: hyper-parameters to override, and ``model=`` (the built ``nn.Module``).

        Example:
            >>> module = DetectionModule.load_from_checkpoint("runs/quickstart/lightning_logs/"
            ...                                               "version_0/checkpoints/last.ckpt")  # doctest: +SKIP

        Raises:
            TypeError: ``checkpoint_path``, ``weights_only`` or ``config`` of the wrong type.
            FileNotFoundError: the checkpoint or ``config`` does not exist.
            ValueError: the file is corrupt, truncated or holds pickled code; its keys or shapes do
                not match the model; a ``config.yaml`` found beside it is another run's; or the model
                cannot be rebuilt (the message says to pass ``model=`` or ``config=``).
            FloatingPointError: the checkpoint holds NaN or inf weights.
        """
        if weights_only is not None:
            _check_bool("weights_only", weights_only)
        if strict is not None:
            _check_bool("strict", strict)
        if config is not None:
            if not isinstance(config, str | os.PathLike) or not os.fspath(config):
                raise TypeError(f"config must be the path of a run's config.yaml, got {type(config).__name__} "
                                f"{config!r:.60}")
            if not Path(config).is_file():
                raise FileNotFoundError(f"config {os.fspath(config)!r} does not exist or is not a file")
        weights_only = True if weights_only is None else weights_only
        data, checkpoint, source, path = read_checkpoint(checkpoint_path, weights_only=weights_only)
        check_finite_state(checkpoint["state_dict"], f"checkpoint {source}", action="load")
        spec = None
        if kwargs.get("model") is None:
            spec, origin, looked = find_model_spec(checkpoint, source, path, config)
            if spec is None:
                where = " or ".join(str(p) for p in looked) or "beside it"
                raise ValueError(
                    f"{cls.__name__}.load_from_checkpoint({source}): cannot rebuild the model: the checkpoint does "
                    f"not record how it was built (plain Lightning or an earlier visattn wrote it) and there is no "
                    f"config.yaml at {where}; pass model= (the built nn.Module, e.g. "
                    "visattn.models.build_detector(...)) or config= (the training run's config.yaml, "
                    "lightning_logs/version_N/config.yaml)")
            kwargs["model"] = build_model_from_spec(spec, origin)
        token = _LOADING.set(source)
        try:
            module = super().load_from_checkpoint(io.BytesIO(data), map_location=map_location,
                                                  hparams_file=hparams_file, strict=strict,
                                                  weights_only=weights_only, **kwargs)
        finally:
            _LOADING.reset(token)
        if spec is not None:
            module._model_spec = copy.deepcopy(spec)
        return module

    def configure_optimizers(self):
        config = configure_optimizers(self, self.optimizer_factory, self.scheduler_factory,
                                      self.hparams.scheduler_interval)
        opt = config["optimizer"] if isinstance(config, dict) else config
        sched = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None
        state = None if sched is None else copy.deepcopy(sched.state_dict())
        # copies: the restore that follows overwrites both in place
        self._configured = (copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
                            state, None if sched is None else type(sched).__name__)
        return config

    def _ckpt_source(self) -> str:
        loading = _LOADING.get()
        if loading is not None:
            return loading
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        return repr(str(path)) if path else "(being loaded)"

    def _verify_trainer_file(self) -> None:
        """A checkpoint a plain Trainer loaded (no :class:`VerifiedCheckpointIO`): check its file's zip
        CRCs now, before its weights are applied (``torch.load`` does not check them)."""
        trainer = self._trainer
        if trainer is None or _LOADING.get() is not None:
            return  # load_from_checkpoint verified the bytes it handed to Lightning
        path = trainer.ckpt_path
        if isinstance(getattr(trainer.strategy, "checkpoint_io", None), VerifiedCheckpointIO):
            return
        if path and _is_local(path) and Path(path).is_file():
            _check_archive(Path(path))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._verify_trainer_file()
        check_finite_state(checkpoint.get("state_dict") or {}, f"checkpoint {self._ckpt_source()}", action="load")
        strategy = getattr(self._trainer, "strategy", None)
        if not getattr(strategy, "restore_checkpoint_after_setup", False):  # sharded strategies rename keys
            check_state_dict_matches(self.state_dict(), checkpoint.get("state_dict") or {}, self._ckpt_source())
        self._resume_checkpoint = checkpoint

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite_state(checkpoint.get("state_dict") or {}, f"a checkpoint at global step {self.global_step}")
        if self._model_spec is not None:
            checkpoint[MODEL_RECORD] = copy.deepcopy(self._model_spec)

    def on_train_start(self) -> None:
        checkpoint, self._resume_checkpoint = self._resume_checkpoint, None
        if checkpoint is None or self._configured is None:
            return
        groups, sched_state, sched_name = self._configured
        check_resume(checkpoint, groups, sched_state, sched_name, self.hparams.scheduler_interval,
                     self._ckpt_source())


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


class DetectionModule(CheckedModule):
    """Train a torchvision-API detector and evaluate it with COCO metrics.

    Args:
        model: a built detector (:func:`visattn.models.build_detector`), ``model(images, targets)``
            -> loss dict in training, list of predictions in eval.
        optimizer: optimiser factory ``params -> Optimizer`` (default AdamW, lr 1e-3, wd 1e-4).
        scheduler: scheduler factory ``optimizer -> LRScheduler`` (default none).
        scheduler_interval: when the scheduler steps: ``"epoch"`` or ``"step"``; a
            :class:`WarmupCosineLR` counts its steps in this unit.
        nan_policy: a non-finite loss ``"raise"``\\ s ``FloatingPointError`` naming the step and the
            loss terms (default), or is ``"skip"``\\ ped: that batch contributes a zero gradient.
            A skipped step logs ``train/skipped`` = 1 (0 otherwise), its loss terms as they are
            (NaN / inf, never a stale finite value) and the running total ``train/skipped_steps``.
            Skipping stops with ``FloatingPointError`` when the weights themselves are non-finite
            (no later batch can be finite) or after ``max_consecutive_skips`` skips in a row.
        max_consecutive_skips: with ``nan_policy="skip"``, how many batches in a row may be skipped
            (default 10); the next non-finite loss raises ``FloatingPointError``.
        iou_type: ``"bbox"`` or ``"segm"`` (Mask R-CNN) for validation.
        eval_backend: ``"faster_coco_eval"`` (default, same numbers) or ``"pycocotools"``.
        eval_errors: also compute the TIDE-style error breakdown at validation (slower).
        channels_last: run the backbone and neck in channels-last memory format (faster convolutions
            on GPUs with tensor cores, especially under bf16).
        slicing: evaluate and predict with sliced inference (:func:`visattn.predict.sliced_predict`):
            ``None`` (off, default), a :class:`visattn.predict.SlicingConfig` or a dict of its
            fields, e.g. ``{"slice_size": 256, "overlap": 0.2, "merge": "nms", "match": "iou",
            "threshold": 0.5, "full_image": True, "batch_size": 8}``; on the command line
            ``--model.init_args.slicing.slice_size=256`` (and ``.overlap=...`` etc.). Training is
            unchanged (train on crops with ``data.init_args.crop_size``).
        eval_fp32: validate, test and predict with autocast off, in float32, when the trainer
            trains under mixed precision (``precision: bf16-mixed`` / ``16-mixed``; default on).
            Under ``bf16-true`` / ``16-true`` the weights themselves are half precision and there is
            no autocast to turn off: use a mixed precision where boxes matter.
            Under bf16 autocast the heads' outputs, and so the decoded boxes, are bfloat16: 8 bits
            of mantissa round a coordinate near 200 px to 1 px, a large error for a 6 px object.
            Off: evaluate under the trainer's autocast (faster, boxes rounded).

    Logged: ``train/loss`` and each loss term; ``val/AP``, ``val/AP50``, ``val/AP75``, ``val/APs``,
    ``val/APm``, ``val/APl``, ``val/AR100``, ``val/AP_<size bin>`` (``very_tiny``, ``tiny``, ...)
    and, when the ground truth carries occlusion, ``val/AP_occ_none``, ``val/AP_occ_partial``,
    ``val/AP_occ_heavy`` and ``val/occluded_recall`` (``test/...`` for ``trainer.test``).
    The last full result is kept in ``self.last_eval``. Checkpoints are checked as described in
    :class:`CheckedModule` (resume, config mismatch, non-finite weights).

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range (the message names it).
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerCallable | None = None,
                 scheduler: LRSchedulerCallable | None = None, scheduler_interval: str = "epoch",
                 nan_policy: str = "raise", iou_type: str = "bbox", eval_backend: str = "faster_coco_eval",
                 eval_errors: bool = False, channels_last: bool = False, max_consecutive_skips: int = 10,
                 slicing: SlicingConfig | None = None, eval_fp32: bool = True) -> None:
        super().__init__()
        from ..evaluation import BACKENDS

        _check_model(model)
        _check_factory("optimizer", optimizer)
        _check_factory("scheduler", scheduler)
        _check_choice("scheduler_interval", scheduler_interval, INTERVALS)
        _check_choice("nan_policy", nan_policy, NAN_POLICIES)
        _check_choice("iou_type", iou_type, IOU_TYPES)
        _check_choice("eval_backend", eval_backend, tuple(BACKENDS))
        _check_bool("eval_errors", eval_errors)
        _check_bool("channels_last", channels_last)
        _check_int("max_consecutive_skips", max_consecutive_skips, 1)
        _check_bool("eval_fp32", eval_fp32)
        self.slicing = SlicingConfig.coerce(slicing)
        self.save_hyperparameters(ignore=["model", "slicing"])
        # plain data in the hyper-parameters, so checkpoints load with weights_only=True
        self.hparams["slicing"] = None if self.slicing is None else {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.slicing.kwargs().items()}
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.skipped_steps = 0
        self.consecutive_skips = 0
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
        bs = len(images)
        finite = bool(torch.isfinite(loss))
        if finite:
            self.consecutive_skips = 0
        else:
            self._non_finite_loss(loss, losses, batch_idx)
        # a skipped step logs its loss as it is (NaN / inf): a log never shows a stale finite value
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for k, v in losses.items():
            self.log(f"train/{k}", v.detach(), batch_size=bs)
        if self.hparams.nan_policy == "skip":
            self.log("train/skipped", 0.0 if finite else 1.0, batch_size=bs)
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=bs)
        if finite:
            return loss
        # zero loss still tied to every parameter, so DDP's gradient sync stays in step
        return sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)

    def _non_finite_loss(self, loss: torch.Tensor, losses: dict, batch_idx: int) -> None:
        """Raise, or count a skip; raise anyway when skipping cannot help (see ``nan_policy``)."""
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        where = f"at global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.hparams.nan_policy == "raise":
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} {where}: {terms}. Lower the learning rate, add "
                "warm-up, or set model.nan_policy=skip to skip such batches")
        bad = next((n for n, p in self.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise FloatingPointError(
                f"non-finite training loss {where} and non-finite weights ({bad}): the model diverged, "
                f"so every later batch would be skipped ({self.skipped_steps} skipped before). Lower the "
                "learning rate or add warm-up, and restart from an earlier checkpoint")
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips > self.hparams.max_consecutive_skips:
            raise FloatingPointError(
                f"non-finite training loss {where}: {self.consecutive_skips} batches in a row, more than "
                f"max_consecutive_skips={self.hparams.max_consecutive_skips} ({self.skipped_steps} skipped in "
                f"all); stopping. Loss terms: {terms}")
        warnings.warn(f"skipping non-finite loss {where} ({self.consecutive_skips} in a row): {terms}",
                      stacklevel=1)

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
        param = next(self.model.parameters(), None)  # autocast is per device: the model's decides
        device = param.device.type if param is not None else (images[0].device.type if len(images) else "cpu")
        if self.hparams.get("eval_fp32", True) and torch.is_autocast_enabled(device):
            with torch.autocast(device_type=device, enabled=False):
                outputs = predict_images(self.model, images, self.slicing)
        else:
            outputs = predict_images(self.model, images, self.slicing)
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
