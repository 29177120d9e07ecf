"""``python -m lmc_lightning`` = ``lmc``."""

import sys

from lmc_lightning.cli import run

if __name__ == "__main__":
    sys.exit(run())
