"""Does attention help small and occluded objects? One grid of training runs, one table.

Every run trains the detector of one base config (default ``configs/study_cpu.yaml``: FCOS on
ResNet-10t with P2, from scratch, on the synthetic small/occluded benchmark) with the same data,
schedule and seeds; only the attention changes: none (``baseline``), a block plugged into the
backbone's residual blocks as its paper wires it (``se``, ``eca``, ``cbam``, ``coord``, ``gc``,
``simam``), the same SE behind visattn's zero-initialised gate (``se_gated``), a token block in the
backbone's last stage only (``window``: Swin; ``sra``: PVT, on request), attention in the FPN neck
(``scale``: DyHead's scale-aware attention; ``dyhead`` and ``deformable`` on request), and one
non-attention lever for scale (``no_p2``: the detector without its stride-4 level). Each run's
validation predictions and evaluation report are kept; then
:func:`visattn.evaluation.compare.compare_runs` compares every variant with the baseline by a
bootstrap that resamples images and seeds (paired), the false discovery rate is controlled over the
table (Benjamini-Hochberg), and the results go to ``benchmarks/results/attention-study-<device>.*``.

    python benchmarks/attention_study.py                     # the CPU grid, 3 seeds, resumable
    python benchmarks/attention_study.py --analyze-only      # the table again from the kept runs

A run lives in ``<work dir>/<settings hash>/<variant>-seed<k>/``: its ``study-config.yaml`` (train it
alone with ``python train.py fit --config <that file>``), ``predictions.json``, ``report/`` and,
written last, ``result.json`` with the sha256 of the others, the git commit, the code state
(:func:`code_state`: a hash of visattn's sources, train.py and the training libraries' versions),
FLOPs, learned gates and the machine load. A run whose ``result.json`` verifies is not redone;
any other (interrupted, half written, edited) is cleared and redone, so an interrupted grid resumes
by running the same command again. Runs trained at another code state are refused (or retrained
with ``--redo-stale``): continue such a grid from a git worktree at their commit.

Every finished run is also kept in ``<out dir>/attention-study-<device>/<variant>-seed<k>/``
(config, report, result, predictions as ``.json.gz``) with the validation ground truth and the grid
command; those files are committed, and ``--analyze-only`` rebuilds the results from them alone, on
any machine, byte for byte. ``--parallel N`` trains N runs side by side (separate processes).
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
#: installed ``build_detector`` accepts them (see :func:`available_variants`). Backbone and token
#: blocks are wired as their papers train them from scratch (``attention_gate="none"``); the
#: ``se_gated`` row puts the most common block behind visattn's zero-initialised gate instead, so a
#: reader sees what the gate costs or buys. ``no_p2`` is the non-attention lever for scale: the same
#: detector without the stride-4 level (P2), so attention can be weighed against it.
BACKBONE_BLOCKS = ("se", "eca", "cbam", "coord", "gc", "simam")
TOKEN_BLOCKS = ("window", "sra")
NECK_CANDIDATES = ("scale", "dyhead", "deformable")
GATED = {"se_gated": "se"}
LEVERS = {"no_p2": ("lever: no P2 level", {"p2": False})}
REFERENCE = "baseline"
DEFAULT_CONFIG = "configs/study_cpu.yaml"
#: The default grid: every available variant but these (one token block and one neck attention are
#: enough on a CPU; ask for the others with --variants).
NOT_BY_DEFAULT = ("sra", "dyhead", "deformable")
#: Table columns, as :data:`visattn.evaluation.compare.RUN_METRICS` names them.
SIZE_COLUMNS = ("AP_very_tiny", "AP_tiny", "AP_small", "AP_medium", "AP_large")
OCC_COLUMNS = ("AP_occ_none", "AP_occ_partial", "AP_occ_heavy")
DEVICES = ("cpu", "gpu", "auto")
RESULT = "result.json"
OWNER = "owner.pid"
#: The run's config as the study wrote it (the training CLI writes its resolved form to config.yaml).
RUN_CONFIG = "study-config.yaml"
#: What is kept of a finished run in the results folder (``--archive-dir``), so that
#: ``--analyze-only`` rebuilds the table from committed files alone: the predictions compressed.
ARCHIVED = (RUN_CONFIG, RESULT, "report/report.json", "report/report.md")
ARCHIVE_GT = "val-gt.json.gz"
#: The false discovery rate controlled over the whole comparison table (Benjamini-Hochberg).
FDR = 0.05
#: The recipe's goals (issue 25): the baseline reaches this AP, and its last evaluation gains less
#: than this over the one before (a flat curve).
GOAL_AP, GOAL_FLAT = 0.20, 0.015
#: The full grid on one GPU (benchmarks/study_gpu.sh): the CPU recipe's data and model, 3 seeds,
#: twice its schedule (the curve every 3 epochs shows where the plateau is), several runs side by
#: side.
GPU_ARGS = ("--accelerator", "gpu", "--seeds", "3", "--max-epochs", "12", "--val-every", "3", "--parallel", "8",
            "--threads", "2")


# --------------------------------------------------------------------------------------------------
# variants


def candidate_variants() -> dict[str, tuple[str, dict]]:
    """Every variant the study knows, in table order: ``name -> (kind, model arguments)``."""
    out: dict[str, tuple[str, dict]] = {REFERENCE: ("none", {})}
    out.update({b: ("backbone", {"attention": b, "attention_gate": "none"}) for b in BACKBONE_BLOCKS})
    out.update({n: ("backbone, zero gate", {"attention": b, "attention_gate": "zero"}) for n, b in GATED.items()})
    out.update({b: ("token, last stage", {"attention": b, "attention_stages": "last", "attention_gate": "none"})
                for b in TOKEN_BLOCKS})
    out.update({n: ("neck", {"neck_attention": n}) for n in NECK_CANDIDATES})
    out.update(LEVERS)
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
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"base training config (train.py), default {DEFAULT_CONFIG}")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, must include {REFERENCE!r} (default: every available one but "
                        f"{', '.join(NOT_BY_DEFAULT)})")
    p.add_argument("--seeds", default="3", help="number of seeds (0..N-1), default 3")
    p.add_argument("--max-epochs", default=None, help="epochs per run (default: the config's)")
    p.add_argument("--val-every", default="1",
                   help="validate every N epochs (the learning curve; must divide the epochs), default 1")
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
    p.add_argument("--archive-dir", default=None,
                   help="where finished runs are kept for the table (default <out dir>/attention-study-<cpu|gpu>)")
    p.add_argument("--redo-stale", action="store_true",
                   help="retrain finished runs whose code state differs from this checkout's (else refused)")
    p.add_argument("--analyze-only", action="store_true",
                   help="only (re)write the results from the kept runs (no data, no training)")
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
    if a.config == DEFAULT_CONFIG and not Path(a.config).is_file():
        a.config = str(ROOT / DEFAULT_CONFIG)  # run from another folder
    if not Path(a.config).is_file():
        raise ValueError(f"--config: no such file {a.config!r}")
    for opt in ("work_dir", "out_dir", "archive_dir"):
        if getattr(a, opt) is not None and not str(getattr(a, opt)).strip():
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
    for key in ("attention", "attention_stages", "attention_kwargs", "attention_gate", "neck_attention"):
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


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def settings_key(base: dict) -> str:
    """A short hash of the settings every run shares: runs of other settings go elsewhere."""
    return hashlib.sha256(_yaml(base).encode()).hexdigest()[:10]


#: What decides how a run trains besides its config: the package's sources and train.py.
CODE_PATHS = ("visattn", "train.py")
#: ... and the libraries that train (CPU training is not reproducible across torch versions), and
#: those that make the data: Pillow draws the synthetic images, pycocotools their masks and areas,
#: albumentations (on albucore and OpenCV) augments them.
TRAINING_LIBRARIES = ("torch", "torchvision", "timm", "lightning", "numpy", "pillow", "pycocotools",
                      "albumentations", "albucore", "opencv-python-headless")


def code_state(root: Path = ROOT) -> dict:
    """The code state a run trains with: ``{"code_state": hash, "versions": {...}}``, the hash over
    every ``.py`` file of :data:`CODE_PATHS` (path and bytes, sorted) and the versions of
    :data:`TRAINING_LIBRARIES`. Two runs of one table must share it (see :func:`check_code_states`)."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    files = []
    for rel in CODE_PATHS:
        path = root / rel
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    for f in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    versions = {}
    for lib in TRAINING_LIBRARIES:
        try:
            versions[lib] = version(lib)
        except PackageNotFoundError:
            versions[lib] = None
    h.update(json.dumps(versions, sort_keys=True).encode())
    return {"code_state": h.hexdigest()[:16], "versions": versions}


