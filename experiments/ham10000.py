"""The `ham10000` config, shipped with the package: see `adpfl_jax/configs/ham10000.py`."""

from adpfl_jax.configs.ham10000 import get_config  # noqa: F401
