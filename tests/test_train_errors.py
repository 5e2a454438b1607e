"""``python train.py``: a user error is one line ``train.py: error: <what is wrong>`` on stderr and
exit status 2 (a run the NaN guard stopped: status 1); ``--debug`` or ``VISATTN_DEBUG=1`` keeps
the traceback; a bug keeps it always (issue #24).

Most cases run the command line's function in-process (:func:`visattn.lit.cli.cli_main`, what
``train.py`` calls) with a tiny model and in-memory data defined here; two run ``train.py`` itself
in a subprocess.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from visattn.lit.cli import cli_main, main

ROOT = Path(__file__).resolve().parents[1]
HERE = "tests.test_train_errors"


class TinyDetector(nn.Module):
    """``model(images, targets)`` -> ``{"mse": loss}`` in training (NaN with ``nan=True``; an
    implicit ``TypeError``, a bug, with ``bug=True``), empty detections in eval."""

    def __init__(self, nan: bool = False, bug: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.nan, self.bug = nan, bug

    def forward(self, images, targets=None):
        out = self.conv(torch.stack(images)).mean((1, 2, 3))
        if not self.training:
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                    for _ in images]
        if self.bug:
            return {"mse": out.mean() + None}  # TypeError raised by an operation, not by a check
        loss = ((out - torch.stack([t["y"] for t in targets])) ** 2).mean()
        return {"mse": loss * float("nan") if self.nan else loss}


class TinyData(L.LightningDataModule):
    """Two batches of two 3x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.items = [(torch.rand(3, 8, 8, generator=g), {"y": torch.rand((), generator=g)}) for _ in range(4)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=2, collate_fn=lambda b: tuple(zip(*b, strict=True)))


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VISATTN_CACHE", str(tmp_path_factory.getbasetemp() / "visattn-cache"))
    monkeypatch.setenv("VISATTN_DEBUG", "0")  # off, and restored after a --debug run sets it
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["train.py"])  # pytest's own options are not train.py's


def _tiny(root: Path, *extra: str, sub: str = "fit") -> list[str]:
    return [sub, "--config", "configs/quickstart.yaml", "--trainer.max_epochs=1", f"--trainer.default_root_dir={root}",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--model.init_args.model={HERE}.TinyDetector",
            "--model.init_args.scheduler.init_args.warmup_steps=1", f"--data={HERE}.TinyData", *extra]


# the synthetic data of the quickstart config, as small as it goes (never generated: every case
# below fails before the data is made, or is the num_classes check at setup)
TINY_SYNTH = ["--data.init_args.num_train=4", "--data.init_args.num_val=2", "--data.init_args.image_size=64"]


def _quick(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", "configs/quickstart.yaml", "--trainer.fast_dev_run=1",
            f"--trainer.default_root_dir={root}", *TINY_SYNTH, *extra]


def _one_line_error(capsys, argv: list[str], status: int = 2) -> str:
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == status, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("train.py: error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-2000:]
    return lines[0]


# (id, extra arguments, what the line says)
USER_ERRORS = [
    ("bad-batch-size", ["--data.init_args.batch_size=0"], r"batch_size must be an int >= 1, got 0"),
    ("unknown-block", ["--model.init_args.model.init_args.attention=nope"],
     r"unknown block 'nope'; registered blocks: adaptive, "),
    ("value-of-wrong-type", ["--data.init_args.batch_size=abc"], r"batch_size.*Got value: abc"),
    ("unknown-option", ["--trainer.max_epochz=1"], r"unrecognized arguments: --trainer.max_epochz=1"),
    ("missing-config", ["--config=no/such.yaml"], r"File does not exist: '.*no/such.yaml'"),
    ("unknown-class-path", ["--data=visattn.data.Nope"], r"class_path 'visattn.data.Nope'.*no attribute 'Nope'"),
    ("missing-checkpoint", ["--ckpt_path=no/such.ckpt"], r"checkpoint 'no/such.ckpt' does not exist"),
    ("trainer-setting", ["--trainer.max_epochs=-5"], r"max_epochs.* -5"),
    ("missing-data-folder", ["--data=visattn.data.CocoDataModule", "--data.init_args.train_images=no/such/images",
                             "--data.init_args.train_annotations=no/such/train.json"],
     r"no/such/(images|train.json)"),
    ("num-classes-vs-data", ["--model.init_args.model.init_args.num_classes=5"],
     r"num_classes=5 but the data has 8 categories"),
]


@pytest.mark.parametrize(("extra", "says"), [c[1:] for c in USER_ERRORS], ids=[c[0] for c in USER_ERRORS])
def test_user_error_is_one_line_and_exit_2(extra, says, tmp_path, capsys):
    line = _one_line_error(capsys, _quick(tmp_path, *extra))
    assert re.search(says, line), line


def test_optimizer_argument_refused_when_the_run_builds_it(tmp_path, capsys):
    line = _one_line_error(capsys, _tiny(tmp_path, "--model.init_args.optimizer.init_args.lr=-1"))
    assert "Invalid learning rate: -1" in line


def test_refused_resume_is_one_line(tmp_path, capsys):
    main(_tiny(tmp_path / "a"))
    ckpt = next((tmp_path / "a").glob("**/checkpoints/last.ckpt"))
    line = _one_line_error(capsys, _tiny(tmp_path / "b", f"--ckpt_path={ckpt}", "--trainer.max_epochs=2",
                                         "--model.init_args.optimizer.init_args.lr=0.01"))
    assert "cannot resume from checkpoint" in line and "last.ckpt" in line and "lr" in line


def test_run_stopped_by_the_nan_guard_is_one_line_and_exit_1(tmp_path, capsys):
    line = _one_line_error(capsys, _tiny(tmp_path, "--model.init_args.model.init_args.nan=true"), status=1)
    assert "non-finite training loss" in line


def test_bug_keeps_its_traceback(tmp_path):
    with pytest.raises(TypeError, match="unsupported operand"):
        cli_main(_tiny(tmp_path, "--model.init_args.model.init_args.bug=true"))


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_keeps_the_traceback(how, tmp_path, monkeypatch):
    argv = _quick(tmp_path, "--data.init_args.batch_size=0")
    if how == "flag":
        argv.insert(1, "--debug")
    else:
        monkeypatch.setenv("VISATTN_DEBUG", "1")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        cli_main(argv)


def test_main_still_raises_for_python_callers(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        main(_quick(tmp_path, "--data.init_args.batch_size=0"))


def _train_py(*argv: str, debug_env: str = "0") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", VISATTN_DEBUG=debug_env)
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_train_py_prints_one_line_and_exits_2(tmp_path):
    proc = _train_py(*_quick(tmp_path, "--model.init_args.model.init_args.attention=nope"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: ") and "unknown block 'nope'" in last, proc.stderr[-3000:]


def test_train_py_debug_flag_shows_the_traceback(tmp_path):
    proc = _train_py(*_quick(tmp_path, "--model.init_args.model.init_args.attention=nope"), "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr[-3000:]
    assert "unknown block 'nope'" in proc.stderr and "train.py: error:" not in proc.stderr
