"""Invalid configs fail before anything compiles, and the error names the offending key."""

import pytest

from adpfl_jax import validation
from adpfl_jax.configs import default

CASES = [
    ('privacy.delta', 1.5), ('privacy.delta', 0.0), ('privacy.target_epsilon', 0.0),
    ('privacy.noise_multiplier', -1.0), ('privacy.clip_norm', 0.0),
    ('privacy.batch_size', 0), ('privacy.quantile.target', 1.5),
    ('privacy.quantile.lr', -0.2), ('privacy.percentile.percentile', 100.0),
    ('privacy.mechanism', 'cauchy'), ('privacy.accountant', 'moments'),
    ('privacy.noise_schedule', 'sawtooth'), ('privacy.sparsity.fraction', 0.0),
    ('privacy.sparsity.mode', 'topk_private'), ('fed.rounds', 0), ('fed.local_steps', 0),
    ('fed.clients_per_round', 9), ('fed.client_lr', 0.0), ('fed.client_momentum', 1.0),
    ('fed.backend', 'tpu_pod'), ('fed.server_optimizer', 'sgd2'), ('fed.chunk_size', 0),
    ('model.name', 'resnet'), ('model.features', 0), ('data.image_size', 30),
    ('faults.dropout', 1.0), ('faults.straggler_min_steps', 99), ('faults.nan_clients', 'a,b'),
    ('checkpoint.keep', 0), ('eval.every_rounds', 0), ('seed', -1),
    ('fed.num_devices', 64),
]


@pytest.mark.parametrize('key,value', CASES)
def test_invalid_value_names_its_key(key, value):
  c = default.get_config()
  if key == 'fed.num_devices':
    c.fed.backend = 'sharded'
  node = c
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(validation.ConfigError) as err:
    validation.validate(c)
  assert f'config.{key}=' in str(err.value)


def test_laplace_requires_pld():
  c = default.get_config()
  c.privacy.mechanism = 'laplace'
  c.privacy.accountant = 'rdp'
  with pytest.raises(validation.ConfigError, match='privacy.accountant'):
    validation.validate(c)


def test_adaptive_noise_requires_rdp_filter():
  c = default.get_config()
  c.privacy.adaptive_noise.enabled = True
  with pytest.raises(validation.ConfigError, match='privacy.accountant'):
    validation.validate(c)


def test_default_config_is_valid():
  validation.validate(default.get_config())


@pytest.mark.parametrize('sigma,accountant', [(0.0, 'rdp'), (0.0, 'pld'), (0.01, 'pld')])
def test_uncalibrated_sigma_must_be_usable(sigma, accountant):
  c = default.get_config()
  c.privacy.calibrate = False
  c.privacy.noise_multiplier = sigma
  c.privacy.accountant = accountant
  with pytest.raises(validation.ConfigError, match='privacy.noise_multiplier'):
    validation.validate(c)
  c.privacy.noise_multiplier = 0.5  # A usable σ passes with either accountant.
  validation.validate(c)
