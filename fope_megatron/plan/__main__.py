"""``python -m fope_megatron.plan`` (the ``fope-plan`` command)."""

import sys

from . import main

sys.exit(main())