def git_commit(root: Path = ROOT) -> str:
    """``HEAD``'s commit of ``root``, with ``+dirty`` when :data:`CODE_PATHS` have uncommitted
    changes there; ``"unknown"`` outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *CODE_PATHS],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def check_code_states(results: dict[tuple[str, int], dict], current: str | None = None) -> None:
    """Refuse a table (or a grid) whose runs trained at different code states: ``ValueError``
    naming, per state, its commit and its runs, and which runs to redo (those outside the state of
    the most runs, or, given ``current``, outside it)."""
    groups: dict[str, list[tuple[str, int]]] = {}
    commits: dict[str, set] = {}
    for key, r in sorted(results.items()):
        state = r.get("code_state") or "unrecorded"
        groups.setdefault(state, []).append(key)
        commits.setdefault(state, set()).add(r.get("git_commit", "unknown"))
    keep = current if current is not None else max(groups, key=lambda g: (len(groups[g]), g), default=None)
    stale = {g: runs for g, runs in groups.items() if g != keep}
    if not stale:
        return
    lines = [f"  code state {g} (commit {', '.join(sorted(commits[g]))}): "
             + ", ".join(f"{v}-seed{s}" for v, s in runs) for g, runs in sorted(stale.items())]
    where = ("this checkout's" if current is not None else
             f"the code state of most runs ({keep}, commit {', '.join(sorted(commits.get(keep, {'unknown'})))})")
    raise ValueError("runs of one table must share the code that trains them; these runs differ from "
                     f"{where}:\n" + "\n".join(lines) + "\nredo them at one code state (--redo-stale retrains "
                     "them here), or continue the grid from a git worktree at their commit "
                     "(git worktree add ../study <commit>)")


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


def forward_flops(model, size: int) -> int:
    """Floating-point operations of one eval-mode forward of ``model`` on a ``size``-square image,
    as :class:`torch.utils.flop_counter.FlopCounterMode` counts them (convolutions, matrix products,
    attention; a multiply-add is 2), in float32 with autocast off."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad(), torch.autocast(p.device.type, enabled=False), \
                FlopCounterMode(display=False) as counter:
            model([torch.rand(3, size, size, device=p.device, dtype=p.dtype)])
    finally:
        model.train(was)
    return int(counter.get_total_flops())


