"""``python -m visattn ...``: the same command line as the ``visattn`` script."""
import sys

from .cli import main

sys.exit(main())
