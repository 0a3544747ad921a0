"""``python -m inplace_abn.memory_report``: see :mod:`inplace_abn.memory_report.cli`."""

import sys

from .cli import main

sys.exit(main())
