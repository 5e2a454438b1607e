"""Does attention help small and occluded objects? One grid of training runs, one table.

Every run trains the detector of one base config (default ``configs/quickstart.yaml``) with the
same data, schedule and seeds; only the attention changes: none (``baseline``), a block plugged into
the backbone's residual blocks (``se``, ``eca``, ``cbam``, ``coord``, ``gc``; ECA-Net, SENet, CBAM,
Coordinate Attention, GCNet), a token block in the backbone's last stage only (``window``: Swin,
``sra``: PVT), or attention in the FPN neck (``scale``: DyHead's scale-aware attention, and any other
neck attention ``visattn.models.build_detector`` accepts from :data:`NECK_CANDIDATES`). Each run's
validation predictions and evaluation report are kept; then :func:`visattn.evaluation.compare.compare_runs`
compares every variant with the baseline by a bootstrap that resamples images and seeds (paired),
and the results go to ``benchmarks/results/attention-study-<device>.{md,json,png}``.

    python benchmarks/attention_study.py                                  # the full grid, 3 seeds
    python benchmarks/attention_study.py --variants baseline,se,eca,cbam --seeds 2 \\
        --max-epochs 3 --num-train 300 --num-val 100 --image-size 128      # a reduced look

A run lives in ``<work dir>/<settings hash>/<variant>-seed<k>/``: its ``study-config.yaml`` (train it
alone with ``python train.py fit --config <that file>``; the CLI saves the resolved form as
``config.yaml``), ``predictions.json``, ``report/`` and, written last, ``result.json`` with the
sha256 of the other three. A run whose ``result.json`` verifies is not
redone; any other (interrupted, half written, edited) is cleared and redone, so an interrupted grid
resumes by running the same command again. ``--parallel N`` trains N runs side by side (separate
processes; on one GPU they share it).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from visattn._checks import check_int
from visattn._io import atomic_path, atomic_write_json, atomic_write_text

#: Candidate variants in table order: name -> (kind, build_detector arguments). ``attention_stages``
#: ``"last"`` is resolved to the backbone's last stage. Neck candidates are kept only when the
#: installed ``build_detector`` accepts them (see :func:`available_variants`).
BACKBONE_BLOCKS = ("se", "eca", "cbam", "coord", "gc")
TOKEN_BLOCKS = ("window", "sra")
NECK_CANDIDATES = ("scale", "dyhead", "deformable")
REFERENCE = "baseline"
#: The default grid: every available variant but ``sra`` (one token block is enough; ask for it).
NOT_BY_DEFAULT = ("sra",)
#: Table columns, as :data:`visattn.evaluation.compare.RUN_METRICS` names them.
SIZE_COLUMNS = ("AP_very_tiny", "AP_tiny", "AP_small", "AP_medium", "AP_large")
OCC_COLUMNS = ("AP_occ_none", "AP_occ_partial", "AP_occ_heavy")
DEVICES = ("cpu", "gpu", "auto")
RESULT = "result.json"
OWNER = "owner.pid"
#: The run's config as the study wrote it (the training CLI writes its resolved form to config.yaml).
RUN_CONFIG = "study-config.yaml"
#: The full grid on one GPU (benchmarks/study_gpu.sh): the quickstart's data and model, 3 seeds,
#: twice the quickstart's schedule (its val/AP still rose at epoch 6; the curve every 3 epochs shows
#: whether 12 reach the plateau), several runs side by side.
GPU_ARGS = ("--accelerator", "gpu", "--seeds", "3", "--max-epochs", "12", "--val-every", "3", "--parallel", "8",
            "--threads", "2")


# --------------------------------------------------------------------------------------------------
# variants


def candidate_variants() -> dict[str, tuple[str, dict]]:
    """Every variant the study knows, in table order: ``name -> (kind, model arguments)``."""
    out: dict[str, tuple[str, dict]] = {REFERENCE: ("none", {})}
    out.update({b: ("backbone", {"attention": b}) for b in BACKBONE_BLOCKS})
    out.update({b: ("token, last stage", {"attention": b, "attention_stages": "last"}) for b in TOKEN_BLOCKS})
    out.update({n: ("neck", {"neck_attention": n}) for n in NECK_CANDIDATES})
    return out


def _neck_available(name: str) -> bool:
    """Whether the installed ``build_detector`` accepts ``neck_attention=name`` (checked on its
    argument validation alone: nothing is built)."""
    from visattn.models import detection

    try:
        detection._neck_attention([name])
    except (TypeError, ValueError):
        return False
    return True


def available_variants() -> dict[str, tuple[str, dict]]:
    """:func:`candidate_variants` that this visattn can build (blocks registered, neck attention
    accepted), so that neck attentions added later join the grid without editing this file."""
    from visattn.registry import list_blocks

    blocks = set(list_blocks())
    out = {}
    for name, (kind, args) in candidate_variants().items():
        if "attention" in args and args["attention"] not in blocks:
            continue
        if "neck_attention" in args and not _neck_available(args["neck_attention"]):
            continue
        out[name] = (kind, args)
    return out


def default_variants() -> list[str]:
    return [v for v in available_variants() if v not in NOT_BY_DEFAULT]


# --------------------------------------------------------------------------------------------------
# arguments


def _int(option: str, text: str, minimum: int) -> int:
    """``text`` as an int >= ``minimum``, else ``ValueError`` naming ``option``."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{option} must be an int >= {minimum}, got {text!r}") from None
    return check_int(option, value, minimum)


