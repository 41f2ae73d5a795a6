"""Test setup: 4 forced CPU devices (sharding tests), CPU only, shared tiny fixtures."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from adpfl_jax.configs import common  # pylint: disable=g-import-not-at-top
from adpfl_jax.configs import default  # pylint: disable=g-import-not-at-top


def make_tiny_config(**overrides):
  """The tiny run most tests train: 4 phantom skin silos × 24 images at 8×8, a U-Net of features
  4 / depth 1, 2 rounds × 2 local DP-SGD steps at an expected batch of 6, RDP accounting.
  ``overrides`` are dotted keys (``'privacy.target_epsilon': 20.0``)."""
  c = default.get_config()
  c.data.num_clients = 4
  c.data.examples_per_client = 24
  c.data.test_examples_per_client = 4
  c.data.image_size = 8
  c.model.features = 4
  c.model.depth = 1
  c.model.groups = 2
  c.fed.rounds = 2
  c.fed.local_steps = 2
  c.fed.clients_per_round = 4
  c.privacy.batch_size = 6
  c.privacy.accountant = 'rdp'
  c.eval.every_rounds = 1
  c.eval.batch_size = 8
  c.log.progress = False
  for key, value in overrides.items():
    common.set_path(c, key, value)
  return c


@pytest.fixture(scope='session')
def tiny_config():
  """``make_tiny_config`` (a factory: call it with overrides)."""
  return make_tiny_config


@pytest.fixture(scope='session')
def tiny_data():
  """The tiny config's phantom federation, built once for the whole session."""
  from adpfl_jax.data import federated  # pylint: disable=g-import-not-at-top
  c = make_tiny_config()
  return federated.load(c.data, c.seed)


def run_and_stop(trainer, rounds: int):
  """Trains ``rounds`` rounds through the driver's session hooks and checkpoints, then leaves the
  workdir as a run killed right after that checkpoint would (no summary)."""
  import jax  # pylint: disable=g-import-not-at-top
  session = trainer.open()
  state = trainer.initial_state
  data = jax.numpy.asarray(trainer.data.train_x), jax.numpy.asarray(trainer.data.train_y)
  for r in range(rounds):
    plan = session.plan_round(r)
    state, out = trainer.round.apply(state, *data, plan[0])
    session.record(plan, jax.device_get(out), 0.0)
    session.after_round(jax.device_get(state), interrupted=r + 1 == rounds)
  session.close()


@pytest.fixture(scope='session')
def stop_after():
  """``run_and_stop``: a run that died after a given round (checkpoint written)."""
  return run_and_stop
