"""Training: bad inputs and faults give clear errors, never a silent wrong answer.

- one table of bad arguments (``BAD_ARGS``): add a case in one line;
- resume (README recipe): the learning-rate curve after a resume with a longer run equals the
  uninterrupted run's; a same-length resume is bit-for-bit the uninterrupted run;
- ``nan_policy=skip``: skips are logged as skips, training stops after a bounded number in a row or
  at once when the weights diverged, and no checkpoint holds NaN weights;
- checkpoints: corrupt (flipped byte), truncated, missing or from another config are errors naming
  the file and the fault; saves are atomic.

Runs use the real CLI and config (``configs/quickstart.yaml``) with a tiny model and in-memory data
defined here (seconds in all on a 2-core CPU).
"""
from __future__ import annotations

import csv
import math
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from train import main
from visattn.lit import DetectionModule, SegmentationModule, WarmupCosineLR
from visattn.lit.checkpoint import VerifiedCheckpointIO, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HERE = "tests.test_bad_inputs_train"


# -- a tiny detector and data the CLI can build by class path -----------------------------------
class TinyDetector(nn.Module):
    """``model(images, targets)`` -> ``{"mse": loss}`` in training (NaN on the training calls listed
    in ``nan_calls``), empty detections in eval."""

    def __init__(self, width: int = 4, nan_calls: list[int] | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Linear(width, 1)
        self.nan_calls = set(nan_calls or [])
        self.calls = 0

    def forward(self, images, targets=None):
        out = self.head(self.conv(torch.stack(images)).mean((2, 3))).squeeze(1)
        if not self.training:
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                    for _ in images]
        loss = ((out - torch.stack([t["y"] for t in targets])) ** 2).mean()
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        self.calls += 1
        return {"mse": loss}


