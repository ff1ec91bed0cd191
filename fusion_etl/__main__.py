"""`python -m fusion_etl` is `fusion-etl`."""

import sys

from fusion_etl.cli import main

sys.exit(main())
