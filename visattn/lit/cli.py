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
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .checkpoint import VerifiedCheckpointIO, verify_checkpoint

__all__ = ["VisattnCLI", "main"]


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
        keys = sorted(set(configured) | set(published) - {"pretrained_backbone"})
        differ = [k for k in keys if k != "pretrained_backbone" and configured.get(k) != published.get(k)]
        if differ:
            detail = "; ".join(f"{k}: config {configured.get(k)!r}, published {published.get(k)!r}" for k in differ)
            raise ValueError(f"--weights {name}: the configured model differs from the published one ({detail})")
        from safetensors.torch import load_file

        state = load_file(str(weights.weight_file(name)))
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

    def after_fit(self) -> None:
        self._report()

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()


def main(args: list[str] | None = None) -> VisattnCLI:
    """Run the training CLI (``args`` as on the command line; ``None`` reads ``sys.argv``)."""
    return VisattnCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      auto_configure_optimizers=False, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main(sys.argv[1:])
