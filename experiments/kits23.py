"""The `kits23` config, shipped with the package: see `adpfl_jax/configs/kits23.py`."""

from adpfl_jax.configs.kits23 import get_config  # noqa: F401