def train_one(run_dir: Path, threads: int) -> None:
    """Train the run in ``run_dir`` (its ``study-config.yaml``) and write its outputs, ``result.json`` last.

    The code state and commit recorded are those the run started with; when the code state differs
    at the end (sources edited, a library upgraded while it trained) the run is refused (left
    unfinished, redone by the next invocation): part of it may have run the new code."""
    state, commit = code_state(), git_commit()
    import torch

    from visattn.lit.cli import VisattnCLI

    torch.set_num_threads(threads)
    sys.argv = sys.argv[:1]  # the CLI reads args= below, not this script's options
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    collector = _collector()
    import lightning as L

    cli = VisattnCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     auto_configure_optimizers=False, args=["fit", "--config", str(run_dir / RUN_CONFIG)],
                     save_config_kwargs={"overwrite": True}, trainer_defaults={"callbacks": [collector]})
    if code_state() != state:
        raise RuntimeError(f"{run_dir}: the code state changed while the run trained (visattn, train.py or a "
                           f"training library; it started at {state['code_state']}): the run is not kept; train "
                           "it again at one code state (a git worktree keeps a grid's code fixed)")
    if not collector.predictions and cli.model.last_eval is None:
        raise RuntimeError(f"{run_dir}: the run ended without a validation pass")
    atomic_write_json(run_dir / "predictions.json", collector.predictions)
    report = run_dir / "report" / "report.json"
    if not report.is_file():
        raise RuntimeError(f"{run_dir}: the training CLI wrote no report at {report}")
    model = cli.model.model
    device = cli.trainer.strategy.root_device
    from visattn.plug import gate_values

    size = (_model_args(yaml_load(run_dir / RUN_CONFIG)).get("detector_kwargs") or {}).get("min_size", 800)
    gates = gate_values(model)
    result = {
        **state, "git_commit": commit, "settings": run_dir.parent.name,
        "params": sum(p.numel() for p in model.parameters()),
        "flops": forward_flops(model, int(size)), "flops_image_size": int(size),
        "gate_values": gates, "gate_mean": sum(gates.values()) / len(gates) if gates else None,
        "load_start": load_start, "load_end": os.getloadavg()[0], "cpus": os.cpu_count(),
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


def archive_dir(args: argparse.Namespace) -> Path:
    """Where finished runs are kept for the table (``--archive-dir``; default
    ``<out dir>/attention-study-<cpu|gpu>``)."""
    if args.archive_dir:
        return Path(args.archive_dir)
    return Path(args.out_dir) / f"attention-study-{'gpu' if args.accelerator == 'gpu' else 'cpu'}"


def _gz_bytes(data: bytes) -> bytes:
    """gzip of ``data`` with no name and no time in the header: the same bytes on every machine."""
    import gzip

    return gzip.compress(data, compresslevel=9, mtime=0)


def archive_run(run_dir: Path, dest: Path) -> None:
    """Keep a finished run in the results folder: :data:`ARCHIVED` as they are and the predictions
    as ``predictions.json.gz``, ``result.json`` last (a folder without it is unfinished). The copy
    is written whole beside ``dest`` and then swapped in: an earlier copy is replaced entirely (no
    file of it left), and a failure leaves it as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        tmp.mkdir()
        for name in ARCHIVED:
            if name != RESULT and (run_dir / name).is_file():
                (tmp / name.replace("/", "-")).write_bytes((run_dir / name).read_bytes())
        (tmp / "predictions.json.gz").write_bytes(_gz_bytes((run_dir / "predictions.json").read_bytes()))
        (tmp / RESULT).write_bytes((run_dir / RESULT).read_bytes())
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)


def archive_study(dest: Path, base: dict, gt: str, argv: list[str]) -> None:
    """Keep what the table needs besides the runs: the validation ground truth (compressed) and the
    base config and command of the grid (``study.json``)."""
    key = settings_key(base)
    kept = _archived_run_dirs(dest)
    try:
        previous = json.loads((dest / "study.json").read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        previous = None
    other = []
    for run in kept:
        try:
            settings = json.loads((run / RESULT).read_text()).get("settings") or previous
        except (OSError, ValueError, AttributeError):
            settings = previous
        if settings is not None and settings != key:
            other.append(f"{run.name} (settings {settings})")
    if other:
        raise ValueError(f"--archive-dir {dest} keeps runs of other settings than this grid's ({key}): "
                         f"{', '.join(other)}; one archive holds one table: give another --archive-dir, or "
                         "remove those runs first (git rm -r them)")
    dest.mkdir(parents=True, exist_ok=True)
    data = Path(gt).read_bytes()
    if not (dest / ARCHIVE_GT).is_file() or _gunzip(dest / ARCHIVE_GT) != data:
        with atomic_path(dest / ARCHIVE_GT) as tmp:
            Path(tmp).write_bytes(_gz_bytes(data))
    meta = {"settings": key, "base_config": base,
            "command": "python benchmarks/attention_study.py " + shlex.join(_public_argv(argv))}
    atomic_write_json(dest / "study.json", meta, indent=1)


def _public_argv(argv: list[str]) -> list[str]:
    """The grid's command line without the options that only say where files go on this machine."""
    local = ("--work-dir", "--out-dir", "--archive-dir", "--time-budget")
    options = [o for action in build_parser()._actions for o in action.option_strings if o.startswith("--")]

    def full(name: str) -> str:  # argparse accepts an unambiguous prefix (--work for --work-dir)
        hits = [o for o in options if o.startswith(name)] if name.startswith("--") else []
        return name if name in options or len(hits) != 1 else hits[0]

    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name, eq, _ = a.partition("=")
        if full(name) in local:
            skip = not eq
            continue
        out.append(a)
    return out


def _gunzip(path: Path) -> bytes:
    import gzip

    return gzip.decompress(path.read_bytes())


def _archived_run_dirs(dest: Path) -> list[Path]:
    """The run folders (``<variant>-seed<k>`` with a ``result.json``) of an archive, sorted."""
    if not dest.is_dir():
        return []
    out = []
    for p in sorted(dest.iterdir()):
        variant, _, seed = p.name.rpartition("-seed")
        if p.is_dir() and not p.name.startswith(".") and variant and seed.isdigit() and (p / RESULT).is_file():
            out.append(p)
    return out


#: The model arguments that say which variant a run is (the rest is the base config's).
_VARIANT_KEYS = ("attention", "attention_gate", "attention_stages", "attention_kwargs", "neck_attention")


def _identity_problem(run: Path, config: dict, result: dict, settings: str | None) -> str | None:
    """Why the archived ``run`` is not the run its folder names (another seed, variant or settings), or None."""
    variant, _, seed = run.name.rpartition("-seed")
    if result.get("settings") is not None and settings is not None and result["settings"] != settings:
        return f"trained with settings {result['settings']}, but the archive's study.json is of settings {settings}"
    if config.get("seed_everything") != int(seed):
        return f"its {RUN_CONFIG} has seed_everything {config.get('seed_everything')!r}, not {int(seed)}"
    root = (config.get("trainer") or {}).get("default_root_dir")
    if root is not None:
        where = Path(str(root))
        if where.name != run.name or (settings is not None and where.parent.name != settings):
            return f"its {RUN_CONFIG} is of the run {where.parent.name}/{where.name}"
    known = candidate_variants()
    if variant in known:
        want = known[variant][1]
        model = _model_args(config)
        for k in (*_VARIANT_KEYS, *want):
            if k == "attention_stages" and want.get(k) == "last":
                continue
            if model.get(k) != want.get(k):
                return f"its {RUN_CONFIG} has {k}={model.get(k)!r}, but {variant} has {k}={want.get(k)!r}"
    return None


def _read_archived_run(run: Path, settings: str | None) -> tuple[dict, bytes]:
    """``(result, predictions json bytes)`` of one archived run folder, every file checked against
    the sha256 its ``result.json`` recorded; else a ``ValueError`` naming the folder."""
    try:
        result = json.loads((run / RESULT).read_text())
        recorded = result["sha256"]
        raw = _gunzip(run / "predictions.json.gz")
        checks = {"predictions.json": raw, RUN_CONFIG: (run / RUN_CONFIG).read_bytes(),
                  "report/report.json": (run / "report-report.json").read_bytes()}
        mismatch = [name for name, data in checks.items() if hashlib.sha256(data).hexdigest() != recorded[name]]
        import yaml

        config = yaml.safe_load(checks[RUN_CONFIG])
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{run}: cannot read the archived run ({type(e).__name__}: {e}); retrain it, or restore "
                         "it from git") from None
    if mismatch:
        raise ValueError(f"{run}: {mismatch[0]} does not match the sha256 in its {RESULT}; the archived run was "
                         "edited or damaged (retrain it, or restore it from git)")
    try:
        problem = _identity_problem(run, config, result, settings)
    except (ValueError, TypeError, AttributeError) as e:
        problem = f"its {RUN_CONFIG} cannot be read as a run's config ({e})"
    if problem is not None:
        raise ValueError(f"{run}: not the run its folder names: {problem} (a run of another grid, or copied by "
                         "hand; remove it, or retrain it)")
    return result, raw


