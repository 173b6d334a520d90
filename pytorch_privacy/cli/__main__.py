"""``python -m pytorch_privacy.cli``."""

import sys

from . import main

sys.exit(main())
