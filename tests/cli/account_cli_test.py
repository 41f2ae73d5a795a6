"""Tests for `adpfl account` (adpfl_jax.account_cli); dp-accounting is the oracle."""

import json
import subprocess
import sys

import dp_accounting as dpa
import pytest

from adpfl_jax import account_cli
from adpfl_jax.privacy import accounting as acc
from adpfl_jax.privacy import calibration

BASE = ['--sampling-rate', '0.01', '--steps', '1000', '--delta', '1e-5']
RDP = ['--accountant', 'rdp']  # the default is pld, as in training


def _event(q, z, steps):
  return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)


def _run_json(capsys, argv):
  assert account_cli.main(argv + ['--json']) == 0
  return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize('accountant', ['rdp', 'pld'])
def test_json_epsilon_matches_dp_accounting(capsys, accountant):
  out = _run_json(capsys, ['--noise-multiplier', '1.1', *BASE, '--accountant', accountant,
                           '--pld-discretization', '1e-3'])
  if accountant == 'rdp':
    oracle = dpa.rdp.RdpAccountant()
  else:
    oracle = dpa.pld.PLDAccountant(value_discretization_interval=1e-3)
  expected = oracle.compose(_event(0.01, 1.1, 1000)).get_epsilon(1e-5)
  assert out['epsilon'] == pytest.approx(expected, abs=1e-6)
  assert out['noise_multiplier'] == 1.1
  assert out['accountant'] == accountant
  assert out['delta'] == 1e-5 and out['steps'] == 1000 and out['sampling_rate'] == 0.01


def test_target_epsilon_mode_returns_sigma_within_budget(capsys):
  out = _run_json(capsys, ['--target-epsilon', '2.0', *BASE, *RDP])
  sigma = out['noise_multiplier']
  eps = dpa.rdp.RdpAccountant().compose(_event(0.01, sigma, 1000)).get_epsilon(1e-5)
  assert 0.99 * 2.0 <= eps <= 2.0
  assert out['epsilon'] == pytest.approx(eps, abs=1e-9)
  assert out['target_epsilon'] == 2.0


def test_schedule_mode_matches_composed_event(capsys):
  out = _run_json(capsys, ['--noise-multiplier', '2.0', '--sampling-rate', '0.02', '--steps',
                           '12', '--delta', '1e-5', '--schedule', 'step', '--schedule-param',
                           'factor=0.5', 'every=2', '--steps-per-round', '3', *RDP])
  # A non-constant schedule's σ are accounted rounded down onto the plan's grid (as in training).
  grid = lambda z: acc.quantize_noise(z, calibration.NOISE_GRID['rdp'])
  event = dpa.ComposedDpEvent([_event(0.02, grid(2.0), 6), _event(0.02, grid(1.0), 6)])
  assert out['epsilon'] == pytest.approx(
      dpa.rdp.RdpAccountant().compose(event).get_epsilon(1e-5), abs=1e-9)
  assert out['min_noise_multiplier'] == 1.0 and out['max_noise_multiplier'] == 2.0


def test_readable_output_and_errors(capsys):
  assert account_cli.main(['--noise-multiplier', '1.1', *BASE, *RDP]) == 0
  line = capsys.readouterr().out
  assert 'ε =' in line and 'rdp' in line and '1000 steps' in line
  assert account_cli.main(['--noise-multiplier', '1.1', '--sampling-rate', '1.5', '--steps', '10',
                           '--delta', '1e-5']) == 2
  assert '--sampling-rate' in capsys.readouterr().err
  assert account_cli.main(['--noise-multiplier', '1.0', *BASE, *RDP, '--mechanism', 'laplace']) == 2
  assert 'pld' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    account_cli.main(BASE)  # neither --noise-multiplier nor --target-epsilon


def test_python_dash_m_entry_point():
  proc = subprocess.run(
      [sys.executable, '-m', 'adpfl_jax.account_cli', '--noise-multiplier', '3.0',
       '--sampling-rate', '0.1', '--steps', '512', '--delta', '1e-6', '--json', *RDP],
      capture_output=True, text=True, check=True, timeout=120)
  out = json.loads(proc.stdout)
  assert out['epsilon'] == pytest.approx(4.051, abs=1e-3)  # RDP reference, docs/privacy.md §2.5


def test_json_output_is_strict_json_when_epsilon_is_infinite(capsys):
  # Review finding: ε = ∞ (no noise) was printed as Infinity, which is not JSON.
  assert account_cli.main(['--noise-multiplier', '0', *BASE, '--json']) == 0

  def refuse(name):
    raise ValueError(f'non-JSON constant {name}')
  out = json.loads(capsys.readouterr().out, parse_constant=refuse)
  assert out['epsilon'] is None


@pytest.mark.parametrize('accountant,schedule', [('rdp', 'constant'), ('pld', 'linear')])
def test_account_prints_the_sigma_training_uses(capsys, tiny_config, accountant, schedule):
  # One calibration path: `adpfl account --target-epsilon` and a training run's plan give the same
  # σ to the last digit for the same inputs.
  import numpy as np  # pylint: disable=g-import-not-at-top
  from adpfl_jax.federated import sampling  # pylint: disable=g-import-not-at-top
  from adpfl_jax.privacy import plan as plan_lib  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(**{'privacy.accountant': accountant, 'privacy.noise_schedule': schedule,
                       'privacy.noise_schedule_params.start': 1.25,
                       'privacy.noise_schedule_params.end': 0.8, 'fed.rounds': 5})
  sizes = np.full(4, 24)
  plan = plan_lib.PrivacyPlan.from_config(cfg, sizes, sampling.participation(0, 5, 4, 4))
  argv = ['--target-epsilon', '8', '--sampling-rate', str(plan.rates[0]), '--steps', '10',
          '--steps-per-round', '2', '--delta', '1e-5', '--accountant', accountant,
          '--schedule', schedule]
  if schedule == 'linear':
    argv += ['--schedule-param', 'start=1.25', 'end=0.8']
  if plan.max_batch <= 24:
    argv += ['--truncated-batch-size', str(plan.max_batch), '--dataset-size', '24']
  out = _run_json(capsys, argv)
  assert out['noise_multiplier'] == plan.noise_scale[0]
