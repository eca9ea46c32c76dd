"""``python -m hetero_ps.report``: plots and a markdown report of an experiment folder (the code lives in ``hetero_ps.tools.report``)."""

import sys

from hetero_ps.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
