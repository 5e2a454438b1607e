"""train.py / LightningCLI: configs parse, quickstart runs, metrics and checkpoints, resume, DDP,
the NaN guard."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import main
from visattn.lit import DetectionModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VISATTN_CACHE", str(tmp_path_factory.getbasetemp() / "visattn-cache"))
    monkeypatch.chdir(ROOT)


TINY_DATA = ["--data.init_args.num_train=16", "--data.init_args.num_val=9", "--data.init_args.image_size=96",
             "--data.init_args.batch_size=4"]
TINY_DET = TINY_DATA + ['--model.init_args.model.init_args.detector_kwargs={"min_size": 96, "max_size": 96}',
                        "--model.init_args.model.init_args.fpn_channels=64"]  # 32 = 1 channel per GroupNorm group: fails on 1x1 P7


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "coco.yaml", "gpu.yaml", "segmentation.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(config), "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "class_path" in out and "checkpoint:" in out


def _fast_dev_args(config: Path, tmp_path) -> list[str]:
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}"]
    if config.name == "segmentation.yaml":
        return args + TINY_DATA
    if config.name == "coco.yaml":
        return args + ['--model.init_args.model.init_args.detector_kwargs={"min_size": 128, "max_size": 128}',
                       "--data.init_args.image_size=128", "--data.init_args.num_workers=0",
                       "--data.init_args.batch_size=2"]
    if config.name == "gpu.yaml":  # the GPU recipe on the CPU: bf16 autocast, channels-last, smaller input
        return args + TINY_DET + ["--data.init_args.num_workers=0", "--data.init_args.gen_workers=1",
                                  "--model.init_args.model.init_args.backbone=resnet18"]
    return args + TINY_DET


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_fast_dev_run(config, tmp_path):
    if config.name == "coco.yaml" and not (ROOT.parent / "shared" / "data" / "coco128").is_dir():
        pytest.skip("coco128 not present")
    cli = main(_fast_dev_args(config, tmp_path))
    assert cli.trainer.state.finished
    if isinstance(cli.model, DetectionModule):
        assert cli.model.last_eval is not None and "AP" in cli.model.last_eval
        assert (tmp_path / "report" / "report.md").is_file()


def _metrics_csv(root: Path) -> list[dict]:
    files = sorted(root.glob("**/metrics.csv"))
    assert files, f"no metrics.csv under {root}"
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


def test_one_epoch_writes_metrics_and_checkpoints_then_resumes(tmp_path):
    cli = main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
                f"--trainer.default_root_dir={tmp_path}", *TINY_DET])
    rows = _metrics_csv(tmp_path)
    columns = set(rows[0])
    assert {"val/AP", "val/AP50", "val/APs", "val/AP_tiny", "val/AP_occ_none", "val/AP_occ_partial",
            "val/AP_occ_heavy", "train/loss"} <= columns
    assert any(r["val/AP"] not in ("", None) for r in rows)
    ckpts = {p.name for p in tmp_path.glob("**/checkpoints/*.ckpt")}
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    steps_per_epoch = cli.trainer.global_step
    assert steps_per_epoch == 4
    last = next(tmp_path.glob("**/checkpoints/last.ckpt"))
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["epoch"] == 0 and state["optimizer_states"] and state["lr_schedulers"]

    resumed = main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochs=2",
                    f"--trainer.default_root_dir={tmp_path / 'resumed'}", f"--ckpt_path={last}", *TINY_DET])
    assert resumed.trainer.current_epoch == 2
    assert resumed.trainer.global_step == 2 * steps_per_epoch  # continued, not restarted
    sched = resumed.trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 2 * steps_per_epoch


def test_unknown_option_is_an_error_naming_it(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_epochz=1"])
    assert e.value.code != 0
    assert "max_epochz" in capsys.readouterr().err


def test_num_classes_mismatch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="num_classes=5 but the data has 8"):
        main(["fit", "--config", "configs/quickstart.yaml", "--trainer.fast_dev_run=1",
              f"--trainer.default_root_dir={tmp_path}", "--model.init_args.model.init_args.num_classes=5", *TINY_DET])


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nan_loss_guard(policy, tmp_path):
    args = ["fit", "--config", "configs/quickstart.yaml", "--trainer.fast_dev_run=1",
            f"--trainer.default_root_dir={tmp_path}", f"--model.init_args.nan_policy={policy}", *TINY_DET]
    import lightning as L

    original = L.LightningModule.on_fit_start

    def poison(self):  # a NaN weight in the head: every loss term becomes NaN
        with torch.no_grad():
            next(self.model.head.parameters()).fill_(float("nan"))
    L.LightningModule.on_fit_start = poison
    try:
        if policy == "raise":
            with pytest.raises(FloatingPointError, match="non-finite training loss .* at global step 0"):
                main(args)
        else:  # NaN weights: no batch can ever be finite again, so skipping is refused too
            with pytest.raises(FloatingPointError, match=r"global step 0 .*non-finite weights \(model.head"):
                main(args)
    finally:
        L.LightningModule.on_fit_start = original


def test_ddp_two_cpu_processes_gather_validation(tmp_path):
    """2-process CPU DDP validation sees every image once (9 images: the sampler pads one) and
    gives the same report as one process; a 2-process fast_dev_run trains."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    common = ["validate", "--config", "configs/quickstart.yaml", "--trainer.accelerator=cpu", *TINY_DET,
              "--trainer.enable_progress_bar=false",
              # an untrained head scores below the config's 0.05 threshold: keep every detection
              '--model.init_args.model.init_args.detector_kwargs={"min_size": 96, "max_size": 96, "score_thresh": 0.0}']
    reports = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        root = tmp_path / f"d{devices}"
        cmd = [sys.executable, "train.py", *common, f"--trainer.devices={devices}",
               f"--trainer.strategy={strategy}", f"--trainer.default_root_dir={root}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = next(root.glob("**/report/report.json"))
        reports[devices] = json.loads(report.read_text())["result"]
    # and a 2-process training step
    cmd = [sys.executable, "train.py", "fit", "--config", "configs/quickstart.yaml", "--trainer.accelerator=cpu",
           "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.fast_dev_run=1",
           "--trainer.enable_progress_bar=false",
           f"--trainer.default_root_dir={tmp_path / 'fit'}", *TINY_DET]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = reports[1], reports[2]
    assert one["num_images"] == two["num_images"] == 9
    assert one["num_predictions"] == two["num_predictions"] > 0
    for k in ("AP", "AP50", "AR100"):
        assert one[k] == pytest.approx(two[k], abs=1e-9)


def test_predict_returns_coco_results(tmp_path):
    args = ["predict", "--config", "configs/quickstart.yaml", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", *TINY_DET,
            '--model.init_args.model.init_args.detector_kwargs={"min_size": 96, "max_size": 96, "score_thresh": 0.0}']
    cli = main(args)
    batches = cli.trainer.predict_loop.predictions
    results = [r for batch in batches for r in batch]
    assert len(batches) == 3 and results  # 9 validation images, batch 4
    assert {r["image_id"] for r in results} == set(range(1, 10))
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} and 1 <= r["category_id"] <= 8 for r in results)


