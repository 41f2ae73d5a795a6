"""Test setup: 4 forced CPU devices (sharding tests), CPU only, shared tiny fixtures."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
