"""``python -m trainer.sample``: the stable command name (EMA sample grids from a checkpoint); the code is trainer/tools/sample.py."""
import sys

from trainer.tools.sample import main

if __name__ == "__main__":
    sys.exit(main())
