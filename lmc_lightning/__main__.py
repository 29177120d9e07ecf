"""``python -m lmc_lightning`` = ``lmc``."""

from lmc_lightning.cli import main

if __name__ == "__main__":
    main()