def read_archive(dest: Path) -> tuple[dict, dict, dict[tuple[str, int], dict], dict[tuple[str, int], list]]:
    """``(study meta, ground truth, {(variant, seed): result}, {(variant, seed): predictions})`` of
    every archived run whose files match the sha256 its ``result.json`` recorded and whose config is
    the run its folder names (seed, variant, the study's settings); a run folder that does not is a
    ``ValueError`` naming it (a committed table must not rest on edited or mixed files)."""
    if not (dest / "study.json").is_file():
        raise ValueError(f"no archived study in {dest} (study.json missing); run the grid first")
    try:
        meta = json.loads((dest / "study.json").read_text())
        missing = [k for k in ("settings", "base_config", "command") if k not in meta]  # what the results need
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{dest / 'study.json'}: cannot read it ({type(e).__name__}: {e}); restore it from git, "
                         "or run the grid again") from None
    try:
        gt = json.loads(_gunzip(dest / ARCHIVE_GT))
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{dest / ARCHIVE_GT}: cannot read the archived validation ground truth "
                         f"({type(e).__name__}: {e}); restore it from git, or run the grid again") from None
    results, preds = {}, {}
    for run in _archived_run_dirs(dest):
        variant, _, seed = run.name.rpartition("-seed")
        result, raw = _read_archived_run(run, meta.get("settings"))
        results[(variant, int(seed))] = result
        preds[(variant, int(seed))] = json.loads(raw)
    return meta, gt, results, preds


def _archive_is_current(run_dir: Path, dest: Path, settings: str | None) -> bool:
    """Whether ``dest`` holds an intact copy of the finished run in ``run_dir`` (same ``result.json``)."""
    try:
        if (dest / RESULT).read_bytes() != (run_dir / RESULT).read_bytes():
            return False
        _read_archived_run(dest, settings)
    except (OSError, ValueError):
        return False
    return True


