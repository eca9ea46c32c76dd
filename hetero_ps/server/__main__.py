import sys

from hetero_ps.server.cli import main

sys.exit(main())
