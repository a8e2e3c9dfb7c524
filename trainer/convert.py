"""``python -m trainer.convert``: the stable command name (layout conversion, consolidated archives); the code is trainer/tools/convert.py."""
import sys

from trainer.tools.convert import main

if __name__ == "__main__":
    sys.exit(main())