def run_grid(args: argparse.Namespace, runs: list, launch=_launch,
             current: str | None = None) -> dict[tuple[str, int], dict]:
    """Train the runs that are not finished (``args.parallel`` at a time); ``{(variant, seed): result}``
    of the finished ones. A failed run is reported and left for the next invocation. A run that
    another live invocation is training (its ``owner.pid``) is left to it, so two invocations can
    share a work dir. Finished runs whose recorded code state differs from ``current`` (this
    checkout's, when given) are refused (:func:`check_code_states`), or retrained with
    ``args.redo_stale``. Every finished run is archived (:func:`archive_run`) when
    ``args.archive`` is set."""
    done, todo = {}, []
    for variant, seed, run_dir, text in runs:
        result = verify_run(run_dir, text)
        stale = (result is not None and current is not None and result.get("code_state") != current)
        if result is not None and not (stale and getattr(args, "redo_stale", False)):
            done[(variant, seed)] = result
            print(f"[study] {variant} seed {seed}: finished before, kept", flush=True)
        else:
            todo.append((variant, seed, run_dir, text))
    if current is not None and not args.analyze_only:
        check_code_states(done, current)
    keep = getattr(args, "archive", None)
    if keep is not None:
        for variant, seed, run_dir, _ in runs:
            # archived again when the copy there is missing, damaged (an archiving cut short) or of
            # another training of this run
            if (variant, seed) in done and not _archive_is_current(run_dir, keep / f"{variant}-seed{seed}",
                                                                   run_dir.parent.name):
                archive_run(run_dir, keep / f"{variant}-seed{seed}")
    if args.analyze_only:
        return done

    start = time.perf_counter()

    def one(item):
        variant, seed, run_dir, text = item
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            print(f"[study] {variant} seed {seed}: not started (--time-budget {args.time_budget} s spent)", flush=True)
            return (variant, seed), None
        result = verify_run(run_dir, text)  # finished by another invocation meanwhile?
        if result is not None and (current is None or result.get("code_state") == current):
            return (variant, seed), result
        other = _owner_alive(run_dir)
        if other is not None:
            print(f"[study] {variant} seed {seed}: being trained by process {other}, left to it", flush=True)
            return (variant, seed), None
        if run_dir.exists():
            shutil.rmtree(run_dir)  # half written, stale or to redo: from scratch
        run_dir.mkdir(parents=True)
        atomic_write_text(run_dir / OWNER, str(os.getpid()))
        atomic_write_text(run_dir / RUN_CONFIG, text)
        print(f"[study] {variant} seed {seed}: training ({run_dir})", flush=True)
        code, seconds = launch(run_dir, args.threads)
        result = verify_run(run_dir, text) if code == 0 else None
        status = "done" if result is not None else f"FAILED (exit {code}; see {run_dir / 'log.txt'})"
        print(f"[study] {variant} seed {seed}: {status} in {seconds:.0f} s", flush=True)
        if result is not None and keep is not None:
            archive_run(run_dir, keep / f"{variant}-seed{seed}")
        return (variant, seed), result

    with cf.ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for key, result in pool.map(one, todo):
            if result is not None:
                done[key] = result
    for variant, seed, run_dir, text in todo:  # finished meanwhile by another invocation (at this code state)
        if (variant, seed) not in done and (result := verify_run(run_dir, text)) is not None and (
                current is None or result.get("code_state") == current):
            done[(variant, seed)] = result
    return done


# --------------------------------------------------------------------------------------------------
# results


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


#: The comparison table's columns: overall, the size bins, the occlusion buckets, and for the
#: occlusion buckets the measures that keep a signal where AP does not (AP50 and AR100).
COMPARE_COLUMNS = ("AP", "APs", *SIZE_COLUMNS, *OCC_COLUMNS, "AP50_occ_partial", "AP50_occ_heavy",
                   "AR_occ_partial", "AR_occ_heavy", "occluded_recall")


def summarize(variants: list[str], seeds: list[int], gt, results: dict, preds: dict, n_boot: int) -> dict:
    """Per variant: cost (params, FLOPs, training speed), gates and metrics (mean, std over seeds);
    against the baseline: difference, interval, BH-adjusted p and verdict per metric
    (:func:`visattn.evaluation.compare.compare_runs` with ``fdr=FDR`` over :data:`COMPARE_COLUMNS`).
    Only variants with every seed finished are compared; the others are listed as missing."""
    from visattn.evaluation.compare import compare_runs

    complete = [v for v in variants if all((v, s) in results for s in seeds)]
    if REFERENCE not in complete:
        raise RuntimeError(f"the {REFERENCE} has unfinished runs; rerun the same command to finish the grid")
    used = [(v, s) for v in complete for s in seeds]  # the runs of the table, nothing else the archive keeps
    check_code_states({k: results[k] for k in used})
    runs = {v: {s: preds[(v, s)] for s in seeds} for v in complete}
    comp = compare_runs(gt, runs, reference=REFERENCE, n_boot=n_boot, seed=0, fdr=None)
    # the false discovery rate is controlled over the table's columns only (the cells a reader
    # looks at), so the procedure is run here on the bootstrap p-values compare_runs returns
    from visattn.evaluation.compare import benjamini_hochberg

    cells = {(v, m): comp["diff"][v][m]["p"] for v in complete if v != REFERENCE for m in COMPARE_COLUMNS
             if m in comp["metrics"] and comp["diff"][v][m]["p"] is not None}
    adjusted = benjamini_hochberg(cells, FDR)
    comparison = {}
    for v in complete:
        if v == REFERENCE:
            continue
        comparison[v] = {}
        for m in comp["metrics"]:
            c = dict(comp["diff"][v][m])
            p_adj, rejected = adjusted.get((v, m), (None, False))
            c["p_adjusted"] = p_adj
            c["significant"] = bool(rejected and c["diff"] is not None)
            if m not in COMPARE_COLUMNS:  # outside the corrected family: no verdict (not "no evidence")
                c["verdict"] = "not tested"
            else:
                c["verdict"] = ("no evidence" if not c["significant"] else "helps" if c["diff"] > 0 else "hurts")
            comparison[v][m] = c
    out = {}
    for v in complete:
        res = [results[(v, s)] for s in seeds]
        kind, model_args = candidate_variants().get(v, ("?", {}))
        gates = [r.get("gate_mean") for r in res]
        out[v] = {"kind": kind, "model_args": model_args, "params": res[0]["params"],
                  "flops": res[0].get("flops"), "flops_image_size": res[0].get("flops_image_size"),
                  "train_images_per_s": _mean([r["train_images_per_s"] for r in res]),
                  "wall_s": [r["wall_s"] for r in res], "mean": comp["mean"][v], "std": comp["std"][v],
                  "gate_mean": None if any(g is None for g in gates) else gates,
                  "gate_range": _gate_range(res),
                  "val_AP_by_epoch": {str(s): r.get("val_AP_by_epoch") for s, r in zip(seeds, res, strict=True)},
                  "per_seed": comp["values"][v]}
    return {"variants": out, "comparison": comparison, "missing": [v for v in variants if v not in complete],
            "num_images": comp["num_images"], "n_boot": n_boot, "confidence": comp["confidence"], "fdr": FDR,
            "fdr_cells": len(cells), "metrics": comp["metrics"], "seeds": seeds,
            "devices": sorted({results[k]["device"] for k in used}),
            "commits": sorted({results[k].get("git_commit", "unknown") for k in used}),
            "code_states": sorted({results[k].get("code_state") or "unrecorded" for k in used}),
            "versions": next((results[k].get("versions") for k in sorted(used)), None),
            "load": _load_range([results[k] for k in sorted(used)])}


