"""The LightningCLI behind ``train.py``: subcommands ``fit``, ``validate``, ``test``, ``predict``.

Additions to plain LightningCLI:

- the detector's ``num_classes`` is checked against the data's at ``setup`` (an error names both);
- a ``checkpoint`` group (``ModelCheckpoint``): ``last.ckpt`` plus the best by ``val/AP``;
- when no logger is configured: CSV (``metrics.csv``) and TensorBoard under
  ``trainer.default_root_dir``;
- after ``fit`` / ``validate`` / ``test`` of a detector: the evaluation report is printed and
  written to ``<log dir>/report/`` (``report.md``, ``report.json``, plots) by
  :func:`visattn.evaluation.write_report`;
- checkpoints go through :class:`~visattn.lit.checkpoint.VerifiedCheckpointIO` (unless the trainer
  is given its own ``CheckpointIO``): ``--ckpt_path`` is verified (zip CRCs, truncation) and loaded
  with ``weights_only=True``; every checkpoint is written to a temporary name and renamed, and one
  with NaN / inf weights is refused.

Errors on the command line (:func:`cli_main`, what ``python train.py`` runs): a *user error* prints
one line, ``train.py: error: <what is wrong>``, on stderr and exits with status 2, as a bad option
does; ``--debug`` (anywhere on the command line) or ``VISATTN_DEBUG=1`` shows the full traceback
instead. User errors are

- what the argument parser refuses: an unknown option, a value of the wrong type, a missing
  ``--config`` file, an unknown ``class_path``;
- a ``ValueError``, ``TypeError``, ``OSError`` or Lightning ``MisconfigurationException`` while the
  configured objects (model, data, trainer) are built: the arguments were checked and refused
  (a bad batch size, an unknown block);
- while the subcommand runs: a missing or unreadable path (``FileNotFoundError``,
  ``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError``), a
  ``MisconfigurationException``, and a ``ValueError`` / ``TypeError`` / ``OSError`` that visattn's
  own checks raise (a ``raise`` statement in the ``visattn`` package): a refused resume, a corrupt
  or mismatched checkpoint, ``num_classes`` against the data, a malformed dataset; likewise the
  checks of ``torch.optim`` (the configured optimizer and scheduler are built when the run starts:
  ``lr=-1``).

A run stopped by the NaN guard (a ``FloatingPointError`` visattn raises) prints its one line too
and exits with status 1. Anything else (an exception from inside a library during the run, an
implicit ``TypeError`` from a bug) is a bug to report: it keeps its traceback. The message is the
first one in the exception's chain raised outside the argument parser (``jsonargparse`` wraps an
error from a class's ``__init__`` in its own), on one line. :func:`main`, for Python callers and
tests, raises as LightningCLI does.
"""
from __future__ import annotations

import argparse
import linecache
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .checkpoint import VerifiedCheckpointIO, verify_checkpoint

__all__ = ["VisattnCLI", "cli_main", "main"]


def _is_local_file_path(path) -> bool:
    """A ``ckpt_path`` naming a local file, not one Lightning resolves itself ("last", "best",
    "hpc", "registry:...", a URL); those are verified by :class:`VerifiedCheckpointIO` on load."""
    text = str(path or "")
    return bool(text) and "://" not in text and text not in ("last", "best", "hpc") and not text.startswith("registry")


