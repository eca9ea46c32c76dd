"""``python -m hetero_ps.control``: change a running worker's knobs through the master.

The code lives in ``hetero_ps.tools.control``; this module keeps the command users type.
"""

import sys

from hetero_ps.tools.control import main

if __name__ == "__main__":
    sys.exit(main())