def _gate_range(res: list[dict]) -> list[float] | None:
    values = [g for r in res for g in (r.get("gate_values") or {}).values()]
    return [min(values), max(values), sum(v < 0 for v in values) / len(values)] if values else None


def _load_range(res: list[dict]) -> list[float] | None:
    loads = [r[k] for r in res for k in ("load_start", "load_end") if r.get(k) is not None]
    return [min(loads), max(loads)] if loads else None


def convergence(study: dict) -> dict:
    """The recipe's goals on the baseline's curves: per seed the last AP and the gain of the last
    evaluation over the one before; ``ok`` when every seed reaches :data:`GOAL_AP` with a gain
    under :data:`GOAL_FLAT`."""
    per_seed = {}
    for seed, curve in (study["variants"][REFERENCE].get("val_AP_by_epoch") or {}).items():
        if not curve:
            continue
        last = curve[-1][1]
        gain = last - curve[-2][1] if len(curve) > 1 else None
        per_seed[seed] = {"AP": last, "gain": gain,
                          "ok": last >= GOAL_AP and gain is not None and gain < GOAL_FLAT}
    return {"per_seed": per_seed, "ok": bool(per_seed) and all(r["ok"] for r in per_seed.values())}


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or v < 0 else f"{100 * v:.{digits}f}"


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f}"


def _label(metric: str) -> str:
    return (metric.replace("AP50_occ_", "AP50 occ ").replace("AR_occ_", "AR occ ").replace("AP_occ_", "occ ")
            .replace("AP_", "").replace("occluded_recall", "occ. recall"))


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


