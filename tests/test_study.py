"""The attention study: compare_runs (bootstrap over images and seeds, verdicts), the runner's
arguments, resume (finished runs kept, broken ones redone) and the results files; training stubbed.
One real end-to-end grid (2 variants x 1 seed x 1 tiny epoch) is marked slow."""
import copy
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from visattn.data import generate_synthetic
from visattn.evaluation import evaluate
from visattn.evaluation.compare import (
    RUN_METRICS,
    benjamini_hochberg,
    bootstrap_p,
    compare_runs,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]


def _load_study():
    spec = importlib.util.spec_from_file_location("attention_study", ROOT / "benchmarks" / "attention_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


study = _load_study()


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory):
    root = generate_synthetic(tmp_path_factory.mktemp("s"), num_images=16, image_size=96, seed=3)
    return root / "annotations" / "instances.json"


@pytest.fixture(scope="module")
def gt(gt_path):
    return json.loads(gt_path.read_text())


def _preds(gt: dict, seed: int, keep: float, shift: float) -> list[dict]:
    """Predictions of a model that finds ``keep`` of the objects, boxes shifted by ``shift`` of their
    width, random scores, plus a little clutter."""
    rng = np.random.default_rng(seed)
    out = []
    for a in gt["annotations"]:
        if rng.random() < keep:
            x, y, w, h = a["bbox"]
            out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                        "bbox": [x + shift * w * rng.uniform(-1, 1), y, w, h]})
    for im in gt["images"]:
        out.append({"image_id": im["id"], "category_id": gt["categories"][0]["id"], "score": 0.2,
                    "bbox": [1.0, 1.0, 5.0, 5.0]})
    return out


def _weak(gt, seed):
    return _preds(gt, seed, keep=0.45, shift=0.3)


def _strong(gt, seed):
    return _preds(gt, 100 + seed, keep=0.95, shift=0.02)


# -- compare_runs ---------------------------------------------------------------------------------


def test_verdict_words():
    assert verdict(0.01, 0.2) == "helps" and verdict(-0.3, -0.01) == "hurts"
    assert verdict(-0.1, 0.1) == verdict(0.0, 0.0) == verdict(None, None) == "no evidence"


def test_compare_runs_known_answer_and_exact_point_values(gt):
    runs = {"baseline": {0: _weak(gt, 0), 1: _weak(gt, 1)},
            "copy": {0: copy.deepcopy(_weak(gt, 0)), 1: copy.deepcopy(_weak(gt, 1))},
            "better": {0: _strong(gt, 0), 1: _strong(gt, 1)},
            "worse": {0: [], 1: _preds(gt, 7, keep=0.1, shift=0.4)}}
    r = compare_runs(gt, runs, reference="baseline", n_boot=30)
    assert r["seeds"] == [0, 1] and r["models"] == sorted(runs) and tuple(r["metrics"]) == RUN_METRICS
    # point values at unit weights are evaluate()'s numbers
    ev = evaluate(gt, runs["better"][1], errors=False, per_class=False)
    got = r["values"]["better"]["1"]
    assert got["AP"] == pytest.approx(ev["AP"], abs=1e-12) and got["APs"] == pytest.approx(ev["APs"], abs=1e-12)
    for name, v in ev["size"].items():
        assert got[f"AP_{name}"] == pytest.approx(v["AP"], abs=1e-12)
    for name, v in ev["occlusion"].items():
        assert got[f"AP_occ_{name}"] == pytest.approx(v["AP"], abs=1e-12)
    assert got["occluded_recall"] == pytest.approx(ev["occluded_recall"]["recall"], abs=1e-12)
    # means and spreads over seeds
    ap = [r["values"]["baseline"][s]["AP"] for s in ("0", "1")]
    assert r["mean"]["baseline"]["AP"] == pytest.approx(np.mean(ap))
    assert r["std"]["baseline"]["AP"] == pytest.approx(np.std(ap, ddof=1))
    # identical predictions: no difference in any replicate
    for m in ("AP", "AP50", "AP_tiny", "AP_occ_partial", "occluded_recall"):
        c = r["diff"]["copy"][m]
        assert c["diff"] == c["low"] == c["high"] == 0.0 and c["verdict"] == "no evidence"
    assert r["diff"]["better"]["AP"]["verdict"] == "helps" and r["diff"]["better"]["AP"]["low"] > 0
    assert r["diff"]["better"]["AP_occ_none"]["verdict"] == "helps"
    assert r["diff"]["better"]["occluded_recall"]["verdict"] == "helps"
    assert r["diff"]["worse"]["AP"]["verdict"] == "hurts" and r["diff"]["worse"]["AP"]["high"] < 0
    assert "baseline" not in r["diff"]


