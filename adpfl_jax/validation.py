"""Config validation: every check runs before anything compiles, and names the key at fault."""

from __future__ import annotations

import importlib.util
import math

import jax

from adpfl_jax import models
from adpfl_jax.data import federated as data_federated
from adpfl_jax.data import partition as data_partition
from adpfl_jax.federated import backends
from adpfl_jax.federated import server
from adpfl_jax.privacy import accounting
from adpfl_jax.privacy import controller
from adpfl_jax.privacy import plan
from adpfl_jax.privacy import schedules


class ConfigError(ValueError):
  """A config value is invalid; the message names the key and the allowed range."""


def _check(cond: bool, key: str, value, allowed: str):
  if not cond:
    raise ConfigError(f'config.{key}={value!r} is invalid: {allowed}')


def _choice(cfg, key: str, options):
  value = cfg
  for part in key.split('.'):
    value = value[part]
  _check(value in options, key, value, f'must be one of {tuple(options)}')


def validate(config) -> None:
  """Checks a config (shapes vs data are checked by ``validate_data``)."""
  p, f, d, m = config.privacy, config.fed, config.data, config.model
  _check(isinstance(config.seed, int) and config.seed >= 0, 'seed', config.seed,
         'must be a non-negative integer')
  _choice(config, 'privacy.mode', plan.PRIVACY_MODES)
  _choice(config, 'privacy.mechanism', accounting.MECHANISMS)
  _choice(config, 'privacy.clip_mode', controller.CLIP_MODES)
  _choice(config, 'privacy.accountant', accounting.ACCOUNTANTS)
  _choice(config, 'privacy.noise_schedule', schedules.KINDS)
  _choice(config, 'privacy.unit', plan.UNITS)
  _choice(config, 'fed.backend', backends.BACKENDS)
  _choice(config, 'fed.server_optimizer', server.SERVER_OPTIMIZERS)
  _choice(config, 'model.name', models.MODELS)
  _choice(config, 'model.upsample', models.UPSAMPLE)
  _check(0 < p.delta < 1, 'privacy.delta', p.delta, 'must be in (0, 1)')
  _check(p.target_epsilon > 0, 'privacy.target_epsilon', p.target_epsilon, 'must be > 0')
  _check(math.isfinite(p.noise_multiplier) and p.noise_multiplier >= 0,
         'privacy.noise_multiplier', p.noise_multiplier, 'must be finite and >= 0')
  if p.mode == 'dp' and not p.calibrate:  # The given σ is used as is.
    _check(p.noise_multiplier > 0, 'privacy.noise_multiplier', p.noise_multiplier,
           "must be > 0 with privacy.calibrate=False (σ = 0 gives ε = ∞; use privacy.mode='none')")
    _check(p.accountant != 'pld' or p.noise_multiplier >= 0.1, 'privacy.noise_multiplier',
           p.noise_multiplier, "must be >= 0.1 with accountant='pld' (PLD grids explode for a "
           "tiny σ; use accountant='rdp')")
  _check(p.clip_norm > 0, 'privacy.clip_norm', p.clip_norm, 'must be > 0')
  _check(0 < p.clip_min <= p.clip_norm <= p.clip_max, 'privacy.clip_min', p.clip_min,
         'need 0 < clip_min <= clip_norm <= clip_max')
  _check(0.0 <= p.clip_lr_power <= 2.0, 'privacy.clip_lr_power', p.clip_lr_power,
         'must be in [0, 2]')
  _check(p.batch_size >= 1, 'privacy.batch_size', p.batch_size, 'must be >= 1 (expected batch)')
  _check(p.max_batch_sigmas > 0, 'privacy.max_batch_sigmas', p.max_batch_sigmas, 'must be > 0')
  _check(0 <= p.quantile.target <= 1, 'privacy.quantile.target', p.quantile.target,
         'must be in [0, 1]')
  _check(p.quantile.lr > 0, 'privacy.quantile.lr', p.quantile.lr, 'must be > 0')
  _check(p.quantile.count_std_fraction > 0, 'privacy.quantile.count_std_fraction',
         p.quantile.count_std_fraction, 'must be > 0')
  _check(0 < p.percentile.percentile < 100, 'privacy.percentile.percentile',
         p.percentile.percentile, 'must be in (0, 100)')
  _check(0 < p.percentile.grid_min < p.percentile.grid_max, 'privacy.percentile.grid_min',
         p.percentile.grid_min, 'need 0 < grid_min < grid_max')
  _check(p.percentile.grid_size >= 2, 'privacy.percentile.grid_size', p.percentile.grid_size,
         'must be >= 2')
  _check(0 <= p.percentile.smoothing < 1, 'privacy.percentile.smoothing', p.percentile.smoothing,
         'must be in [0, 1)')
  if p.mode == 'dp' and p.mechanism == 'laplace':
    _check(p.accountant == 'pld', 'privacy.accountant', p.accountant,
           "Poisson-subsampled Laplace is only supported by the 'pld' accountant")
    _check(p.clip_mode == 'fixed', 'privacy.clip_mode', p.clip_mode,
           "the Laplace mechanism supports clip_mode='fixed' only")
  an = p.adaptive_noise
  if p.mode == 'dp' and an.enabled:
    _check(p.accountant == 'rdp', 'privacy.accountant', p.accountant,
           "adaptive_noise runs under a Rényi filter: use accountant='rdp' (there is no PLD filter)")
    _check(p.mechanism == 'gaussian', 'privacy.mechanism', p.mechanism,
           'adaptive_noise supports the gaussian mechanism only')
  _check(0 < an.factor < 1, 'privacy.adaptive_noise.factor', an.factor, 'must be in (0, 1)')
  _check(0 < an.min_factor <= 1, 'privacy.adaptive_noise.min_factor', an.min_factor,
         'must be in (0, 1]')
  _check(an.patience >= 1, 'privacy.adaptive_noise.patience', an.patience, 'must be >= 1')
  _check(an.loss_cap > 0, 'privacy.adaptive_noise.loss_cap', an.loss_cap, 'must be > 0')
  _choice(config, 'privacy.sparsity.mode', controller.SPARSITY_MODES)
  _check(0 < p.sparsity.fraction <= 1, 'privacy.sparsity.fraction', p.sparsity.fraction,
         'must be in (0, 1]')
  au = p.audit
  if au.enabled:
    _check(importlib.util.find_spec('jax_privacy') is not None, 'privacy.audit.enabled',
           au.enabled, "needs jax-privacy's auditor: pip install 'adpfl_jax[audit]'")
  _check(au.canaries >= 1, 'privacy.audit.canaries', au.canaries, 'must be >= 1')
  _check(0 < au.significance < 0.5, 'privacy.audit.significance', au.significance,
         'must be in (0, 0.5)')
  _check(f.rounds >= 1, 'fed.rounds', f.rounds, 'must be >= 1')
  _check(f.local_steps >= 1, 'fed.local_steps', f.local_steps, 'must be >= 1')
  _check(f.clients_per_round >= 1, 'fed.clients_per_round', f.clients_per_round, 'must be >= 1')
  _check(f.client_lr > 0, 'fed.client_lr', f.client_lr, 'must be > 0')
  _check(0 <= f.client_momentum < 1, 'fed.client_momentum', f.client_momentum, 'must be in [0, 1)')
  _check(f.server_lr > 0, 'fed.server_lr', f.server_lr, 'must be > 0')
  _check(f.chunk_size >= 1, 'fed.chunk_size', f.chunk_size, 'must be >= 1')
  _check(f.example_chunk >= 0, 'fed.example_chunk', f.example_chunk, 'must be >= 0')
  _check(config.checkpoint.every_rounds >= 0, 'checkpoint.every_rounds',
         config.checkpoint.every_rounds, 'must be >= 0 (0 = no checkpoints)')
  _check(config.checkpoint.keep >= 1, 'checkpoint.keep', config.checkpoint.keep, 'must be >= 1')
  fl = config.faults
  _check(0 <= fl.dropout < 1, 'faults.dropout', fl.dropout, 'must be in [0, 1)')
  _check(0 <= fl.straggler_fraction <= 1, 'faults.straggler_fraction', fl.straggler_fraction,
         'must be in [0, 1]')
  _check(1 <= fl.straggler_min_steps <= f.local_steps, 'faults.straggler_min_steps',
         fl.straggler_min_steps, f'must be in [1, fed.local_steps={f.local_steps}]')
  try:
    nan_ids = [int(v) for v in str(fl.nan_clients).replace(' ', '').split(',') if v]
  except ValueError:
    nan_ids = None
  _check(nan_ids is not None, 'faults.nan_clients', fl.nan_clients,
         'must be comma-separated client ids, e.g. "0,3"')
  _check(config.eval.every_rounds >= 1, 'eval.every_rounds', config.eval.every_rounds,
         'must be >= 1')
  _check(m.features >= 1, 'model.features', m.features, 'must be >= 1')
  _check(m.depth >= 0, 'model.depth', m.depth, 'must be >= 0')
  if f.backend == 'sharded':
    n = f.num_devices or jax.device_count()
    _check(n <= jax.device_count(), 'fed.num_devices', f.num_devices,
           f'only {jax.device_count()} devices are visible')
  _choice(config, 'data.name', data_federated.DATASETS)
  if d.name == 'phantom_skin':
    _check(not d.dir, 'data.dir', d.dir,
           "is not read by data.name='phantom_skin' (the built-in phantom federation); use the "
           "config of that folder's task (e.g. --config=kits23) or leave data.dir empty")
    _check(d.num_clients >= 1, 'data.num_clients', d.num_clients, 'must be >= 1')
    _check(d.examples_per_client >= 1, 'data.examples_per_client', d.examples_per_client,
           'must be >= 1')
    _check(f.clients_per_round <= d.num_clients, 'fed.clients_per_round', f.clients_per_round,
           f'must be <= data.num_clients={d.num_clients}')
    _check(d.image_size % (2**m.depth) == 0, 'data.image_size', d.image_size,
           f'must be divisible by 2**model.depth = {2**m.depth}')
    if p.mode == 'dp':
      _check(p.batch_size <= d.examples_per_client, 'privacy.batch_size', p.batch_size,
             f'expected batch must be <= data.examples_per_client={d.examples_per_client}')
  else:
    _choice(config, 'data.partition', data_partition.PARTITIONS)


def validate_data(config, data) -> None:
  """Checks the config against the loaded federation (client counts, sizes, shapes)."""
  f, p, m = config.fed, config.privacy, config.model
  k = data.num_clients
  _check(f.clients_per_round <= k, 'fed.clients_per_round', f.clients_per_round,
         f'the federation has only {k} clients')
  small = [i for i in range(k) if data.sizes[i] < 1]
  _check(not small, 'data', config.data.name, f'clients {small} have no training examples')
  tiny = [data.client_names[i] for i in range(k) if data.sizes[i] < 2]
  if tiny:
    print(f'warning: silo(s) {", ".join(tiny)} hold a single training example: record-level DP '
          'then protects that one example, and the silo learns almost nothing', flush=True)
  if p.mode == 'dp':
    n_min = int(data.sizes.min())
    _check(p.batch_size <= n_min, 'privacy.batch_size', p.batch_size,
           f'expected batch must be <= the smallest client ({n_min} examples)')
  spatial = data.example_shape[:-1]
  bad = [s for s in spatial if s % (2**m.depth)]
  _check(not bad, 'model.depth', m.depth,
         f'example spatial shape {spatial} is not divisible by 2**depth = {2**m.depth}')
