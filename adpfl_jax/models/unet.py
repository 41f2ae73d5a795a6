"""U-Nets (2D and 3D) with GroupNorm, written for one example and vmapped by callers.

No BatchNorm: per-example gradients under ``vmap`` must not mix examples, and FedAvg must have
no stale ``batch_stats`` to average. Every convolution routes through
``adpfl_jax.ops.conv.conv_general_dilated``, whose backward pass is made of forward
convolutions, so a gradient step stays fast inside ``lax.scan``/``lax.map`` on XLA:CPU (see
``benchmarks/conv_in_scan.py``). ``fast_conv=False`` selects the plain ``lax`` convolution, for
comparisons.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adpfl_jax.ops import conv as conv_ops


def _groups(channels: int, max_groups: int) -> int:
  g = min(max_groups, channels)
  while channels % g:
    g -= 1
  return g


class ConvBlock(nn.Module):
  """Two (conv → GroupNorm → activation) layers."""

  features: int
  ndim: int
  groups: int = 8
  fast_conv: bool = True

  @nn.compact
  def __call__(self, x):
    conv_fn = conv_ops.conv_general_dilated if self.fast_conv else jax.lax.conv_general_dilated
    for _ in range(2):
      x = nn.Conv(self.features, (3,) * self.ndim, padding='SAME',
                  conv_general_dilated=conv_fn)(x)
      x = nn.GroupNorm(num_groups=_groups(self.features, self.groups))(x)
      x = nn.silu(x)
    return x


class UNet(nn.Module):
  """A U-Net over ``ndim`` spatial dimensions.

  Attributes:
    num_classes: output channels. 1 means a binary task (one logit per pixel); K > 1 means
      softmax over K classes (class 0 = background).
    features: channels of the first level; level ``l`` has ``features * 2**l``.
    depth: number of down-sampling steps (spatial size must be divisible by ``2**depth``).
    ndim: 2 for images (H, W, C), 3 for volumes (D, H, W, C).
    upsample: 'transpose' (stride-2 transposed convolution) or 'nearest' (resize + conv).
    groups: maximum GroupNorm groups.
    fast_conv: use the custom-VJP convolution (see module docstring).
  """

  num_classes: int = 1
  features: int = 8
  depth: int = 2
  ndim: int = 2
  upsample: str = 'transpose'
  groups: int = 8
  fast_conv: bool = True

  @nn.compact
  def __call__(self, x):
    """Maps one example ``x`` of shape (*spatial, C) (or a batch) to logits."""
    single = x.ndim == self.ndim + 1
    if single:
      x = x[None]
    for s in x.shape[1:1 + self.ndim]:
      if s % (2**self.depth):
        raise ValueError(f'model.depth={self.depth} needs spatial sizes divisible by '
                         f'{2**self.depth}; got input spatial shape {x.shape[1:1 + self.ndim]}')
    conv_fn = conv_ops.conv_general_dilated if self.fast_conv else jax.lax.conv_general_dilated
    block = functools.partial(ConvBlock, ndim=self.ndim, groups=self.groups,
                              fast_conv=self.fast_conv)
    window = (2,) * self.ndim
    skips = []
    for level in range(self.depth):
      x = block(self.features * 2**level)(x)
      skips.append(x)
      x = nn.max_pool(x, window, strides=window)
    x = block(self.features * 2**self.depth)(x)
    for level in reversed(range(self.depth)):
      feats = self.features * 2**level
      if self.upsample == 'transpose':
        up = conv_ops.ConvTranspose if self.fast_conv else nn.ConvTranspose
        x = up(feats, window, strides=window, padding='VALID')(x)
      elif self.upsample == 'nearest':
        shape = (x.shape[0], *[s * 2 for s in x.shape[1:-1]], x.shape[-1])
        x = jax.image.resize(x, shape, 'nearest')
        x = nn.Conv(feats, (1,) * self.ndim, conv_general_dilated=conv_fn)(x)
      else:
        raise ValueError(f"model.upsample must be 'transpose' or 'nearest', got {self.upsample!r}")
      x = jnp.concatenate([x, skips[level]], axis=-1)
      x = block(feats)(x)
    x = nn.Conv(self.num_classes, (1,) * self.ndim, conv_general_dilated=conv_fn)(x)
    return x[0] if single else x


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the rest of the framework needs to know about a model."""

  module: nn.Module
  input_shape: Sequence[int]  # one example, channels last

  def init(self, key):
    return self.module.init(key, jnp.zeros(tuple(self.input_shape), jnp.float32))['params']

  def apply(self, params, x):
    return self.module.apply({'params': params}, x)