def test_compare_runs_resamples_seeds(gt):
    # two seeds of very different quality: resampling seeds widens the interval
    runs = {"baseline": {0: _weak(gt, 0), 1: _weak(gt, 0)}, "b": {0: _weak(gt, 0), 1: _strong(gt, 0)}}
    with_seeds = compare_runs(gt, runs, reference="baseline", n_boot=30)["diff"]["b"]["AP"]
    images_only = compare_runs(gt, runs, reference="baseline", n_boot=30, resample_seeds=False)["diff"]["b"]["AP"]
    assert with_seeds["diff"] == images_only["diff"] > 0
    assert with_seeds["low"] == pytest.approx(0.0, abs=1e-12)  # some replicates draw seed 0 twice
    assert images_only["low"] > 0


def test_compare_runs_order_independent(gt):
    a, b = _weak(gt, 0), _strong(gt, 0)
    r1 = compare_runs(gt, {"baseline": {0: a}, "x": {0: b}}, reference="baseline", n_boot=20)
    shuffled = copy.deepcopy(gt)
    shuffled["annotations"].reverse()
    shuffled["images"].reverse()
    r2 = compare_runs(shuffled, {"x": {0: b[::-1]}, "baseline": {0: a[::-1]}}, reference="baseline", n_boot=20)
    assert r1 == r2


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"runs": []}, TypeError, "runs"),
    ({"runs": {"baseline": {}}}, TypeError, "runs['baseline']"),
    ({"reference": "nope"}, ValueError, "reference"),
    ({"reference": 3}, TypeError, "reference"),
    ({"runs": {"baseline": {0: []}, "x": {1: []}}}, ValueError, "same seeds"),
    ({"runs": {"baseline": {-1: []}}}, ValueError, "seed"),
    ({"n_boot": 0}, ValueError, "n_boot"),
    ({"confidence": 1.0}, ValueError, "confidence"),
    ({"resample_seeds": 1}, TypeError, "resample_seeds"),
    ({"fdr": 0.0}, ValueError, "fdr"),
    ({"fdr": 1.0}, ValueError, "fdr"),
    ({"fdr": "5%"}, TypeError, "fdr"),
])
def test_compare_runs_bad_arguments(gt, kwargs, exc, word):
    args = {"runs": {"baseline": {0: []}, "x": {0: []}}, "reference": "baseline", **kwargs}
    with pytest.raises(exc, match=word.replace("[", r"\[").replace("]", r"\]")):
        compare_runs(gt, args.pop("runs"), **args)


def test_bootstrap_p_and_benjamini_hochberg_known_answers():
    assert bootstrap_p([]) is None
    assert bootstrap_p([0.1] * 99) == pytest.approx(2 / 100)          # never 0: the +1 of a Monte-Carlo p
    assert bootstrap_p([-1.0, 1.0] * 50) == 1.0
    assert bootstrap_p([0.0] * 10) == 1.0                              # no difference at all
    assert bootstrap_p([1.0] * 90 + [-1.0] * 10) == pytest.approx(2 * 11 / 101)
    # p = .01 .03 .04 .5 over m = 4: adjusted .04 .0533 .0533 .5 (step-up minimum), only 'a' at 5%
    r = benjamini_hochberg({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5, "e": None}, 0.05)
    assert set(r) == {"a", "b", "c", "d"}
    assert r["a"] == (pytest.approx(0.04), True) and r["b"][0] == pytest.approx(0.16 / 3) and not r["b"][1]
    assert r["c"][0] == pytest.approx(0.16 / 3) and r["d"] == (pytest.approx(0.5), False)
    assert benjamini_hochberg({}, 0.05) == {}
    with pytest.raises(ValueError, match="q"):
        benjamini_hochberg({"a": 0.1}, 1.5)


def test_compare_runs_fdr_controls_the_table(gt):
    runs = {"baseline": {0: _weak(gt, 0)}, "same": {0: _weak(gt, 1)}, "better": {0: _strong(gt, 0)}}
    # enough replicates that a p-value can clear the correction (the smallest is 2 / (n_boot + 1))
    plain = compare_runs(gt, runs, reference="baseline", n_boot=200)
    fdr = compare_runs(gt, runs, reference="baseline", n_boot=200, fdr=0.05)
    assert plain["fdr"] is None and fdr["fdr"] == 0.05
    for m in fdr["metrics"]:
        for v in ("same", "better"):
            c, c0 = fdr["diff"][v][m], plain["diff"][v][m]
            assert (c["low"], c["high"], c["p"]) == (c0["low"], c0["high"], c0["p"])  # same replicates
            if c["significant"]:  # a BH rejection is at least as strict as the interval
                assert c0["significant"] and c["p_adjusted"] <= 0.05
                assert c["verdict"] == ("helps" if c["diff"] > 0 else "hurts")
            else:
                assert c["verdict"] == "no evidence"
    assert fdr["diff"]["better"]["AP"]["verdict"] == "helps"
    assert {"AP50_occ_heavy", "AR_occ_heavy", "AR_occ_partial"} <= set(fdr["metrics"])


