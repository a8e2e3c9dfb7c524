"""``python -m trainer.status``: the stable command name (ML-ops' run status, torch-free); the code is trainer/tools/status.py."""
import sys

from trainer.tools.status import main

if __name__ == "__main__":
    sys.exit(main())
