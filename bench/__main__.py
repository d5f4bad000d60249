"""``python -m bench --state-dir DIR`` (``make bench``): see ``bench.runner``."""

import sys

from .runner import main

sys.exit(main())