# -- the runner -----------------------------------------------------------------------------------


def test_variants_are_data_driven():
    avail = study.available_variants()
    assert next(iter(avail)) == "baseline"
    assert {"se", "eca", "cbam", "coord", "gc", "window", "scale"} <= set(avail)
    assert "no-such-neck" not in avail and not study._neck_available("no-such-neck")
    assert set(study.NECK_CANDIDATES) & set(avail) == {n for n in study.NECK_CANDIDATES if study._neck_available(n)}


@pytest.mark.parametrize("argv, word", [
    (["--variants", "baseline,nope"], "unknown variant 'nope'"),
    (["--variants", "se,eca"], "must include 'baseline'"),
    (["--variants", "baseline,se,se"], "twice"),
    (["--variants", ","], "at least one"),
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "two"], "--seeds"),
    (["--parallel", "0"], "--parallel"),
    (["--max-epochs", "1.5"], "--max-epochs"),
    (["--image-size", "16"], "--image-size"),
    (["--n-boot", "-3"], "--n-boot"),
    (["--accelerator", "tpu"], "--accelerator"),
    (["--config", "no/such.yaml"], "--config"),
    (["--work-dir", " "], "--work-dir"),
])
def test_bad_arguments_name_the_option(argv, word):
    with pytest.raises(ValueError, match=word):
        study.parse_args(argv)


def test_variant_order_and_overrides(tmp_path):
    args = study.parse_args(["--variants", "cbam,baseline,scale", "--seeds", "2", "--max-epochs", "2",
                             "--num-train", "10", "--num-val", "5", "--image-size", "64", "--warmup-steps", "3",
                             "--work-dir", str(tmp_path)])
    assert args.variants == ["baseline", "cbam", "scale"] and args.seeds == [0, 1]
    base, root, runs = study.plan(args)
    assert [(v, s) for v, s, _, _ in runs] == [(v, s) for s in (0, 1) for v in ("baseline", "cbam", "scale")]
    model = study._model_args(base)
    assert "attention" not in model and model["detector_kwargs"]["min_size"] == 64  # the config's eca is gone
    # a learning curve by default: validated every epoch
    assert base["trainer"]["check_val_every_n_epoch"] == 1 and base["data"]["init_args"]["num_train"] == 10
    every2 = study.base_config(study.parse_args(["--max-epochs", "4", "--val-every", "2"]))
    assert every2["trainer"]["check_val_every_n_epoch"] == 2
    with pytest.raises(ValueError, match="--val-every 3 must divide"):
        study.base_config(study.parse_args(["--max-epochs", "4", "--val-every", "3"]))
    import yaml

    cfg = {v: yaml.safe_load(t) for v, s, _, t in runs if s == 1}
    assert study._model_args(cfg["cbam"])["attention"] == "cbam" and cfg["cbam"]["seed_everything"] == 1
    assert study._model_args(cfg["scale"])["neck_attention"] == "scale"
    assert "attention" not in study._model_args(cfg["baseline"])
    # other settings go to another folder
    other = study.plan(study.parse_args(["--variants", "baseline", "--max-epochs", "3", "--work-dir", str(tmp_path)]))
    assert other[1] != root


def _fake_launch(gt: dict, calls: list, fail: set = frozenset(), **extra):
    """Stands in for training: writes what a run writes (better predictions for non-baselines);
    ``extra`` goes into its result.json."""
    def launch(run_dir: Path, threads: int):
        variant, seed = run_dir.name.rsplit("-seed", 1)
        calls.append(run_dir.name)
        if run_dir.name in fail:
            return 1, 0.0
        preds = _weak(gt, int(seed)) if variant == "baseline" else _strong(gt, int(seed))
        (run_dir / "predictions.json").write_text(json.dumps(preds))
        (run_dir / "report").mkdir()
        (run_dir / "report" / "report.json").write_text("{}")
        sha = {n: hashlib.sha256((run_dir / n).read_bytes()).hexdigest()
               for n in ("study-config.yaml", "predictions.json", "report/report.json")}
        (run_dir / "result.json").write_text(json.dumps({"params": 1000 + len(variant), "train_images": 10,
                                                         "train_seconds": 2.0, "train_images_per_s": 5.0,
                                                         "wall_s": 3.0, "device": "cpu", "sha256": sha,
                                                         "settings": run_dir.parent.name, **extra}))
        return 0, 0.1
    return launch


