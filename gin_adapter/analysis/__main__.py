"""``python -m gin_adapter.analysis``: the same as the ``gin-analysis`` command."""

import sys

from .cli import main

sys.exit(main())
