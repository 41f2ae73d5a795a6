"""Model registry: models are chosen by name from ``config.model``."""

from __future__ import annotations

from typing import Sequence

from adpfl_jax.models import unet

MODELS = ('unet2d', 'unet3d')
UPSAMPLE = ('transpose', 'nearest')


def get_model(model_config, input_shape: Sequence[int], num_classes: int) -> unet.ModelSpec:
  """Builds the model named ``model_config.name`` for one example of ``input_shape``."""
  name = model_config.name
  if name not in MODELS:
    raise ValueError(f'config.model.name={name!r} is not a known model; choose one of {MODELS}')
  ndim = 2 if name == 'unet2d' else 3
  if len(input_shape) != ndim + 1:
    raise ValueError(f'config.model.name={name!r} expects {ndim}D inputs with channels last, '
                     f'got example shape {tuple(input_shape)}')
  module = unet.UNet(
      num_classes=num_classes,
      features=int(model_config.features),
      depth=int(model_config.depth),
      ndim=ndim,
      upsample=model_config.upsample,
      groups=int(model_config.groups),
      fast_conv=bool(model_config.fast_conv),
  )
  return unet.ModelSpec(module=module, input_shape=tuple(input_shape))