def test_resume_keeps_finished_and_redoes_broken_runs(tmp_path, gt):
    args = study.parse_args(["--variants", "baseline,se", "--seeds", "2", "--max-epochs", "1",
                             "--work-dir", str(tmp_path / "w"), "--parallel", "2"])
    _, _, runs = study.plan(args)
    calls: list = []
    done = study.run_grid(args, runs, launch=_fake_launch(gt, calls, fail={"se-seed1"}))
    assert sorted(calls) == ["baseline-seed0", "baseline-seed1", "se-seed0", "se-seed1"]
    assert set(done) == {("baseline", 0), ("baseline", 1), ("se", 0)}  # the failed run is not counted
    calls.clear()
    done = study.run_grid(args, runs, launch=_fake_launch(gt, calls))
    assert calls == ["se-seed1"] and len(done) == 4  # only the failed one again
    calls.clear()
    assert study.run_grid(args, runs, launch=_fake_launch(gt, calls)) == done and calls == []
    dirs = {d.name: d for _, _, d, _ in runs}
    (dirs["baseline-seed1"] / "predictions.json").write_text("[]")       # edited / truncated output
    (dirs["se-seed0"] / "result.json").unlink()                          # interrupted before the end
    (dirs["baseline-seed0"] / "study-config.yaml").write_text("other: 1\n")  # another config
    done = study.run_grid(args, runs, launch=_fake_launch(gt, calls))
    assert sorted(calls) == ["baseline-seed0", "baseline-seed1", "se-seed0"] and len(done) == 4
    # analyze-only never trains
    calls.clear()
    (dirs["se-seed0"] / "result.json").unlink()
    args.analyze_only = True
    assert len(study.run_grid(args, runs, launch=_fake_launch(gt, calls))) == 3 and calls == []


def test_run_trained_by_another_live_invocation_is_left_alone(tmp_path, gt):
    import subprocess
    import sys

    args = study.parse_args(["--variants", "baseline", "--seeds", "2", "--max-epochs", "1",
                             "--work-dir", str(tmp_path / "w")])
    _, _, runs = study.plan(args)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for (_, _, run_dir, _), pid in zip(runs, (os.getppid(), dead.pid), strict=True):
        run_dir.mkdir(parents=True)
        (run_dir / "owner.pid").write_text(str(pid))
        (run_dir / "partial").write_text("x")
    calls: list = []
    done = study.run_grid(args, runs, launch=_fake_launch(gt, calls))
    assert calls == ["baseline-seed1"] and set(done) == {("baseline", 1)}  # the live owner's run is untouched
    assert (runs[0][2] / "partial").exists() and not (runs[1][2] / "partial").exists()


def _archived_grid(tmp_path, gt, gt_path, variants="baseline,se", seeds="2"):
    argv = ["--variants", variants, "--seeds", seeds, "--max-epochs", "1", "--work-dir", str(tmp_path / "w"),
            "--out-dir", str(tmp_path / "out"), "--n-boot", "200"]
    args = study.parse_args(argv)
    base, _, runs = study.plan(args)
    dest = study.archive_dir(args)
    study.archive_study(dest, base, str(gt_path), argv)
    args.archive = dest
    done = study.run_grid(args, runs, launch=_fake_launch(gt, []))
    return args, runs, done, dest


def test_results_files_rebuild_bit_for_bit_from_the_archive(tmp_path, gt, gt_path):
    args, _runs, _done, dest = _archived_grid(tmp_path, gt, gt_path)
    assert dest == tmp_path / "out" / "attention-study-cpu"
    kept = sorted(p.name for p in dest.iterdir())
    assert kept == ["baseline-seed0", "baseline-seed1", "se-seed0", "se-seed1", "study.json", "val-gt.json.gz"]
    assert sorted(p.name for p in (dest / "se-seed1").iterdir()) == [
        "predictions.json.gz", "report-report.json", "result.json", "study-config.yaml"]
    md = study.write_results(args, dest)
    text = md.read_text()
    assert md.name == "attention-study-cpu.md" and "| se |" in text and "study_gpu.sh" in text
    assert "**helps**" in text and "Benjamini-Hochberg" in text and "has the baseline converged?" in text
    assert "--analyze-only" in text and "--work-dir" not in text  # where files went here is not the command
    data = json.loads(md.with_suffix(".json").read_text())
    assert list(data["variants"]) == ["baseline", "se"] and set(data["comparison"]) == {"se"}
    assert data["comparison"]["se"]["AP"]["verdict"] == "helps" and data["comparison"]["se"]["AP"]["p_adjusted"] <= 0.05
    assert data["variants"]["se"]["params"] == 1002 and data["variants"]["se"]["train_images_per_s"] == 5.0
    assert md.with_suffix(".png").stat().st_size > 1000
    assert (md.parent / "attention-study-cpu-curves.png").stat().st_size > 1000
    files = {p.name: p.read_bytes() for p in md.parent.glob("attention-study-cpu*") if p.is_file()}
    # the work dir is gone (a fresh clone): --analyze-only rebuilds the same bytes from the archive alone
    import shutil

    shutil.rmtree(tmp_path / "w")
    args.analyze_only = True
    assert study.main(["--analyze-only", "--variants", "baseline,se", "--seeds", "2", "--n-boot", "200",
                       "--out-dir", str(tmp_path / "out")]) == 0
    assert {p.name: p.read_bytes() for p in md.parent.glob("attention-study-cpu*") if p.is_file()} == files
    # an edited archived file is refused, naming the run
    preds = dest / "se-seed0" / "predictions.json.gz"
    preds.write_bytes(study._gz_bytes(b"[]"))
    with pytest.raises(ValueError, match="se-seed0.*predictions.json does not match"):
        study.write_results(args, dest)


