r"""Quickstart: DP-FL (record-level DP-SGD in each silo) on the built-in phantom skin federation.

  adpfl train --config=experiments/quickstart.py --workdir=runs/demo
  adpfl train --config=experiments/quickstart.py --workdir=runs/demo_np --config.privacy.mode=none
  adpfl train --config=experiments/quickstart.py:smoke --workdir=/tmp/q   # seconds, for tests

Four hospitals with dermoscopy-like 32×32 images, a small GroupNorm U-Net, (ε = 8, δ = 1e-5)
per silo with the noise multiplier calibrated from the target.
"""

from adpfl_jax.configs import common
from adpfl_jax.configs import default


def get_config(arg=None):
  args = common.parse_arg(arg, smoke=False)
  c = default.get_config()
  if args.smoke:
    c.data.examples_per_client = 48
    c.data.test_examples_per_client = 8
    c.data.image_size = 16
    c.model.features = 4
    c.fed.rounds = 3
    c.fed.local_steps = 1
    c.privacy.batch_size = 8
    c.eval.every_rounds = 1
  c.lock()
  return c