def format_markdown(study: dict, meta: dict) -> str:
    """The results file, made from the archived runs alone (the same bytes from the same runs)."""
    s, lines = study, []
    device = meta["device_label"]
    conv = convergence(s)
    lines.append(f"# Does attention help small and occluded objects? ({device})\n")
    if meta.get("note"):
        lines.append(f"> {meta['note']}\n")
    versions = s.get("versions") or {}
    load = s.get("load")
    lines.append(f"Runs trained at commit {', '.join(s['commits'])} (code state {', '.join(s['code_states'])}), "
                 + ", ".join(f"{k} {v}" for k, v in versions.items())
                 + f"; device {', '.join(s['devices'])}; machine load (1-min average) during the runs "
                 + ("-" if load is None else f"{load[0]:.2f}-{load[1]:.2f}") + f". Training time summed over the "
                 f"runs: {meta['train_min']:.0f} min.\n")
    lines.append(f"Settings: {meta['settings']}. Seeds {s['seeds']}; validation {s['num_images']} images.\n")
    lines.append(f"Grid command: `{meta['command']}`; this file again from the committed runs: "
                 f"`python benchmarks/attention_study.py {meta['analyze_args']} --analyze-only`.\n")
    lines.append("## Recipe: has the baseline converged?\n")
    rows = [[seed, _pct(r["AP"]), "-" if r["gain"] is None else f"{100 * r['gain']:+.1f}",
             "PASS" if r["ok"] else "FAIL"] for seed, r in conv["per_seed"].items()]
    lines += _table(["baseline seed", "final AP", "gain over the evaluation before", "goal (>= 20 AP, gain < 1.5)"], rows)
    lines.append(f"Validation AP by epoch of every run: [{meta['curves']}]({meta['curves']}).\n")
    lines.append("## Per variant (mean ± std over seeds, %)\n")
    show = ["AP", "AP50", "APs", *SIZE_COLUMNS, *OCC_COLUMNS, "AR_occ_heavy", "occluded_recall"]
    head = ["variant", "where", "params (M)", "GFLOPs", "train img/s", "gate", *(_label(m) for m in show)]
    rows = []
    for v, r in s["variants"].items():
        speed = "-" if r["train_images_per_s"] is None else f"{r['train_images_per_s']:.1f}"
        flops = "-" if r.get("flops") is None else f"{r['flops'] / 1e9:.2f}"
        gate = "-" if r.get("gate_mean") is None else f"{sum(r['gate_mean']) / len(r['gate_mean']):+.2f}"
        cells = [v, r["kind"], f"{r['params'] / 1e6:.2f}", flops, speed, gate]
        cells += [f"{_pct(r['mean'][m])} ± {_pct(r['std'][m])}" if r["mean"].get(m) is not None else "-" for m in show]
        rows.append(cells)
    lines += _table(head, rows)
    size = next((r.get("flops_image_size") for r in s["variants"].values() if r.get("flops_image_size")), None)
    lines.append(f"GFLOPs: one forward at {size} px (torch's FlopCounterMode; a multiply-add counts 2). "
                 "train img/s: training images per second of the run (data, forward, backward, step), mean over "
                 "seeds. gate: the mean learned gate of the zero-gated blocks (``y + g * (block(y) - y)``), mean "
                 "over seeds; '-' where blocks are applied as their papers do (no gate).\n")
    lines.append(f"## Against the baseline: difference [{100 * s['confidence']:.0f}% interval]\n")
    lines.append(f"Paired bootstrap ({s['n_boot']} replicates) resampling the validation images and the seeds (the "
                 "same draw for both models; a model's value is its mean over the drawn seeds). Verdicts control the "
                 f"false discovery rate at {100 * s['fdr']:.0f}% over the {s['fdr_cells']} cells of this table "
                 "(Benjamini-Hochberg on the two-sided bootstrap p-values): **helps** / **hurts** only where the "
                 "adjusted p-value is at most that; every other cell is no evidence either way. Heavily occluded "
                 "objects have almost no AP in any model, so the table also gives AP50 and AR100 (recall of the best "
                 "100 detections) per occlusion bucket, and the occluded recall.\n")
    head = ["variant", *(_label(m) for m in COMPARE_COLUMNS)]
    rows = []
    for v, comp in s["comparison"].items():
        cells = [v]
        for m in COMPARE_COLUMNS:
            c = comp.get(m)
            if c is None or c["diff"] is None:
                cells.append("-")
                continue
            word = {"helps": " **helps**", "hurts": " **hurts**"}.get(c["verdict"], "")
            cells.append(f"{_signed(c['diff'])} [{_signed(c['low'])}, {_signed(c['high'])}]{word}")
        rows.append(cells)
    lines += _table(head, rows)
    found = [(v, m, c) for v, comp in s["comparison"].items() for m, c in comp.items()
             if m in COMPARE_COLUMNS and c["significant"]]
    lines.append("Significant after the correction: " + ("; ".join(
        f"{v} {_label(m)} {_signed(c['diff'])} (adjusted p {c['p_adjusted']:.3f})" for v, m, c in found)
        if found else "none") + ".\n")
    lines.append(f"![difference from baseline per size bin and occlusion bucket]({meta['figure']})\n")
    gated = [(v, r) for v, r in s["variants"].items() if r.get("gate_range")]
    if gated:
        lines.append("## Learned gates\n")
        rows = [[v, ", ".join(f"{g:+.2f}" for g in r["gate_mean"]), f"{r['gate_range'][0]:+.2f}",
                 f"{r['gate_range'][1]:+.2f}", f"{100 * r['gate_range'][2]:.0f}%"] for v, r in gated]
        lines += _table(["variant", "mean gate per seed", "min", "max", "negative"], rows)
        lines.append("A negative gate applies the block's change inverted: the network learned to use the "
                     "opposite of what the attention computes there.\n")
    if s["missing"]:
        lines.append(f"Unfinished (left out): {', '.join(s['missing'])}; rerun the grid command to finish them.\n")
    lines.append("## Commands\n")
    lines.append(f"One run alone (e.g. {meta['example_variant']}, seed 0): `python train.py fit --config "
                 f"{meta['example_config']}` (drop `trainer.default_root_dir` or point it elsewhere).\n")
    lines.append(f"GPU command (the full grid; `benchmarks/study_gpu.sh`, run through the device tool): "
                 f"`{meta['gpu_command']}`\n")
    return "\n".join(lines)


def _savefig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})