def test_unfinished_baseline_gives_no_table(tmp_path, gt, gt_path):
    args, _runs, _done, dest = _archived_grid(tmp_path, gt, gt_path)
    (dest / "baseline-seed1" / "result.json").unlink()
    with pytest.raises(RuntimeError, match="rerun"):
        study.write_results(args, dest)
    # a variant without every seed is left out and listed
    args, _runs, _done, dest = _archived_grid(tmp_path / "b", gt, gt_path)
    (dest / "se-seed1" / "result.json").unlink()
    md = study.write_results(args, dest)
    assert "Unfinished (left out): se" in md.read_text()


def test_runs_of_one_table_share_their_code_state(tmp_path, gt, gt_path):
    args, runs, done, dest = _archived_grid(tmp_path, gt, gt_path)
    for key, run_dir in ((("se", 1), dest / "se-seed1"), (("baseline", 0), dest / "baseline-seed0")):
        r = json.loads((run_dir / "result.json").read_text())
        r.update(code_state="aaaa" if key[0] == "se" else "bbbb", git_commit="c0ffee")
        (run_dir / "result.json").write_text(json.dumps(r))
    with pytest.raises(ValueError, match=r"(?s)code state.*se-seed1.*worktree"):
        study.write_results(args, dest)
    # the grid refuses to add runs to finished ones of another code state, naming them ...
    results = {k: {**v, "code_state": "old", "git_commit": "abc"} for k, v in done.items()}
    with pytest.raises(ValueError, match=r"(?s)this checkout's.*commit abc.*baseline-seed0, baseline-seed1, se-seed0"):
        study.check_code_states(results, current="new")
    study.check_code_states(results, current="old")
    # ... and retrains them with --redo-stale
    for _, _, run_dir, _ in runs:
        r = json.loads((run_dir / "result.json").read_text())
        (run_dir / "result.json").write_text(json.dumps({**r, "code_state": "old"}))
    with pytest.raises(ValueError, match="--redo-stale"):
        study.run_grid(args, runs, launch=_fake_launch(gt, []), current="new")
    calls: list = []
    args.redo_stale = True
    study.run_grid(args, runs, launch=_fake_launch(gt, calls), current="new")
    assert sorted(calls) == ["baseline-seed0", "baseline-seed1", "se-seed0", "se-seed1"]


def test_code_state_covers_the_training_code(tmp_path):
    (tmp_path / "visattn" / "sub").mkdir(parents=True)
    (tmp_path / "visattn" / "a.py").write_text("x = 1\n")
    (tmp_path / "visattn" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "train.py").write_text("main()\n")
    one = study.code_state(tmp_path)
    assert one == study.code_state(tmp_path) and one["versions"]["torch"]
    (tmp_path / "visattn" / "sub" / "b.py").write_text("y = 3\n")
    two = study.code_state(tmp_path)
    assert two["code_state"] != one["code_state"]
    (tmp_path / "README.md").write_text("docs do not train\n")
    assert study.code_state(tmp_path) == two
    assert study.git_commit(tmp_path) == "unknown"


def test_variants_wire_blocks_as_their_papers():
    cand = study.candidate_variants()
    for b in study.BACKBONE_BLOCKS:
        assert cand[b][1]["attention_gate"] == "none"
    assert cand["se_gated"][1] == {"attention": "se", "attention_gate": "zero"}
    assert cand["no_p2"][1] == {"p2": False}
    default = study.default_variants()
    assert {"baseline", "se", "eca", "cbam", "coord", "gc", "simam", "window", "scale", "se_gated", "no_p2"} == set(default)


