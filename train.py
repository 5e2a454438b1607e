"""Train and evaluate visattn models: ``python train.py fit --config configs/quickstart.yaml``.

Subcommands ``fit``, ``validate``, ``test``, ``predict``; ``--print_config`` shows every option.
See README "Training".
"""
from visattn.lit.cli import main

if __name__ == "__main__":
    main()
