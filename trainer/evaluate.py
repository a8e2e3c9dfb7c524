"""``python -m trainer.evaluate``: the stable command name (ADM sample batch, FID/IS); the code is trainer/tools/evaluate.py."""
import sys

from trainer.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
