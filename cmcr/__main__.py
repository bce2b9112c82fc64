"""``python -m cmcr``: the same command line as the ``cmcr`` script."""

import sys

from cmcr.cli import main

sys.exit(main())