def _with_checkpoint_io(plugins, strategy, preloaded: tuple | None = None) -> list | None:
    """The trainer's ``plugins`` plus a :class:`VerifiedCheckpointIO` (handed the checkpoint the CLI
    has already verified and loaded), unless a ``CheckpointIO`` is already given (as a plugin or by
    a strategy object)."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in plugins) or getattr(strategy, "_checkpoint_io", None) is not None:
        return plugins or None
    return [*plugins, VerifiedCheckpointIO(preloaded=preloaded)]



def _builder_defaults(class_path: str) -> dict:
    """The keyword defaults of the model builder ``class_path`` (``visattn.models.build_detector``),
    or ``{}`` when it cannot be imported."""
    import importlib
    import inspect

    module, _, attr = class_path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
        params = inspect.signature(fn).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

class VisattnCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/AP", "checkpoint.mode": "max", "checkpoint.save_last": True,
                             "checkpoint.save_top_k": 1,
                             "checkpoint.filename": "best-{epoch}-{step}"})
        parser.add_argument("--weights", type=str | None, default=None,
                            help="start from published weights (visattn.weights): a name from "
                                 "`visattn weights list`, verified by sha256; the model config must be "
                                 "the one the weights were published with")

    _preloaded: tuple | None = None

    def _parse_ckpt_path(self) -> None:
        """Verify ``--ckpt_path`` before anything reads it, and keep this run's configuration.

        Plain LightningCLI loads the checkpoint unverified here and overwrites the parsed model
        configuration with the checkpoint's hyper-parameters, so a changed setting on the command
        line (``--model.init_args.optimizer.init_args.lr``, ``eval_backend``, ...) was silently
        ignored. Here the configuration given wins; a resumed ``fit`` then refuses settings that
        the restore would undo (:func:`visattn.lit.detection.check_resume`)."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if _is_local_file_path(path):
            weights_only = self.config[sub].get("weights_only") is not False  # None (default) or True
            ckpt = verify_checkpoint(path, weights_only=weights_only)
            self._preloaded = (Path(path).resolve(), ckpt)

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        if config.get("logger") in (None, True):
            root = config.get("default_root_dir") or "."
            csv = CSVLogger(root, name="lightning_logs")
            kwargs["logger"] = [csv, TensorBoardLogger(root, name="lightning_logs", version=csv.version)]
        kwargs["plugins"] = _with_checkpoint_io(config.get("plugins"), config.get("strategy"), self._preloaded)
        return super().instantiate_trainer(**kwargs)

    def _load_weights(self) -> None:
        """``--weights NAME``: load the published, verified weights into the built model, after
        checking that the configured model is the one they were published with."""
        name = self.config[self.subcommand].get("weights")
        if not name:
            return
        if self.config[self.subcommand].get("ckpt_path"):
            raise ValueError("give either --weights or --ckpt_path, not both")
        from .. import weights

        entry = weights.pretrained_info(name)
        spec = self.config[self.subcommand]["model"]["init_args"]["model"]
        builder = str(spec["class_path"]).rsplit(".", 1)[-1]
        configured = spec["init_args"].as_dict() if hasattr(spec["init_args"], "as_dict") else dict(spec["init_args"])
        published = entry["config"]["kwargs"]
        if builder != entry["config"]["builder"]:
            raise ValueError(f"--weights {name}: published for {entry['config']['builder']}, but the config "
                             f"builds the model with {builder}")
        # a keyword one side leaves out means the builder's default there (an entry published before
        # a keyword existed, e.g. attention_gate, was built with its default)
        defaults = _builder_defaults(str(spec["class_path"]))
        keys = sorted(set(configured) | set(published) - {"pretrained_backbone"})
        have = {k: (configured.get(k, defaults.get(k)), published.get(k, defaults.get(k))) for k in keys}
        differ = [k for k in keys if k != "pretrained_backbone" and have[k][0] != have[k][1]]
        if differ:
            detail = "; ".join(f"{k}: config {have[k][0]!r}, published {have[k][1]!r}" for k in differ)
            raise ValueError(f"--weights {name}: the configured model differs from the published one ({detail})")
        state = weights.pretrained_state_dict(name)  # every check of `visattn weights verify`
        inner = getattr(self.model, "model", self.model)
        inner.load_state_dict(state, strict=True)

    def before_fit(self) -> None:
        self._load_weights()

    def before_validate(self) -> None:
        self._load_weights()

    def before_test(self) -> None:
        self._load_weights()

    def before_predict(self) -> None:
        self._load_weights()

    def _report(self) -> None:
        result = getattr(self.model, "last_eval", None)
        log_dir = self.trainer.log_dir  # a collective under DDP: every process must ask
        if not result or not self.trainer.is_global_zero:
            return
        from ..evaluation import write_report

        out = Path(log_dir or self.trainer.default_root_dir) / "report"
        md = write_report(out, result, title=f"{self.subcommand}: validation report")
        print("\n" + md.read_text())
        print(f"report written to {out}")

    def after_instantiate_classes(self) -> None:
        _phase["configured"] = True  # from here on the subcommand runs (see cli_main)

    def after_fit(self) -> None:
        self._report()

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()


def main(args: list[str] | None = None, *, parser_kwargs: dict | None = None) -> VisattnCLI:
    """Run the training CLI (``args`` as on the command line; ``None`` reads ``sys.argv``). Errors
    are raised (a bad option exits with status 2 after printing the usage, as LightningCLI does);
    :func:`cli_main` turns user errors into one line."""
    return VisattnCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      auto_configure_optimizers=False, args=args, save_config_kwargs={"overwrite": True},
                      parser_kwargs=parser_kwargs)