@pytest.mark.slow
def test_real_tiny_grid_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("VISATTN_CACHE", str(tmp_path / "cache"))
    argv = ["--variants", "baseline,se", "--seeds", "1", "--max-epochs", "1", "--num-train", "8", "--num-val", "4",
            "--image-size", "64", "--batch-size", "4", "--warmup-steps", "1", "--work-dir", str(tmp_path / "w"),
            "--out-dir", str(tmp_path / "out"), "--n-boot", "20", "--threads", "1"]
    assert study.main(argv) == 0
    data = json.loads((tmp_path / "out" / "attention-study-cpu.json").read_text())
    assert set(data["variants"]) == {"baseline", "se"}
    assert data["variants"]["se"]["params"] > data["variants"]["baseline"]["params"]
    assert data["variants"]["baseline"]["train_images_per_s"] > 0
    run = tmp_path / "out" / "attention-study-cpu" / "se-seed0"
    result = json.loads((run / "result.json").read_text())
    assert (run / "report-report.json").is_file() and (run / "predictions.json.gz").is_file()
    assert result["flops"] > 0 and result["flops_image_size"] == 64 and result["gate_values"] == {}
    assert result["code_state"] == study.code_state()["code_state"] and result["git_commit"] != "unknown"
    assert data["variants"]["se"]["flops"] > data["variants"]["baseline"]["flops"]
    assert data["variants"]["baseline"]["val_AP_by_epoch"]["0"][0][0] == 1  # the curve, epoch by epoch
    mtime = (run / "result.json").stat().st_mtime
    assert study.main(argv) == 0  # resumed: nothing retrained
    assert (run / "result.json").stat().st_mtime == mtime


# -- review fixes ---------------------------------------------------------------------------------


def test_bootstrap_p_and_benjamini_hochberg_check_their_arguments():
    with pytest.raises(ValueError, match=r"diffs\[1\]"):
        bootstrap_p([0.1, float("nan")])  # a NaN counted on neither side looked like evidence
    with pytest.raises(TypeError, match="diffs"):
        bootstrap_p("0.1")
    with pytest.raises(TypeError, match="diffs"):
        bootstrap_p(None)
    with pytest.raises(TypeError, match="p_values"):
        benjamini_hochberg([0.1, 0.2])
    with pytest.raises(ValueError, match=r"p_values\['a'\]"):
        benjamini_hochberg({"a": 1.5})
    with pytest.raises(ValueError, match=r"p_values\['b'\]"):
        benjamini_hochberg({"a": 0.1, "b": float("nan")})
    with pytest.raises(TypeError, match=r"p_values\['a'\]"):
        benjamini_hochberg({"a": "0.1"})


def _grid(tmp_path, gt, gt_path, argv, **extra):
    args = study.parse_args(argv)
    base, _, runs = study.plan(args)
    dest = study.archive_dir(args)
    study.archive_study(dest, base, str(gt_path), argv)
    args.archive = dest
    study.run_grid(args, runs, launch=_fake_launch(gt, [], **extra))
    return args, runs, dest


def test_one_archive_holds_one_settings(tmp_path, gt, gt_path):
    args, runs, _done, dest = _archived_grid(tmp_path, gt, gt_path)
    # a grid of other settings into the same archive is refused, naming the runs kept there
    argv = ["--variants", "baseline", "--seeds", "1", "--max-epochs", "2", "--work-dir", str(tmp_path / "w"),
            "--out-dir", str(tmp_path / "out")]
    other = study.parse_args(argv)
    base, _, _ = study.plan(other)
    with pytest.raises(ValueError, match=r"(?s)settings.*baseline-seed0.*--archive-dir"):
        study.archive_study(dest, base, str(gt_path), argv)
    assert json.loads((dest / "study.json").read_text())["settings"] == runs[0][2].parent.name  # untouched
    # a run of other settings in the archive (copied by hand, left from an older grid) is refused
    r = json.loads((dest / "se-seed1" / "result.json").read_text())
    (dest / "se-seed1" / "result.json").write_text(json.dumps({**r, "settings": "0123456789"}))
    with pytest.raises(ValueError, match=r"se-seed1.*settings 0123456789"):
        study.write_results(args, dest)
    (dest / "se-seed1" / "result.json").write_text(json.dumps(r))
    # a folder whose config is another seed's or another variant's is refused
    import shutil

    shutil.copytree(dest / "se-seed0", dest / "se-seed7")
    with pytest.raises(ValueError, match=r"se-seed7.*seed_everything 0"):
        study.write_results(args, dest)
    shutil.rmtree(dest / "se-seed7")
    shutil.copytree(dest / "se-seed0", dest / "cbam-seed0")
    with pytest.raises(ValueError, match=r"cbam-seed0: not the run its folder names"):
        study.write_results(args, dest)
    shutil.rmtree(dest / "cbam-seed0")
    study.write_results(args, dest)


