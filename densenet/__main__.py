"""``python -m densenet`` = ``python -m densenet.train``."""

import sys

from .train import main

sys.exit(main())
