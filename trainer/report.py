"""``python -m trainer.report``: the stable command name (loss/throughput plots and a summary); the code is trainer/tools/report.py."""
import sys

from trainer.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