def test_archived_copy_is_replaced_whole_and_repaired(tmp_path, gt, gt_path, monkeypatch):
    args, runs, _done, dest = _archived_grid(tmp_path, gt, gt_path)
    dirs = {d.name: d for _, _, d, _ in runs}
    # a crash while re-archiving left new predictions beside the old result.json: the next
    # invocation of the grid puts the archived copy right (it did not: the run was "archived")
    (dest / "se-seed0" / "predictions.json.gz").write_bytes(study._gz_bytes(b"[]"))
    calls: list = []
    study.run_grid(args, runs, launch=_fake_launch(gt, calls))
    assert calls == []
    study.write_results(args, dest)
    # a retrained run replaces its archived copy whole: nothing of the old copy is left
    (dest / "se-seed0" / "stray.txt").write_text("old")
    (dirs["se-seed0"] / "result.json").unlink()
    study.run_grid(args, runs, launch=_fake_launch(gt, calls))
    assert calls == ["se-seed0"] and not (dest / "se-seed0" / "stray.txt").exists()
    assert (dest / "se-seed0" / "result.json").read_bytes() == (dirs["se-seed0"] / "result.json").read_bytes()
    # an archiving that fails half way leaves the archived copy as it was, and no temporary folder
    before = {p.name: p.read_bytes() for p in (dest / "se-seed0").iterdir()}

    def boom(data):
        raise OSError("disk full")

    monkeypatch.setattr(study, "_gz_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        study.archive_run(dirs["se-seed0"], dest / "se-seed0")
    assert {p.name: p.read_bytes() for p in (dest / "se-seed0").iterdir()} == before
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("damage", ["no predictions", "bad gzip", "no sha256", "bad json", "no report", "no gt",
                                    "bad study.json"])
def test_damaged_archive_is_a_named_error(tmp_path, gt, gt_path, damage):
    args, _runs, _done, dest = _archived_grid(tmp_path, gt, gt_path)
    run = dest / "se-seed0"
    if damage == "no predictions":
        (run / "predictions.json.gz").unlink()
    elif damage == "bad gzip":
        (run / "predictions.json.gz").write_bytes(b"not gzip")
    elif damage == "no sha256":
        r = json.loads((run / "result.json").read_text())
        del r["sha256"]
        (run / "result.json").write_text(json.dumps(r))
    elif damage == "bad json":
        (run / "result.json").write_text("{")
    elif damage == "no report":
        (run / "report-report.json").unlink()
    elif damage == "no gt":
        (dest / "val-gt.json.gz").unlink()
        run = dest
    else:
        (dest / "study.json").write_text("{")
        run = dest
    with pytest.raises(ValueError, match=str(run)):
        study.write_results(args, dest)


@pytest.mark.parametrize("gpu", [False, True])
def test_the_printed_analyze_command_rebuilds_the_files(tmp_path, gt, gt_path, gpu):
    import re
    import shlex
    import shutil

    out = tmp_path / "out"
    argv = ["--variants", "baseline,se", "--seeds", "2", "--max-epochs", "1", "--work-dir", str(tmp_path / "w"),
            "--out-dir", str(out), "--n-boot", "200", "--note", "a note"] + (["--accelerator", "gpu"] if gpu else [])
    args, _runs, dest = _grid(tmp_path, gt, gt_path, argv, **({"device_type": "cuda"} if gpu else {}))
    md = study.write_results(args, dest)
    label = "gpu" if gpu else "cpu"
    assert md.name == f"attention-study-{label}.md"
    files = {p.name: p.read_bytes() for p in out.glob(f"attention-study-{label}*") if p.is_file()}
    cmd = re.search(r"this file again from the committed runs: `([^`]*)`", md.read_text()).group(1)
    parts = shlex.split(cmd)
    assert parts[:2] == ["python", "benchmarks/attention_study.py"] and "--analyze-only" in parts
    shutil.rmtree(tmp_path / "w")
    for p in out.glob(f"attention-study-{label}*"):
        if p.is_file():
            p.unlink()
    assert study.main([*parts[2:], "--out-dir", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.glob(f"attention-study-{label}*") if p.is_file()} == files


def test_table_header_counts_only_the_analysed_runs(tmp_path, gt, gt_path):
    args, _runs, _done, dest = _archived_grid(tmp_path, gt, gt_path, seeds="3")
    r = json.loads((dest / "baseline-seed2" / "result.json").read_text())
    r.update(git_commit="feedface", device="other-machine", device_type="cuda", load_start=99.0)
    (dest / "baseline-seed2" / "result.json").write_text(json.dumps(r))
    args.seeds = [0, 1]
    md = study.write_results(args, dest)
    text = md.read_text()
    assert md.name == "attention-study-cpu.md"
    assert "feedface" not in text and "other-machine" not in text and "99.00" not in text


def test_json_verdicts_only_for_the_cells_the_correction_covers(tmp_path, gt, gt_path):
    args, _runs, _done, dest = _archived_grid(tmp_path, gt, gt_path)
    data = json.loads(study.write_results(args, dest).with_suffix(".json").read_text())
    se = data["comparison"]["se"]
    assert "AP50" in se and "AP50" not in study.COMPARE_COLUMNS
    assert se["AP50"]["p"] is not None and se["AP50"]["p_adjusted"] is None
    assert se["AP50"]["verdict"] == "not tested" and not se["AP50"]["significant"]
    tested = [m for m in study.COMPARE_COLUMNS if m in se and se[m]["p"] is not None]
    assert data["fdr_cells"] == len(tested)
    # the BH family as summarize states it: recomputing it from the p-values gives the same verdicts
    again = benjamini_hochberg({m: se[m]["p"] for m in tested}, data["fdr"])
    for m in tested:
        assert se[m]["p_adjusted"] == pytest.approx(again[m][0]) and se[m]["significant"] == again[m][1]


def test_fdr_family_counts_only_cells_with_a_p_value(tmp_path):
    root = generate_synthetic(tmp_path, num_images=6, image_size=64, seed=5)
    gt_data = json.loads((root / "annotations" / "instances.json").read_text())
    runs = {"baseline": {0: _weak(gt_data, 0), 1: _weak(gt_data, 1)},
            "se": {0: _strong(gt_data, 0), 1: _strong(gt_data, 1)}}
    res = {(v, s): {"params": 1, "wall_s": 1.0, "train_images_per_s": 1.0, "device": "cpu"} for v in runs for s in (0, 1)}
    preds = {(v, s): runs[v][s] for v in runs for s in (0, 1)}
    out = study.summarize(["baseline", "se"], [0, 1], gt_data, res, preds, n_boot=50)
    se = out["comparison"]["se"]
    assert [m for m in study.COMPARE_COLUMNS if m in se and se[m]["p"] is None]  # a bin without ground truth
    assert out["fdr_cells"] == sum(1 for m in study.COMPARE_COLUMNS if m in se and se[m]["p"] is not None)


def test_stale_run_left_to_another_invocation_is_not_counted_finished(tmp_path, gt, gt_path):
    args, runs, _done, _dest = _archived_grid(tmp_path, gt, gt_path)
    for _, _, run_dir, _ in runs:
        r = json.loads((run_dir / "result.json").read_text())
        (run_dir / "result.json").write_text(json.dumps({**r, "code_state": "old"}))
    (runs[0][2] / "owner.pid").write_text(str(os.getppid()))  # another live invocation has it
    args.redo_stale = True
    calls: list = []
    done = study.run_grid(args, runs, launch=_fake_launch(gt, calls), current="new")
    assert (runs[0][0], runs[0][1]) not in done and len(calls) == 3
    assert all(r.get("code_state") != "old" for r in done.values())


def test_code_state_covers_the_data_libraries():
    versions = study.code_state()["versions"]
    # the synthetic images are drawn with Pillow, their masks and areas by pycocotools, the
    # training augmentation is albumentations (on albucore / OpenCV)
    assert {"pillow", "pycocotools", "albumentations", "albucore", "opencv-python-headless"} <= set(versions)


def test_identity_check_reads_the_variant_from_the_config(tmp_path, gt, gt_path):
    import yaml

    _args, _runs, _done, dest = _archived_grid(tmp_path, gt, gt_path)
    cfg = yaml.safe_load((dest / "se-seed0" / "study-config.yaml").read_text())
    del cfg["trainer"]["default_root_dir"]  # the variant's model arguments alone tell
    assert study._identity_problem(dest / "se-seed0", cfg, {}, None) is None
    assert "attention='se'" in study._identity_problem(dest / "cbam-seed0", cfg, {}, None)
    assert "attention='se'" in study._identity_problem(dest / "baseline-seed0", cfg, {}, None)
    assert "seed_everything 0" in study._identity_problem(dest / "se-seed1", cfg, {}, None)


def test_public_command_drops_local_paths_however_spelled():
    argv = ["--variants", "baseline,se", "--work-d", "/home/me/w", "--out-dir=/tmp/o", "--archive", "/x",
            "--time-b", "100", "--note", "--work-dir is a word here", "--seeds", "2"]
    assert study._public_argv(argv) == ["--variants", "baseline,se", "--note", "--work-dir is a word here",
                                        "--seeds", "2"]


def test_empty_archive_dir_is_refused():
    with pytest.raises(ValueError, match="--archive-dir"):
        study.parse_args(["--archive-dir", " "])


def test_a_run_whose_code_changed_while_it_trained_is_not_kept(tmp_path, monkeypatch):
    import visattn.lit.cli as cli_mod

    run_dir = tmp_path / "abc" / "baseline-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "study-config.yaml").write_text("seed_everything: 0\n")
    states = iter([{"code_state": "before", "versions": {}}, {"code_state": "after", "versions": {}}])
    monkeypatch.setattr(study, "code_state", lambda root=None: next(states))
    monkeypatch.setattr(study, "git_commit", lambda root=None: "abc")

    class FakeCLI:
        def __init__(self, *a, **k):
            pass

    monkeypatch.setattr(cli_mod, "VisattnCLI", FakeCLI)
    monkeypatch.setattr(study.sys, "argv", ["x"])
    with pytest.raises(RuntimeError, match="code state changed while the run trained"):
        study.train_one(run_dir, 1)
    assert not (run_dir / "result.json").exists()
