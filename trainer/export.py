"""``python -m trainer.export``: the stable command name (official / diffusers weights); the code is trainer/tools/export.py."""
import sys

from trainer.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
