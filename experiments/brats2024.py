"""The `brats2024` config, shipped with the package: see `adpfl_jax/configs/brats2024.py`."""

from adpfl_jax.configs.brats2024 import get_config  # noqa: F401
