"""adpfl_jax: adaptive differentially private federated learning for medical image segmentation.

The Python API (the README's example)::

  import adpfl_jax
  config = adpfl_jax.load_config('quickstart:smoke', {'privacy.target_epsilon': 4.0})
  summary = adpfl_jax.Trainer(config, 'runs/api').run()   # summary.json as a dict
  print(summary['dice'], summary['epsilon'])

``load_config`` takes a config file (``experiments/kits23.py:smoke``) or a packaged name
(quickstart, ham10000, kits23, brats2024) and dotted-key overrides. ``Trainer`` is
``adpfl_jax.train.Trainer``; names are imported on first use, so ``import adpfl_jax`` is instant.
"""

from __future__ import annotations

__all__ = ['Trainer', 'load_config']


def load_config(spec: str, overrides=None):
  """The locked config of ``spec`` with ``overrides`` (a dict or ``key=value`` strings)."""
  from adpfl_jax.configs import loading  # pylint: disable=g-import-not-at-top
  items = overrides.items() if isinstance(overrides, dict) else (overrides or ())
  return loading.load(spec, [tuple(i) if isinstance(i, tuple) else i for i in items])


def __getattr__(name: str):
  if name == 'Trainer':
    from adpfl_jax.train import Trainer  # pylint: disable=g-import-not-at-top
    return Trainer
  raise AttributeError(f'module adpfl_jax has no attribute {name!r}')