def _variant_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise ValueError(f"--variants must name at least one variant, got {text!r}")
    known, available = candidate_variants(), available_variants()
    for v in names:
        if v not in known:
            raise ValueError(f"--variants: unknown variant {v!r}; choose from {', '.join(known)}")
        if v not in available:
            raise ValueError(f"--variants: {v!r} is not available in this visattn (not registered / not "
                             f"accepted by build_detector); available: {', '.join(available)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--variants names a variant twice: {text!r}")
    if REFERENCE not in names:
        raise ValueError(f"--variants must include {REFERENCE!r}: every variant is compared with it")
    return [v for v in known if v in names]  # table order, whatever order was given


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attention_study.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml", help="base training config (train.py)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, must include {REFERENCE!r} (default: every available one but "
                        f"{', '.join(NOT_BY_DEFAULT)})")
    p.add_argument("--seeds", default="3", help="number of seeds (0..N-1), default 3")
    p.add_argument("--max-epochs", default=None, help="epochs per run (default: the config's)")
    p.add_argument("--val-every", default=None,
                   help="validate every N epochs (a learning curve; must divide the epochs), default: at the end")
    p.add_argument("--num-train", default=None, help="synthetic training images (default: the config's)")
    p.add_argument("--num-val", default=None, help="synthetic validation images (default: the config's)")
    p.add_argument("--image-size", default=None, help="synthetic image side and detector input size")
    p.add_argument("--batch-size", default=None, help="training batch size (default: the config's)")
    p.add_argument("--warmup-steps", default=None, help="WarmupCosineLR warm-up steps (default: the config's)")
    p.add_argument("--accelerator", default=None, help=f"one of {', '.join(DEVICES)} (default: the config's)")
    p.add_argument("--parallel", default="1", help="runs trained side by side (processes), default 1")
    p.add_argument("--threads", default=None, help="torch CPU threads per run (default: cores / parallel)")
    p.add_argument("--work-dir", default="runs/attention-study", help="where the runs go")
    p.add_argument("--out-dir", default="benchmarks/results", help="where attention-study-<device>.* go")
    p.add_argument("--n-boot", default="1000", help="bootstrap replicates (default 1000)")
    p.add_argument("--time-budget", default=None,
                   help="seconds: start no run after this long (the rest waits for the next invocation)")
    p.add_argument("--note", default="", help="a line printed at the top of the results file")
    p.add_argument("--analyze-only", action="store_true", help="only (re)write the results from finished runs")
    p.add_argument("--list-variants", action="store_true", help="print the variants and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: train one run dir
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line; a bad value is a ``ValueError`` naming its option."""
    a = build_parser().parse_args(argv)
    a.variants = default_variants() if a.variants is None else _variant_list(a.variants)
    a.seeds = list(range(_int("--seeds", a.seeds, 1)))
    for opt, minimum in (("max_epochs", 1), ("num_train", 1), ("num_val", 1), ("image_size", 32),
                         ("batch_size", 1), ("warmup_steps", 0), ("threads", 1), ("val_every", 1)):
        value = getattr(a, opt)
        if value is not None:
            setattr(a, opt, _int("--" + opt.replace("_", "-"), value, minimum))
    a.parallel = _int("--parallel", a.parallel, 1)
    a.n_boot = _int("--n-boot", a.n_boot, 1)
    a.time_budget = None if a.time_budget is None else _int("--time-budget", a.time_budget, 1)
    if a.accelerator is not None and a.accelerator not in DEVICES:
        raise ValueError(f"--accelerator must be one of {', '.join(DEVICES)}, got {a.accelerator!r}")
    if not Path(a.config).is_file():
        raise ValueError(f"--config: no such file {a.config!r}")
    for opt in ("work_dir", "out_dir"):
        if not str(getattr(a, opt)).strip():
            raise ValueError(f"--{opt.replace('_', '-')} must be a directory path, got an empty string")
    if a.threads is None:
        a.threads = max(1, (os.cpu_count() or 1) // a.parallel)
    return a


# --------------------------------------------------------------------------------------------------
# run configs


def _model_args(config: dict) -> dict:
    try:
        return config["model"]["init_args"]["model"]["init_args"]
    except (KeyError, TypeError):
        raise ValueError("--config: expected model.init_args.model.init_args (the detector's build_detector "
                         "arguments), as in configs/quickstart.yaml") from None


def base_config(args: argparse.Namespace) -> dict:
    """The base config with the study's settings applied (everything but variant and seed)."""
    import yaml

    config = yaml.safe_load(Path(args.config).read_text())
    model = _model_args(config)
    for key in ("attention", "attention_stages", "attention_kwargs", "neck_attention"):
        model.pop(key, None)
    trainer = config.setdefault("trainer", {})
    data = config.setdefault("data", {}).setdefault("init_args", {})
    if args.max_epochs is not None:
        trainer["max_epochs"] = args.max_epochs
    if args.accelerator is not None:
        trainer["accelerator"] = args.accelerator
    for opt in ("num_train", "num_val", "batch_size"):
        if getattr(args, opt) is not None:
            data[opt] = getattr(args, opt)
    if args.image_size is not None:
        data["image_size"] = args.image_size
        det = model.setdefault("detector_kwargs", {})
        det["min_size"] = det["max_size"] = args.image_size
    if args.warmup_steps is not None:
        sched = config["model"]["init_args"].get("scheduler") or {}
        if "warmup_steps" not in (sched.get("init_args") or {}):
            raise ValueError("--warmup-steps: the config's scheduler has no warmup_steps")
        sched["init_args"]["warmup_steps"] = args.warmup_steps
    epochs = trainer.get("max_epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"--max-epochs: the config has no max_epochs >= 1 ({epochs!r}); give --max-epochs")
    every = args.val_every or epochs
    if epochs % every:
        raise ValueError(f"--val-every {every} must divide the number of epochs ({epochs}): the last epoch "
                         "must be validated")
    # validate at the end (and every --val-every epochs); no sanity pass, progress bars or logger;
    # keep the last weights
    trainer.update(check_val_every_n_epoch=every, num_sanity_val_steps=0, enable_progress_bar=False,
                   logger=False, enable_model_summary=False, devices=1)
    config["checkpoint"] = {**(config.get("checkpoint") or {}), "save_top_k": 0, "save_last": True}
    return config


def last_stage(config: dict) -> int:
    """1-based number of the backbone's last stage (for a token block there only)."""
    from visattn.models import build_detector
    from visattn.plug import find_residual_blocks

    model = build_detector(**_model_args(config))
    return len(dict.fromkeys(stage for _, _, stage, _ in find_residual_blocks(model.backbone)))


def run_config(base: dict, variant: str, seed: int, run_dir: Path, stage: int) -> dict:
    """The full training config of one run."""
    config = copy.deepcopy(base)
    args = dict(candidate_variants()[variant][1])
    if args.get("attention_stages") == "last":
        args["attention_stages"] = [stage]
    _model_args(config).update(args)
    config["seed_everything"] = seed
    config["trainer"]["default_root_dir"] = str(run_dir)
    return config


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def settings_key(base: dict) -> str:
    """A short hash of the settings every run shares: runs of other settings go elsewhere."""
    return hashlib.sha256(_yaml(base).encode()).hexdigest()[:10]


def verify_run(run_dir: Path, config_text: str) -> dict | None:
    """The run's ``result.json`` when the run is finished and intact (its config is the one asked
    for; predictions, report and config match their recorded sha256), else ``None``."""
    try:
        result = json.loads((run_dir / RESULT).read_text())
        files = result["sha256"]
        if (run_dir / RUN_CONFIG).read_text() != config_text:
            return None
        for name, digest in files.items():
            if _sha256(run_dir / name) != digest:
                return None
        json.loads((run_dir / "predictions.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return result


# --------------------------------------------------------------------------------------------------
# one run (in its own process)


def _collector():
    """A Lightning callback keeping the final validation predictions and the training speed."""
    import lightning as L
    import torch

    class Collector(L.Callback):
        def __init__(self) -> None:
            self.predictions: list[dict] = []
            self.curve: list[tuple[int, float]] = []  # (epoch, val AP)
            self.images = 0
            self.seconds = 0.0
            self._t = 0.0

        def _sync(self, trainer) -> None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize(trainer.strategy.root_device)

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._sync(trainer)
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._sync(trainer)
            now = time.perf_counter()
            self.seconds += now - self._t  # data loading + forward + backward + optimiser step
            self._t = now
            self.images += len(batch[0])

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            # runs before the module's own hook, which scores and then clears its predictions
            if not trainer.sanity_checking:
                from visattn.lit import gather_predictions

                merged = gather_predictions(dict(pl_module._predictions))
                self.predictions = [p for image_id in sorted(merged) for p in merged[image_id]]

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking and pl_module.last_eval is not None:
                self.curve.append((trainer.current_epoch + 1, float(pl_module.last_eval["AP"])))

    return Collector()


def train_one(run_dir: Path, threads: int) -> None:
    """Train the run in ``run_dir`` (its ``study-config.yaml``) and write its outputs, ``result.json`` last."""
    import torch

    from visattn.lit.cli import VisattnCLI

    torch.set_num_threads(threads)
    sys.argv = sys.argv[:1]  # the CLI reads args= below, not this script's options
    start = time.perf_counter()
    collector = _collector()
    import lightning as L

    cli = VisattnCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     auto_configure_optimizers=False, args=["fit", "--config", str(run_dir / RUN_CONFIG)],
                     save_config_kwargs={"overwrite": True}, trainer_defaults={"callbacks": [collector]})
    if not collector.predictions and cli.model.last_eval is None:
        raise RuntimeError(f"{run_dir}: the run ended without a validation pass")
    atomic_write_json(run_dir / "predictions.json", collector.predictions)
    report = run_dir / "report" / "report.json"
    if not report.is_file():
        raise RuntimeError(f"{run_dir}: the training CLI wrote no report at {report}")
    model = cli.model.model
    device = cli.trainer.strategy.root_device
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "train_images": collector.images, "train_seconds": collector.seconds,
        "train_images_per_s": collector.images / collector.seconds if collector.seconds else None,
        "wall_s": time.perf_counter() - start, "threads": threads, "val_AP_by_epoch": collector.curve,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "sha256": {name: _sha256(run_dir / name) for name in (RUN_CONFIG, "predictions.json", "report/report.json")},
    }
    atomic_write_json(run_dir / RESULT, result, indent=1)


# --------------------------------------------------------------------------------------------------
# the grid


def _launch(run_dir: Path, threads: int) -> tuple[int, float]:
    """Train one run in a child process (its output to ``run_dir/log.txt``); exit code and seconds."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(run_dir), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    return code, time.perf_counter() - t


def plan(args: argparse.Namespace) -> tuple[dict, Path, list[tuple[str, int, Path, str]]]:
    """The base config, the settings' folder and ``(variant, seed, run dir, config text)`` per run,
    seed-major (a grid cut short still has every variant at the first seeds)."""
    base = base_config(args)
    root = Path(args.work_dir) / settings_key(base)
    needs_stage = any(candidate_variants()[v][1].get("attention_stages") == "last" for v in args.variants)
    stage = last_stage(base) if needs_stage else 0
    runs = []
    for seed in args.seeds:
        for variant in args.variants:
            run_dir = root / f"{variant}-seed{seed}"
            runs.append((variant, seed, run_dir, _yaml(run_config(base, variant, seed, run_dir, stage))))
    return base, root, runs


def prepare_data(base: dict) -> str:
    """Build the base config's data module, make its data (once, before runs start side by side)
    and return the validation ground truth's path."""
    spec = base["data"]
    module, _, cls = spec["class_path"].rpartition(".")
    dm = getattr(import_module(module), cls)(**(spec.get("init_args") or {}))
    dm.prepare_data()
    return str(dm.val_annotations)


def _owner_alive(run_dir: Path) -> int | None:
    """The id of another live study process training ``run_dir`` (its ``owner.pid``), else None."""
    try:
        pid = int((run_dir / OWNER).read_text())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def run_grid(args: argparse.Namespace, runs: list, launch=_launch) -> dict[tuple[str, int], dict]:
    """Train the runs that are not finished (``args.parallel`` at a time); ``{(variant, seed): result}``
    of the finished ones. A failed run is reported and left for the next invocation. A run that
    another live invocation is training (its ``owner.pid``) is left to it, so two invocations can
    share a work dir."""
    done, todo = {}, []
    for variant, seed, run_dir, text in runs:
        result = verify_run(run_dir, text)
        if result is not None:
            done[(variant, seed)] = result
            print(f"[study] {variant} seed {seed}: finished before, kept", flush=True)
        else:
            todo.append((variant, seed, run_dir, text))
    if args.analyze_only:
        return done

    start = time.perf_counter()

    def one(item):
        variant, seed, run_dir, text = item
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            print(f"[study] {variant} seed {seed}: not started (--time-budget {args.time_budget} s spent)", flush=True)
            return (variant, seed), None
        result = verify_run(run_dir, text)  # finished by another invocation meanwhile?
        if result is not None:
            return (variant, seed), result
        other = _owner_alive(run_dir)
        if other is not None:
            print(f"[study] {variant} seed {seed}: being trained by process {other}, left to it", flush=True)
            return (variant, seed), None
        if run_dir.exists():
            shutil.rmtree(run_dir)  # half written or stale: redo from scratch
        run_dir.mkdir(parents=True)
        atomic_write_text(run_dir / OWNER, str(os.getpid()))
        atomic_write_text(run_dir / RUN_CONFIG, text)
        print(f"[study] {variant} seed {seed}: training ({run_dir})", flush=True)
        code, seconds = launch(run_dir, args.threads)
        result = verify_run(run_dir, text) if code == 0 else None
        status = "done" if result is not None else f"FAILED (exit {code}; see {run_dir / 'log.txt'})"
        print(f"[study] {variant} seed {seed}: {status} in {seconds:.0f} s", flush=True)
        return (variant, seed), result

    with cf.ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for key, result in pool.map(one, todo):
            if result is not None:
                done[key] = result
    for variant, seed, run_dir, text in todo:  # finished meanwhile by another invocation
        if (variant, seed) not in done and (result := verify_run(run_dir, text)) is not None:
            done[(variant, seed)] = result
    return done


# --------------------------------------------------------------------------------------------------
# results


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(args, base: dict, gt: str, runs: list, done: dict, n_boot: int) -> dict:
    """Per variant: params, speed, metrics (mean, std over seeds); against the baseline: difference,
    interval and verdict per metric (:func:`visattn.evaluation.compare.compare_runs`)."""
    from visattn.evaluation.compare import compare_runs

    complete = [v for v in args.variants if all((v, s) in done for s in args.seeds)]
    if REFERENCE not in complete:
        raise RuntimeError(f"the {REFERENCE} has unfinished runs; rerun the same command to finish the grid")
    paths = {(v, s): d / "predictions.json" for v, s, d, _ in runs}
    preds = {v: {s: json.loads(paths[(v, s)].read_text()) for s in args.seeds} for v in complete}
    comp = compare_runs(gt, preds, reference=REFERENCE, n_boot=n_boot, seed=0)
    variants = {}
    for v in complete:
        res = [done[(v, s)] for s in args.seeds]
        kind, model_args = candidate_variants()[v]
        variants[v] = {"kind": kind, "model_args": model_args, "params": res[0]["params"],
                       "train_images_per_s": _mean([r["train_images_per_s"] for r in res]),
                       "wall_s": [r["wall_s"] for r in res], "mean": comp["mean"][v], "std": comp["std"][v],
                       "val_AP_by_epoch": {str(s): r.get("val_AP_by_epoch") for s, r in zip(args.seeds, res, strict=True)},
                       "per_seed": comp["values"][v],
                       "runs": {str(s): str(paths[(v, s)].parent) for s in args.seeds}}
    return {"variants": variants, "comparison": {v: comp["diff"][v] for v in complete if v != REFERENCE},
            "missing": [v for v in args.variants if v not in complete], "num_images": comp["num_images"],
            "n_boot": n_boot, "confidence": comp["confidence"], "metrics": comp["metrics"],
            "devices": sorted({done[k]["device"] for k in done})}


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f}"


def _label(metric: str) -> str:
    return metric.replace("AP_occ_", "occ ").replace("AP_", "").replace("occluded_recall", "occ. recall")


def format_markdown(study: dict, meta: dict) -> str:
    """The results file: settings, commands, the per-variant table, the comparison and the figure."""
    s, lines = study, []
    metrics = [m for m in s["metrics"]]
    device = meta["device_label"]
    lines.append(f"# Does attention help small and occluded objects? ({device})\n")
    if meta["reduced"]:
        lines.append("> **Reduced CPU-scale grid, not the answer.** Tiny schedule and data (below) on a shared "
                     "2-core CPU: the models are far from converged and the intervals are wide. The real "
                     "grid needs a GPU: see *GPU command*.\n")
    if meta.get("note"):
        lines.append(f"> {meta['note']}\n")
    lines.append(f"Settings: {meta['settings']}. Seeds {meta['seeds']}; validation {s['num_images']} images. "
                 f"visattn {meta['version']}, torch {meta['torch']}, device {', '.join(s['devices'])}. "
                 f"Training time summed over the runs (several ran side by side): {meta['train_min']:.1f} min; "
                 f"this invocation{' (analysis only)' if meta.get('analyze_only') else ''}: {meta['wall_min']:.1f} min.\n")
    curves = s["variants"][REFERENCE].get("val_AP_by_epoch") or {}
    if any(c and len(c) > 1 for c in curves.values()):
        text = "; ".join(f"seed {seed}: " + ", ".join(f"{e}: {_pct(ap)}" for e, ap in c) for seed, c in curves.items() if c)
        lines.append(f"Baseline val AP by epoch (has it plateaued?): {text}.\n")
    lines.append("## Per variant (mean ± std over seeds, %)\n")
    head = ["variant", "where", "params (M)", "train img/s", *(_label(m) for m in metrics)]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for v, r in s["variants"].items():
        speed = "-" if r["train_images_per_s"] is None else f"{r['train_images_per_s']:.1f}"
        cells = [v, r["kind"], f"{r['params'] / 1e6:.2f}", speed]
        cells += [f"{_pct(r['mean'][m])} ± {_pct(r['std'][m])}" if r["mean"][m] is not None else "-" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"## Against the baseline: difference [{100 * s['confidence']:.0f}% interval], verdict\n")
    lines.append(f"Paired bootstrap ({s['n_boot']} replicates) resampling the validation images and the seeds "
                 "(the same draw for both models); each model's value is its mean over the drawn seeds. "
                 "**helps** / **hurts**: the interval lies above / below 0; *no evidence*: it contains 0. "
                 f"With {len(metrics)} columns per variant, expect about one interval in twenty to exclude 0 "
                 "by chance alone (no correction for multiple comparisons).\n")
    head = ["variant", *(_label(m) for m in metrics)]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for v, comp in s["comparison"].items():
        cells = [v]
        for m in metrics:
            c = comp[m]
            if c["diff"] is None:
                cells.append("-")
                continue
            word = {"helps": "**helps**", "hurts": "**hurts**"}.get(c["verdict"], "no evidence")
            cells.append(f"{_signed(c['diff'])} [{_signed(c['low'])}, {_signed(c['high'])}] {word}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"![difference from baseline per size bin and occlusion bucket]({meta['figure']})\n")
    if s["missing"]:
        lines.append(f"Unfinished (left out): {', '.join(s['missing'])}; rerun the command to finish them.\n")
    lines.append("## Commands\n")
    lines.append(f"This grid: `{meta['command']}`\n")
    lines.append(f"One run alone (e.g. {meta['example_variant']}, seed 0): `{meta['run_command']}`; the run "
                 "folders (`study-config.yaml`, `predictions.json`, `report/`, `result.json`) are under "
                 f"`{meta['work_dir']}`.\n")
    lines.append("GPU command (the full grid; `benchmarks/study_gpu.sh`, run through the device tool): "
                 f"`{meta['gpu_command']}`\n")
    return "\n".join(lines)


def plot(study: dict, path: Path) -> None:
    """Difference from the baseline in AP per size bin and occlusion bucket, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [m for m in (*SIZE_COLUMNS, *OCC_COLUMNS, "occluded_recall") if m in study["metrics"]]
    variants = list(study["comparison"])
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 * len(cols) + 3), 4.2))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs, ys, lo, hi = [], [], [], []
        for j, m in enumerate(cols):
            c = study["comparison"][v][m]
            if c["diff"] is None or c["low"] is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(100 * c["diff"])
            lo.append(100 * (c["diff"] - c["low"]))
            hi.append(100 * (c["high"] - c["diff"]))
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, capsize=2, label=v)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(len(SIZE_COLUMNS) - 0.5, color="0.6", lw=0.8, ls=":")
    ax.set_xticks(range(len(cols)), [_label(m) for m in cols], rotation=30, ha="right")
    ax.set_ylabel("difference from baseline (points)")
    ax.set_title(f"AP by size bin and occlusion bucket: variant - baseline, {100 * study['confidence']:.0f}% "
                 "interval (images + seeds)", fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, max(1, len(variants))))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _settings_line(base: dict) -> str:
    m, d, t = _model_args(base), base["data"]["init_args"], base["trainer"]
    return (f"{m.get('arch')} on {m.get('backbone')} (FPN {m.get('fpn_channels')}, p2={m.get('p2')}), "
            f"{base['data']['class_path'].rsplit('.', 1)[-1]} {d.get('num_train')} train / {d.get('num_val')} val "
            f"images of {d.get('image_size')} px, batch {d.get('batch_size')}, {t.get('max_epochs')} epochs, "
            f"accelerator {t.get('accelerator')}")


def gpu_command() -> str:
    return ("bash benchmarks/study_gpu.sh  (= python benchmarks/attention_study.py " + " ".join(GPU_ARGS)
            + " --out-dir $OUT, then tar of the run folders; see the script)")


def write_results(args, base: dict, gt: str, runs: list, done: dict, wall_s: float, argv: list[str]) -> Path:
    """Compare, then write ``attention-study-<device>.{md,json,png}`` into ``args.out_dir``."""
    import torch

    import visattn

    study = summarize(args, base, gt, runs, done, args.n_boot)
    # where the runs trained (a grid trained on a GPU can be analysed elsewhere with --analyze-only)
    device_label = "gpu" if any(r.get("device_type") == "cuda" for r in done.values()) else "cpu"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"attention-study-{device_label}"
    example = next(((v, d) for v, s, d, _ in runs if v != REFERENCE), (runs[0][0], runs[0][2]))
    meta = {"device_label": device_label, "reduced": device_label == "cpu", "note": args.note,
            "version": getattr(visattn, "__version__", "unknown"), "torch": torch.__version__,
            "settings": _settings_line(base), "seeds": args.seeds, "wall_min": wall_s / 60,
            "train_min": sum(sum(r["wall_s"]) for r in study["variants"].values()) / 60,
            "command": "python benchmarks/attention_study.py " + shlex.join(argv),
            "example_variant": example[0], "run_command": f"python train.py fit --config {example[1] / RUN_CONFIG}",
            "work_dir": str(Path(args.work_dir) / settings_key(base)), "gpu_command": gpu_command(),
            "analyze_only": args.analyze_only,
            "figure": stem.name + ".png", "platform": platform.platform(), "python": platform.python_version()}
    plot(study, stem.with_suffix(".png"))
    atomic_write_json(stem.with_suffix(".json"), {"meta": meta, "base_config": base, **study}, indent=1)
    atomic_write_text(stem.with_suffix(".md"), format_markdown(study, meta))
    return stem.with_suffix(".md")


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the grid and write the results; 0 when every run finished, else 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        train_one(Path(args.worker), args.threads)
        return 0
    if args.list_variants:
        for name, (kind, model_args) in available_variants().items():
            print(f"{name:12s} {kind:18s} {model_args}")
        return 0
    start = time.perf_counter()
    base, root, runs = plan(args)
    gt = prepare_data(base)
    print(f"[study] {len(runs)} runs under {root}, {args.parallel} at a time, {args.threads} threads each", flush=True)
    done = run_grid(args, runs)
    md = write_results(args, base, gt, runs, done, time.perf_counter() - start, argv)
    print(f"[study] results: {md}")
    return 0 if len(done) == len(runs) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (TypeError, ValueError) as e:
        print(f"attention_study.py: error: {e}", file=sys.stderr)
        sys.exit(2)
