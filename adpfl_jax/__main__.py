"""``python -m adpfl_jax`` = ``adpfl``."""

import sys

from adpfl_jax import main

sys.exit(main.run())
