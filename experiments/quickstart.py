"""The `quickstart` config, shipped with the package: see `adpfl_jax/configs/quickstart.py`."""

from adpfl_jax.configs.quickstart import get_config  # noqa: F401
