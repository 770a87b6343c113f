"""``python -m cmtkd_graph ...`` = ``cmtkd-graph ...``."""

import sys

from cmtkd_graph.cli import main

sys.exit(main())