# -- the command line: one line per user error (see the module docstring) ----------------------
_phase = {"configured": False}  # set once the configured objects are built: the run has begun
# where a ``raise`` statement is an argument check: visattn's own, and the configured optimizer's and
# scheduler's (torch.optim checks their arguments when the run builds them: ``lr=-1``)
_CHECKED = (str(Path(__file__).resolve().parents[1]), str(Path(torch.optim.__file__).resolve().parent))
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# lines of jsonargparse's messages that say nothing about what is wrong
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
          "Given value:", "Expected a <class 'NoneType'>", "Expected a path but")


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` or ``VISATTN_DEBUG`` asks for tracebacks, and ``argv`` without ``--debug``."""
    rest = [a for a in argv if a != "--debug"]
    return len(rest) < len(argv) or os.environ.get("VISATTN_DEBUG", "") not in ("", "0"), rest


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return seen


def _raise_site(exc: BaseException) -> tuple[str, int] | None:
    """``(file, line)`` of the frame that raised ``exc``, or ``None``."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename, tb.tb_lineno


def _from_parser(exc: BaseException) -> bool:
    site = _raise_site(exc)
    return site is not None and f"{os.sep}jsonargparse{os.sep}" in site[0]


def _raised_by_a_check(exc: BaseException) -> bool:
    """Whether a ``raise`` statement in visattn (or in ``torch.optim``) raised ``exc``: one of their
    argument checks, not an operation failing in a bug."""
    site = _raise_site(exc)
    if site is None or not str(Path(site[0]).resolve()).startswith(tuple(p + os.sep for p in _CHECKED)):
        return False
    return linecache.getline(*site).lstrip().startswith("raise")


def _one_line(text: str, *, parser: bool = False) -> str:
    """``text`` on one line; from the parser (``parser=True``), without its bullets and the lines
    that only repeat types and values."""
    lines = [line.strip() for line in text.splitlines()]
    if parser:
        lines = [line.removeprefix("- ") for line in lines]
        lines = [line for line in lines if not line.startswith(_NOISE)]
    return " ".join(line for line in lines if line)


def user_error(exc: BaseException, *, configured: bool) -> tuple[str, int] | None:
    """``(message, exit status)`` if ``exc`` is a user error (status 2) or a run the NaN guard stopped
    (status 1), ``None`` for a bug (see the module docstring). ``configured``: whether the
    configured objects had been built (the subcommand was running)."""
    chain = _chain(exc)
    if isinstance(exc, argparse.ArgumentError):
        reported = exc
    else:  # the first error raised outside the parser: ours, not jsonargparse's wrapping of it
        reported = next((e for e in chain if not _from_parser(e)), exc)
    from_parser = reported is exc and _from_parser(exc)  # the parser refused an argument
    message = _one_line(str(reported), parser=from_parser) or type(reported).__name__
    if from_parser:
        return message, 2
    if isinstance(reported, (MisconfigurationException, *_PATH_ERRORS)):
        return message, 2
    if isinstance(reported, (ValueError, TypeError, OSError)) and (not configured or _raised_by_a_check(reported)):
        return message, 2
    if isinstance(reported, FloatingPointError) and _raised_by_a_check(reported):
        return message, 1
    return None


def cli_main(args: list[str] | None = None, *, prog: str = "train.py") -> VisattnCLI:
    """The command line (``python train.py``): :func:`main`, with each user error printed as one line
    ``<prog>: error: <message>`` on stderr and ``SystemExit(2)`` (1 for a run the NaN guard stopped);
    ``--debug`` or ``VISATTN_DEBUG=1``: the traceback instead. ``args`` as on the command line
    (``None``: ``sys.argv``)."""
    if args is None:  # LightningCLI reads sys.argv itself (and so do DDP's re-launched processes)
        debug, sys.argv[1:] = _debug_requested(sys.argv[1:])
    else:
        debug, args = _debug_requested(list(args))
    if debug:
        os.environ["VISATTN_DEBUG"] = "1"  # processes launched by DDP see it too
        return main(args)
    _phase["configured"] = False
    try:  # the parser raises instead of printing its usage: one line below
        return main(args, parser_kwargs={"exit_on_error": False})
    except Exception as e:  # classified below; anything else is re-raised unchanged
        found = user_error(e, configured=_phase["configured"])
        if found is None:
            raise
        message, status = found
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(status) from None


if __name__ == "__main__":
    cli_main(sys.argv[1:])
