"""Train and evaluate visattn models: ``python train.py fit --config configs/quickstart.yaml``.

Subcommands ``fit``, ``validate``, ``test``, ``predict``; ``--print_config`` shows every option.
A user error (a bad option or value, an unknown block, a missing file, a refused resume) prints one
line, ``train.py: error: <what is wrong>``, and exits with status 2; ``--debug`` or
``VISATTN_DEBUG=1`` shows the traceback instead (see :mod:`visattn.lit.cli`). See README "Training".
"""
from visattn.lit.cli import cli_main, main

__all__ = ["main"]

if __name__ == "__main__":
    cli_main()
