"""``python -m ntk_diag report RUN_DIR``."""

import sys

from ntk_diag.cli import main

sys.exit(main())
