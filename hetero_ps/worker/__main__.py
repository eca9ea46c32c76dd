import sys

from hetero_ps.worker.cli import main

sys.exit(main())
