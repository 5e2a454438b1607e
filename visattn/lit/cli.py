"""The LightningCLI behind ``train.py``: subcommands ``fit``, ``validate``, ``test``, ``predict``.

Additions to plain LightningCLI:

- the detector's ``num_classes`` is checked against the data's at ``setup`` (an error names both);
- a ``checkpoint`` group (``ModelCheckpoint``): ``last.ckpt`` plus the best by ``val/AP``;
- when no logger is configured: CSV (``metrics.csv``) and TensorBoard under
  ``trainer.default_root_dir``;
- after ``fit`` / ``validate`` / ``test`` of a detector: the evaluation report is printed and
  written to ``<log dir>/report/`` (``report.md``, ``report.json``, plots).
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

__all__ = ["VisattnCLI", "main"]


class VisattnCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/AP", "checkpoint.mode": "max", "checkpoint.save_last": True,
                             "checkpoint.save_top_k": 1,
                             "checkpoint.filename": "best-{epoch}-{step}"})

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        if config.get("logger") in (None, True):
            root = config.get("default_root_dir") or "."
            csv = CSVLogger(root, name="lightning_logs")
            kwargs["logger"] = [csv, TensorBoardLogger(root, name="lightning_logs", version=csv.version)]
        return super().instantiate_trainer(**kwargs)

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
