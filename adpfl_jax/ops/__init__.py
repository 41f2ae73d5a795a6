"""Numerical ops: convolutions whose gradients stay fast inside loops on XLA:CPU."""

from adpfl_jax.ops import conv
from adpfl_jax.ops.conv import (
  IMPLS,
  Conv,
  ConvTranspose,
  conv_general_dilated,
  conv_transpose_padding,
  use_impl,
)

__all__ = [
  'IMPLS',
  'Conv',
  'ConvTranspose',
  'conv',
  'conv_general_dilated',
  'conv_transpose_padding',
  'use_impl',
]
