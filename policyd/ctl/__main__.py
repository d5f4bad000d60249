"""``python -m policyd.ctl``: the same as the ``policyctl`` console script."""

import sys

from .cli import main

sys.exit(main())
