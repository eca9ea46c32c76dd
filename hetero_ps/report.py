"""``python -m hetero_ps.report``: plots and a markdown report of an experiment folder.

The code lives in ``hetero_ps.tools.report``; this module keeps the command users type.
"""

import sys

from hetero_ps.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
