"""Config helpers: ``parse_arg`` for ``--config=file.py:key=value,flag`` style arguments."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults):
  """Parses ``'a=1,b=x,smoke'`` into a ConfigDict over ``defaults``; unknown keys raise.

  A bare word sets a boolean default to True (``smoke``); values are converted to the type of the
  default.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(','):
    item = item.strip()
    if not item:
      continue
    key, eq, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'config argument {key!r} is not one of {sorted(defaults)} '
                       f'(in {arg!r})')
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f'config argument {key!r} needs a value ({key}=...)')
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes', 'y')
    else:
      out[key] = type(default)(value)
  return out


def set_path(config, key: str, value) -> None:
  """Sets a dotted key (``'privacy.quantile.target'``) of a ConfigDict; a missing key raises."""
  node = config
  *parents, leaf = key.split('.')
  for part in parents:
    node = node[part]
  node[leaf] = value


def medical_task(config, *, model: str, unit: str, batch_size: int, eval_batch_size: int):
  """Sets what the HAM10000, KiTS23 and BraTS 2024 configs share (their full-size settings).

  A GroupNorm U-Net (features 8, depth 3), 60 rounds of 3 clients × 4 local steps, and
  record-level DP-SGD per silo calibrated to (ε = 8, δ = 1e-5) with C = 1, protecting one `unit`.
  """
  c = config
  c.model.name = model
  c.model.features = 8
  c.model.depth = 3
  c.model.groups = 4
  c.fed.rounds = 60
  c.fed.clients_per_round = 3
  c.fed.local_steps = 4
  c.fed.client_lr = 0.1
  c.eval.every_rounds = 5
  c.eval.batch_size = eval_batch_size
  c.privacy.mode = 'dp'
  c.privacy.unit = unit
  c.privacy.calibrate = True
  c.privacy.target_epsilon = 8.0
  c.privacy.delta = 1e-5
  c.privacy.batch_size = batch_size
  c.privacy.clip_norm = 1.0
  return c