def plot(study: dict, path: Path) -> None:
    """Difference from the baseline per size bin and occlusion bucket, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [m for m in (*SIZE_COLUMNS, *OCC_COLUMNS, "AR_occ_heavy", "occluded_recall") if m in study["metrics"]]
    variants = list(study["comparison"])
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(cols) + 3), 4.8))
    width = 0.8 / max(1, len(variants))
    cmap = plt.get_cmap("tab20")
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
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, capsize=2, label=v, color=cmap(i % 20))
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(len(SIZE_COLUMNS) - 0.5, color="0.6", lw=0.8, ls=":")
    ax.set_xticks(range(len(cols)), [_label(m) for m in cols], rotation=30, ha="right")
    ax.set_ylabel("difference from baseline (points)")
    ax.set_title(f"variant - baseline by size bin and occlusion bucket, {100 * study['confidence']:.0f}% interval "
                 "(images + seeds)", fontsize=9)
    if variants:
        ax.legend(fontsize=7, ncol=min(4, len(variants)))
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def plot_curves(study: dict, path: Path) -> None:
    """Validation AP by epoch of every run (one panel per variant, one line per seed), the
    baseline's mean in each panel for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(study["variants"])
    cols = min(4, len(variants))
    rows = -(-len(variants) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), sharex=True, sharey=True, squeeze=False)
    base = [c for c in study["variants"][REFERENCE]["val_AP_by_epoch"].values() if c]
    for ax, v in zip(axes.flat, variants):
        for seed, curve in study["variants"][v]["val_AP_by_epoch"].items():
            if curve:
                ax.plot([e for e, _ in curve], [100 * a for _, a in curve], marker=".", lw=1, label=f"seed {seed}")
        if v != REFERENCE and base:
            n = min(len(c) for c in base)
            ax.plot([e for e, _ in base[0][:n]], [100 * sum(c[i][1] for c in base) / len(base) for i in range(n)],
                    color="0.5", ls="--", lw=1, label="baseline mean")
        ax.set_title(v, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(variants):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("val AP (%)")
    for ax in axes[-1, :]:
        ax.set_xlabel("epoch")
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def _settings_line(base: dict) -> str:
    m, d, t = _model_args(base), base["data"]["init_args"], base["trainer"]
    opt = (base["model"]["init_args"].get("optimizer") or {}).get("init_args") or {}
    return (f"{m.get('arch')} on {m.get('backbone')} (FPN {m.get('fpn_channels')}, p2={m.get('p2')}), trained from "
            f"scratch; {base['data']['class_path'].rsplit('.', 1)[-1]} {d.get('num_train')} train / {d.get('num_val')} "
            f"val images of {d.get('image_size')} px, batch {d.get('batch_size')}, {t.get('max_epochs')} epochs, "
            f"lr {opt.get('lr')}, precision {t.get('precision', '32')}, validated every "
            f"{t.get('check_val_every_n_epoch', 1)} epoch(s), accelerator {t.get('accelerator')}")


def gpu_command() -> str:
    return ("bash benchmarks/study_gpu.sh  (= python benchmarks/attention_study.py " + " ".join(GPU_ARGS)
            + " --out-dir $OUT, then tar of the run folders; see the script)")


def _shown(path: Path) -> str:
    """``path`` as the results file shows it: relative to the repository (the same text from any
    checkout or worktree: a results folder is shown as ``benchmarks/results/<name>``)."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        if path.resolve().parent.name == "results" and path.resolve().parent.parent.name == "benchmarks":
            return f"benchmarks/results/{path.name}"
        return path.as_posix()


def _analyze_argv(args, dest: Path) -> list[str]:
    """The options with which ``--analyze-only`` rebuilds these files from the committed archive:
    the variants, seeds, replicates and note when not the defaults, and where the archive is when
    it is not the default one (``--accelerator gpu`` for ``attention-study-gpu``)."""
    defaults = build_parser()
    out = []
    if args.variants != default_variants():
        out += ["--variants", ",".join(args.variants)]
    if args.seeds != list(range(int(defaults.get_default("seeds")))):
        out += ["--seeds", str(len(args.seeds))]
    if args.n_boot != int(defaults.get_default("n_boot")):
        out += ["--n-boot", str(args.n_boot)]
    if args.note:
        out += ["--note", args.note]
    out_dir = Path(args.out_dir)
    if dest.resolve() == (out_dir / "attention-study-gpu").resolve():
        out += ["--accelerator", "gpu"]
    elif dest.resolve() != (out_dir / "attention-study-cpu").resolve():
        out += ["--archive-dir", _shown(dest)]
    return out


def write_results(args, dest: Path) -> Path:
    """Compare the archived runs in ``dest`` and write ``attention-study-<device>.{md,json,png}``
    and ``-curves.png`` into ``args.out_dir``; the same archived runs give the same files."""
    meta_in, gt, results, preds = read_archive(dest)
    study = summarize(args.variants, args.seeds, gt, results, preds, args.n_boot)
    used = [(v, s) for v in study["variants"] for s in args.seeds]
    device_label = "gpu" if any(results[k].get("device_type") == "cuda" for k in used) else "cpu"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"attention-study-{device_label}"
    example = next((v for v in study["variants"] if v != REFERENCE), REFERENCE)
    analyze = _analyze_argv(args, dest)
    meta = {"device_label": device_label, "note": args.note, "settings": _settings_line(meta_in["base_config"]),
            "train_min": sum(sum(r["wall_s"]) for r in study["variants"].values()) / 60,
            "command": meta_in["command"], "analyze_args": shlex.join(analyze) or "",
            "example_variant": example, "example_config": f"{_shown(dest)}/{example}-seed0/{RUN_CONFIG}",
            "gpu_command": gpu_command(), "figure": stem.name + ".png", "curves": stem.name + "-curves.png"}
    meta["analyze_args"] = meta["analyze_args"].strip()
    plot(study, stem.with_suffix(".png"))
    plot_curves(study, stem.parent / (stem.name + "-curves.png"))
    study["convergence"] = convergence(study)
    atomic_write_json(stem.with_suffix(".json"), {"meta": meta, "base_config": meta_in["base_config"], **study}, indent=1)
    atomic_write_text(stem.with_suffix(".md"), format_markdown(study, meta))
    return stem.with_suffix(".md")


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the grid, keep the finished runs and write the results; 0 when every run
    finished, else 1. ``--analyze-only`` reads the kept runs alone (no data, no training)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        train_one(Path(args.worker), args.threads)
        return 0
    if args.list_variants:
        for name, (kind, model_args) in available_variants().items():
            print(f"{name:12s} {kind:20s} {model_args}")
        return 0
    dest = archive_dir(args)
    if args.analyze_only:
        md = write_results(args, dest)
        print(f"[study] results: {md}")
        return 0
    base, root, runs = plan(args)
    gt = prepare_data(base)
    archive_study(dest, base, gt, argv)
    args.archive = dest
    state = code_state()
    print(f"[study] {len(runs)} runs under {root}, {args.parallel} at a time, {args.threads} threads each; "
          f"code state {state['code_state']} (commit {git_commit()}); finished runs kept in {dest}", flush=True)
    done = run_grid(args, runs, current=state["code_state"])
    try:
        md = write_results(args, dest)
        print(f"[study] results: {md}")
    except RuntimeError as e:  # the baseline is not finished yet: no table, the runs are kept
        print(f"[study] no table yet: {e}")
    return 0 if len(done) == len(runs) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (TypeError, ValueError) as e:
        print(f"attention_study.py: error: {e}", file=sys.stderr)
        sys.exit(2)
