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

  The data keys every medical data set reads (`adpfl_jax/data/federated.py`; the task keys are in
  `experiments/<task>.py`): natural clients (every site), 20% of each client's patients / lesions
  held out for evaluation, all cases, 2 decoding threads, 3 phantom sites when `data.dir` is
  empty. A GroupNorm U-Net (features 8, depth 3), 60 rounds of 3 clients × 4 local steps, and
  record-level DP-SGD per silo calibrated to (ε = 8, δ = 1e-5) with C = 1, protecting one `unit`.
  """
  c = config
  c.data.partition = 'natural'  # natural | iid | dirichlet
  c.data.num_clients = 0  # natural: 0 = every site, K = the K largest sites
  c.data.alpha = 0.5  # dirichlet concentration (HAM10000: over the diagnosis; 3D: over sites)
  c.data.test_fraction = 0.2  # patients (lesions) per client held out for evaluation
  c.data.max_cases = 0  # 0 = all cases (images)
  c.data.num_workers = 2  # threads decoding/preprocessing cases
  c.data.phantom_sites = 3  # phantoms (data.dir empty): acquisition sites
  c.data.cache_dir = ''  # phantom cache root; '' = $ADPFL_CACHE_DIR or ~/.cache/adpfl_jax/phantoms
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