class TinyData(L.LightningDataModule):
    """``batches`` fixed batches of two 3x8x8 images per epoch, in a fixed order."""

    def __init__(self, batches: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.items = [(torch.rand(3, 8, 8, generator=g), {"y": torch.rand((), generator=g)}) for _ in range(2 * batches)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=2, shuffle=False, collate_fn=lambda b: tuple(zip(*b, strict=True)))


class LrRecorder(L.Callback):
    """The learning rate each optimiser step uses."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class StopAfter(L.Callback):
    """Stop a run after ``epochs`` epochs without changing its length (``max_epochs``): an interruption."""

    def __init__(self, epochs: int = 1) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


@pytest.fixture(autouse=True)
def _root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _fit(root: Path, *extra: str, epochs: int = 2, width: int = 4, nan_calls: str = "[]"):
    """The README's ``fit`` on the quickstart config, with the tiny model and data (3 steps/epoch)."""
    return main(["fit", "--config", "configs/quickstart.yaml", f"--trainer.max_epochs={epochs}",
                 f"--trainer.default_root_dir={root}", "--trainer.limit_val_batches=0",
                 "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
                 "--trainer.enable_model_summary=false", "--trainer.gradient_clip_val=null",
                 f"--model.init_args.model={HERE}.TinyDetector", f"--model.init_args.model.init_args.width={width}",
                 f"--model.init_args.model.init_args.nan_calls={nan_calls}",
                 "--model.init_args.scheduler.init_args.warmup_steps=1", f"--data={HERE}.TinyData",
                 f"--trainer.callbacks+={HERE}.LrRecorder", *extra])


def _lrs(cli) -> list[float]:
    return next(c for c in cli.trainer.callbacks if isinstance(c, LrRecorder)).lrs


def _last(root: Path) -> Path:
    return next(root.glob("**/checkpoints/last.ckpt"))


def _weights(cli) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """``last.ckpt`` of the README's first command (``fit --trainer.max_epochs=1``)."""
    root = tmp_path_factory.mktemp("one-epoch")
    _fit(root, epochs=1)
    return _last(root)


# -- 1. resume ----------------------------------------------------------------------------------
def test_readme_resume_recipe_follows_the_longer_runs_schedule(tmp_path, one_epoch):
    whole = _fit(tmp_path / "whole", epochs=2)
    resumed = _fit(tmp_path / "resumed", f"--ckpt_path={one_epoch}", epochs=2)
    after = _lrs(whole)[3:]  # the 3 steps of epoch 2
    assert len(_lrs(whole)) == 6 and len(_lrs(resumed)) == 3
    assert _lrs(resumed) == after  # exactly: same formula, same step, same total
    assert after[0] > 5 * after[-1] > 5 * 0.002 * 0.01  # decaying, not stuck at the minimum rate (2e-5)
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.total_steps == 6


def test_same_length_resume_is_bit_for_bit_the_uninterrupted_run(tmp_path):
    whole = _fit(tmp_path / "whole", epochs=2)
    _fit(tmp_path / "first", f"--trainer.callbacks+={HERE}.StopAfter", epochs=2)
    resumed = _fit(tmp_path / "resumed", f"--ckpt_path={_last(tmp_path / 'first')}", epochs=2)
    assert _lrs(resumed) == _lrs(whole)[3:]
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_interval_schedule_counts_epochs_and_resumes(tmp_path):
    epoch = ["--model.init_args.scheduler_interval=epoch"]
    whole = _fit(tmp_path / "whole", *epoch, epochs=4)
    _fit(tmp_path / "first", *epoch, epochs=2)
    resumed = _fit(tmp_path / "resumed", *epoch, f"--ckpt_path={_last(tmp_path / 'first')}", epochs=4)
    per_epoch = _lrs(whole)[::3]
    assert len(_lrs(whole)) == 12 and per_epoch[1] > per_epoch[2] > per_epoch[3]  # decays over 4 epochs
    assert _lrs(resumed) == _lrs(whole)[6:]


@pytest.mark.parametrize(("change", "names"), [
    (["--model.init_args.optimizer.init_args.lr=0.01"], "group 0 lr"),
    (["--model.init_args.scheduler_interval=epoch"], "scheduler_interval"),
    (["--model.init_args.scheduler=torch.optim.lr_scheduler.StepLR",
      "--model.init_args.scheduler.init_args.step_size=1"], "scheduler: checkpoint has one|step_size"),
], ids=["optimizer-lr", "interval", "other-scheduler"])
def test_resume_that_would_silently_drop_a_setting_is_refused(tmp_path, one_epoch, change, names):
    with pytest.raises(ValueError, match=rf"cannot resume from checkpoint '.*last.ckpt'.*({names})"):
        _fit(tmp_path, f"--ckpt_path={one_epoch}", *change)


def test_other_scheduler_resumes_when_unchanged_and_refuses_a_changed_config(tmp_path):
    cos = ["--model.init_args.scheduler=torch.optim.lr_scheduler.CosineAnnealingLR",
           "--model.init_args.scheduler.init_args.T_max=6"]
    _fit(tmp_path / "a", *cos, epochs=1)
    ckpt = _last(tmp_path / "a")
    resumed = _fit(tmp_path / "b", *cos, f"--ckpt_path={ckpt}")
    assert resumed.trainer.global_step == 6
    with pytest.raises(ValueError, match=r"T_max: checkpoint 6, this run 12"):
        _fit(tmp_path / "c", *cos[:1], "--model.init_args.scheduler.init_args.T_max=12", f"--ckpt_path={ckpt}")


# -- 2. nan_policy=skip -------------------------------------------------------------------------
def _rows(root: Path) -> list[dict]:
    with open(next(root.glob("**/metrics.csv"))) as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_skipped_step_is_logged_as_a_skip_not_a_stale_loss(tmp_path):
    cli = _fit(tmp_path, "--model.init_args.nan_policy=skip", epochs=1, nan_calls="[1]")
    rows = {int(r["step"]): r for r in _rows(tmp_path)}
    assert [float(rows[s]["train/skipped"]) for s in range(3)] == [0.0, 1.0, 0.0]
    assert math.isnan(float(rows[1]["train/loss"]))  # not the previous step's finite loss
    assert float(rows[2]["train/skipped_steps"]) == 1.0 and cli.model.skipped_steps == 1
    state = torch.load(_last(tmp_path), weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_skip_stops_after_max_consecutive_skips(tmp_path):
    with pytest.raises(FloatingPointError, match=r"global step 2 .*3 batches in a row.*max_consecutive_skips=2"):
        _fit(tmp_path, "--model.init_args.nan_policy=skip", "--model.init_args.max_consecutive_skips=2",
             nan_calls="[0, 1, 2, 3]")
    assert not list(tmp_path.glob("**/*.ckpt"))


class _Diverge(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            with torch.no_grad():
                pl_module.model.head.weight.fill_(float("nan"))


def test_skip_with_diverged_weights_is_an_error_not_a_nan_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r"global step 1 .*non-finite weights \(model.head.weight\)"):
        _fit(tmp_path, "--model.init_args.nan_policy=skip", f"--trainer.callbacks+={HERE}._Diverge")
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_checkpoint_with_nan_weights_is_never_written(tmp_path):
    path = tmp_path / "nan.ckpt"
    path.write_bytes(b"old")
    with pytest.raises(FloatingPointError, match=r"nan.ckpt.*non-finite values in w"):
        VerifiedCheckpointIO().save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["nan.ckpt"]


# -- 3. checkpoints visattn loads are verified --------------------------------------------------
def _flip_middle_byte(src: Path, dst: Path) -> None:
    """Flip one byte in the middle of the largest tensor in the archive (headers untouched)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max(z.infolist(), key=lambda i: i.compress_size)
    name_len, extra_len = (int.from_bytes(data[info.header_offset + i: info.header_offset + i + 2], "little")
                           for i in (26, 28))  # the local file header's own lengths
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0xFF
    dst.write_bytes(bytes(data))


def _validate(root: Path, ckpt: Path, *extra: str, width: int = 4):
    return main(["validate", "--config", "configs/quickstart.yaml", f"--trainer.default_root_dir={root}",
                 "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                 f"--model.init_args.model={HERE}.TinyDetector", f"--model.init_args.model.init_args.width={width}",
                 f"--data={HERE}.TinyData", f"--ckpt_path={ckpt}", *extra])


def test_command_line_setting_is_not_overwritten_by_the_checkpoints_hyperparameters(tmp_path, one_epoch):
    cli = _validate(tmp_path, one_epoch, "--model.init_args.eval_backend=pycocotools")
    assert cli.model.hparams.eval_backend == "pycocotools"


def test_flipped_byte_in_checkpoint_is_an_error_naming_file_and_member(tmp_path, one_epoch):
    bad = tmp_path / "flipped.ckpt"
    _flip_middle_byte(one_epoch, bad)
    for run in (lambda: _validate(tmp_path, bad), lambda: _fit(tmp_path, f"--ckpt_path={bad}")):
        with pytest.raises(ValueError, match=r"flipped.ckpt.* is corrupt: member '.*' fails its CRC check"):
            run()


def test_truncated_checkpoint_is_an_error_naming_the_file(tmp_path, one_epoch):
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(one_epoch.read_bytes()[: one_epoch.stat().st_size * 2 // 3])
    with pytest.raises(ValueError, match=r"cut.ckpt.* is truncated"):
        _validate(tmp_path, bad)


def test_checkpoint_from_another_config_names_the_mismatching_keys(tmp_path, one_epoch):
    with pytest.raises(ValueError, match=r"last.ckpt.* does not match the model .*model.conv.weight: "
                                         r"checkpoint \(4, 3, 3, 3\), model \(6, 3, 3, 3\)"):
        _validate(tmp_path, one_epoch, width=6)


def test_missing_checkpoint_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.ckpt"):
        _validate(tmp_path, tmp_path / "nowhere.ckpt")


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "payload": TinyDetector()}, path)
    with pytest.raises(ValueError, match=r"code.ckpt.* cannot be loaded: UnpicklingError"):
        verify_checkpoint(path)


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch, one_epoch):
    path = tmp_path / "last.ckpt"
    path.write_bytes(one_epoch.read_bytes())

    def disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        VerifiedCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    assert path.read_bytes() == one_epoch.read_bytes() and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# -- 4. arguments -------------------------------------------------------------------------------
def _det(**kw):
    return lambda: DetectionModule(**{"model": TinyDetector(), **kw})


def _seg(**kw):
    from visattn.models import build_segmenter

    return lambda: SegmentationModule(**{"model": build_segmenter(arch="fcn", backbone="resnet10t", num_classes=3),
                                         "num_classes": 3, **kw})


def _sched(**kw):
    return lambda: WarmupCosineLR(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), **kw)


#: (id, callable, expected exception, regex the message must match): add a case in one line
BAD_ARGS = [
    ("det-model-none", _det(model=None), TypeError, r"model must be a built torch.nn.Module"),
    ("det-model-str", _det(model="fcos"), TypeError, r"model must be .* got str"),
    ("det-optimizer-str", _det(optimizer="adamw"), TypeError, r"optimizer must be a factory"),
    ("det-interval", _det(scheduler_interval="batch"), ValueError, r"scheduler_interval must be one of"),
    ("det-nan-policy", _det(nan_policy="ignore"), ValueError, r"nan_policy must be one of .*'ignore'"),
    ("det-iou-type", _det(iou_type="mask"), ValueError, r"iou_type must be one of .*'mask'"),
    ("det-backend", _det(eval_backend="coco"), ValueError, r"eval_backend must be one of .*'coco'"),
    ("det-eval-errors", _det(eval_errors="yes"), TypeError, r"eval_errors must be True or False"),
    ("det-channels-last", _det(channels_last=1), TypeError, r"channels_last must be True or False"),
    ("det-skips-zero", _det(max_consecutive_skips=0), ValueError, r"max_consecutive_skips must be an int >= 1, got 0"),
    ("det-skips-float", _det(max_consecutive_skips=2.5), TypeError, r"max_consecutive_skips must be an int"),
    ("seg-num-classes-1", _seg(num_classes=1), ValueError, r"num_classes must be an int >= 2"),
    ("seg-num-classes-vs-model", _seg(num_classes=5), ValueError, r"num_classes=5 but the model's classifier predicts 3"),
    ("seg-aux-weight", _seg(aux_weight=-1.0), ValueError, r"aux_weight must be a finite number >= 0"),
    ("seg-interval", _seg(scheduler_interval="iter"), ValueError, r"scheduler_interval must be one of"),
    ("sched-warmup", _sched(warmup_steps=-1), ValueError, r"warmup_steps must be an int >= 0"),
    ("sched-total", _sched(total_steps=0), ValueError, r"total_steps must be an int >= 1"),
    ("sched-min-ratio", _sched(min_ratio=2.0), ValueError, r"min_ratio must be a number in \[0, 1\]"),
    ("verify-missing", lambda: verify_checkpoint("/nonexistent/x.ckpt"), FileNotFoundError, r"x.ckpt"),
]


@pytest.mark.parametrize(("make", "exc", "message"), [c[1:] for c in BAD_ARGS], ids=[c[0] for c in BAD_ARGS])
def test_bad_argument_is_an_error_naming_it(make, exc, message):
    with pytest.raises(exc, match=message):
        make()
