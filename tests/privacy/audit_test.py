"""The one-run privacy audit: its design, its bound, and that it catches a broken mechanism."""

import importlib.util
import json
import os

import numpy as np
import pytest

from adpfl_jax import train
from adpfl_jax import audit_cli
from adpfl_jax import jsonio
from adpfl_jax.configs import common
from adpfl_jax.data import federated
from adpfl_jax.privacy import audit
from adpfl_jax.privacy import noise as noise_lib

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')


def audited(**overrides):
  """``experiments/audit.py``'s smoke run: two silos of 32 images at 8×8, a 1,781-parameter U-Net,
  10 rounds × 2 local steps at q = ½, 1,000 canaries per silo."""
  spec = importlib.util.spec_from_file_location('audit_experiment',
                                                os.path.join(ROOT, 'experiments', 'audit.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('smoke')
  c.unlock()
  for key, value in overrides.items():
    common.set_path(c, key, value)
  return c


@pytest.fixture(scope='module')
def data():
  c = audited()
  return federated.load(c.data, c.seed)


def _run(data, workdir, **overrides):
  summary = train.Trainer(audited(**overrides), str(workdir), data=data).run()
  with open(os.path.join(workdir, 'audit.json')) as f:
    return summary, json.load(f)


def test_plan_draws_secret_half_coins_on_distinct_coordinates():
  plan = audit.AuditPlan.make(seed=0, identity=7, num_clients=3, param_count=5000, canaries=1000,
                              rates=[0.5, 0.25, 1.0], scale=1.0)
  assert plan.index.shape == (3, 1000) and len(np.unique(plan.index)) == 3000
  assert 0.45 < plan.included.mean() < 0.55
  other = audit.AuditPlan.make(seed=0, identity=8, num_clients=3, param_count=5000,
                               canaries=1000, rates=[0.5, 0.25, 1.0], scale=1.0)
  assert not np.array_equal(plan.included, other.included)  # secret per run identity
  index, mask = plan.round_arrays(3, np.array([0, 2]), steps=40)
  np.testing.assert_array_equal(index, plan.index[[0, 2]])
  assert not mask[:, :, ~plan.included[0]][0].any()  # excluded canaries never appear
  assert mask[0][:, plan.included[0]].mean() == pytest.approx(0.5, abs=0.03)  # Poisson at q
  assert mask[1][:, plan.included[2]].min() == 1.0  # q = 1: in every step
  np.testing.assert_array_equal(mask, plan.round_arrays(3, np.array([0, 2]), steps=40)[1])
  small = audit.AuditPlan.make(seed=0, identity=7, num_clients=4, param_count=1500,
                               canaries=1000, rates=[0.5] * 4, scale=1.0)
  np.testing.assert_array_equal(small.index[0], small.index[3])  # no room: shared coordinates
  with pytest.raises(ValueError, match='privacy.audit.canaries'):
    audit.AuditPlan.make(seed=0, identity=7, num_clients=1, param_count=10, canaries=11,
                         rates=[0.5], scale=1.0)


def test_lower_bound_from_scores():
  rng = np.random.default_rng(0)
  assert audit.epsilon_lower_bound(rng.normal(0, 1, 500), rng.normal(0, 1, 500), 1e-5) < 0.5
  separated = audit.epsilon_lower_bound(rng.normal(6, 1, 500), rng.normal(0, 1, 500), 1e-5)
  assert separated > 3.0


def test_non_private_run_is_caught_clearly(data, tmp_path):
  summary, report = _run(data, tmp_path, **{'privacy.mode': 'none'})
  assert summary['epsilon'] == float('inf')
  assert report['epsilon_lower_bound'] >= 2.0
  assert summary['epsilon_lower_bound'] == report['epsilon_lower_bound']
  assert [s['canaries'] for s in report['silos']] == [1000, 1000]
  # `adpfl audit --workdir` re-reports the run from its saved canary scores.
  assert jsonio.sanitize(audit_cli.report_run(str(tmp_path), 0.05)) == report
  loose = audit_cli.report_run(str(tmp_path), 0.2)['epsilon_lower_bound']
  assert loose >= report['epsilon_lower_bound']


@pytest.mark.parametrize('target', [1.0, 8.0])
def test_dp_run_lower_bound_stays_below_accounted_epsilon(data, tmp_path, target):
  summary, report = _run(data, tmp_path, **{'privacy.target_epsilon': target})
  assert summary['epsilon'] <= target
  assert report['consistent'] and summary['audit_consistent']
  for silo in report['silos']:
    assert silo['epsilon_lower_bound'] <= silo['epsilon']


def test_broken_mechanism_is_caught(data, tmp_path, monkeypatch):
  # A test-only bug: the ledger says ε = 1 but the noise is 10× smaller than accounted.
  original = noise_lib.sample_noise
  monkeypatch.setattr(noise_lib, 'sample_noise',
                      lambda key, shape, scale, mechanism: original(key, shape, scale / 10.0,
                                                                    mechanism))
  summary, report = _run(data, tmp_path, **{'privacy.target_epsilon': 1.0})
  assert summary['epsilon'] <= 1.0
  assert report['epsilon_lower_bound'] > summary['epsilon']
  assert not report['consistent'] and not summary['audit_consistent']