def test_eval_runs_in_float32_under_mixed_precision(monkeypatch):
    """Under bf16 autocast the heads' outputs and so the decoded boxes would be bfloat16 (a
    coordinate near 200 px rounds to 1 px); evaluation runs with autocast off unless asked."""
    import types

    import torch

    from visattn.lit import detection as lit_detection
    from visattn.models import build_detector

    seen = []

    def fake_predict(model, images, slicing):
        seen.append(torch.is_autocast_enabled("cpu"))
        with torch.no_grad():
            return model.eval()(images)

    monkeypatch.setattr(lit_detection, "predict_images", fake_predict)
    monkeypatch.setattr(lit_detection, "to_coco_results", lambda out, t, cats, segm: out["boxes"])
    torch.manual_seed(0)
    det = build_detector("fcos", backbone="resnet10t", num_classes=2, fpn_channels=32, min_size=64, max_size=64,
                         score_thresh=0.0)
    batch = ([torch.rand(3, 64, 64)], [{"image_id": 1}])
    results = {}
    for fp32 in (True, False):
        module = lit_detection.DetectionModule(det, eval_fp32=fp32)
        monkeypatch.setattr(module, "_categories", lambda: types.SimpleNamespace(
            categories=types.SimpleNamespace(to_category={1: 1, 2: 2})))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[fp32] = module._results(batch)[1]
    assert seen == [False, True]  # autocast is judged on the model's device
    with torch.no_grad():
        exact = det.eval()(batch[0])[0]["boxes"]
    assert results[True].dtype == torch.float32 and torch.equal(results[True], exact)
    assert results[False].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="eval_fp32"):
        lit_detection.DetectionModule(det, eval_fp32="yes")
