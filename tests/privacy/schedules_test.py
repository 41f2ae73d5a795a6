"""Tests for adpfl_jax.privacy.schedules (closed forms; dp-accounting as the privacy oracle)."""

import math

import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adpfl_jax.privacy import accounting as acc
from adpfl_jax.privacy import calibration
from adpfl_jax.privacy import schedules

CASES = [
    ('constant', {}),
    ('exponential', {'rate': 0.95}),
    ('step', {'factor': 0.5, 'every': 3}),
    ('linear', {'start': 2.0, 'end': 0.8, 'rounds': 10}),
    ('cosine', {'start': 2.0, 'end': 0.8, 'rounds': 10}),
]


def test_closed_forms():
  t = np.arange(12)
  np.testing.assert_allclose(schedules.np_schedule('constant', {}, 1.7)(t), np.full(12, 1.7))
  np.testing.assert_allclose(schedules.np_schedule('exponential', {'rate': 0.9}, 2.0)(t),
                             2.0 * 0.9**t)
  np.testing.assert_allclose(
      schedules.np_schedule('step', {'factor': 0.5, 'every': 5}, 3.0)(t),
      3.0 * np.array([1] * 5 + [0.5] * 5 + [0.25] * 2))
  lin = schedules.np_schedule('linear', {'start': 2.0, 'end': 1.0, 'rounds': 11})(np.arange(13))
  np.testing.assert_allclose(lin, np.r_[np.linspace(2.0, 1.0, 11), 1.0, 1.0])
  cos = schedules.np_schedule('cosine', {'start': 2.0, 'end': 1.0, 'rounds': 11})(np.arange(11))
  assert cos[0] == pytest.approx(2.0) and cos[-1] == pytest.approx(1.0)
  assert cos[5] == pytest.approx(1.5)  # midpoint of a half cosine
  assert np.all(np.diff(cos) < 0)
  one = schedules.np_schedule('linear', {'start': 2.0, 'end': 1.0, 'rounds': 1})(np.arange(3))
  np.testing.assert_allclose(one, [2.0, 2.0, 2.0])


@pytest.mark.parametrize('kind,params', CASES)
def test_jnp_matches_numpy_under_jit(kind, params):
  t = np.arange(15)
  host = schedules.np_schedule(kind, params, 1.3)(t)
  fn = jax.jit(lambda r, s: schedules.jnp_schedule(kind, params, s)(r))
  dev = fn(jnp.asarray(t, jnp.int32), jnp.float32(1.3))
  np.testing.assert_allclose(np.asarray(dev), host, rtol=1e-5)
  # Scalar round inside jit, and a changed scale, without retracing errors.
  assert float(fn(jnp.int32(4), jnp.float32(2.0))) == pytest.approx(
      float(schedules.np_schedule(kind, params, 2.0)(4)), rel=1e-5)


@pytest.mark.parametrize('kind,params,match', [
    ('exponential', {}, 'rate'),
    ('exponential', {'rate': -1.0}, 'rate'),
    ('step', {'factor': 0.5, 'every': 0}, 'every'),
    ('step', {'factor': 0.5, 'every': 2.5}, 'every'),
    ('linear', {'start': 1.0, 'end': 0.5}, 'rounds'),
    ('cosine', {'start': 1.0, 'end': 0.0, 'rounds': 5}, 'end'),
    ('constant', {'rate': 0.9}, 'rate'),
    ('warmup', {}, 'warmup'),
])
def test_invalid_params_raise(kind, params, match):
  with pytest.raises(ValueError, match=match):
    schedules.np_schedule(kind, params)


def _rdp_of_runs(q, runs, delta):
  event = dpa.ComposedDpEvent([
      dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), c)
      for z, c in runs])
  return dpa.rdp.RdpAccountant().compose(event).get_epsilon(delta)


@pytest.mark.parametrize('kind,params', [
    ('constant', {}),
    ('exponential', {'rate': 0.93}),
    ('step', {'factor': 0.7, 'every': 3}),
    ('cosine', {'start': 2.0, 'end': 1.0}),
])
def test_calibrated_schedule_lands_within_one_percent_below_target(kind, params):
  q, steps_per_round, rounds, target, delta = 0.01, 5, 8, 1.0, 1e-5
  params = schedules.validate_params(kind, params, rounds)
  plan = calibration.SiloPlan(q, tuple(range(rounds)), steps_per_round, kind,
                              tuple(sorted(params.items())), accountant='rdp',
                              quantize=kind != 'constant')
  s = calibration.calibrate(plan, target, delta)
  sigmas = [plan.sigma(s, r) for r in range(rounds)]
  accounted = [(plan.spec(z).noise_multiplier, steps_per_round) for z in sigmas]
  planned = _rdp_of_runs(q, accounted, delta)
  assert 0.99 * target <= planned <= target
  # The exact σ_t (what the device adds) are >= the accounted ones: never above the target.
  assert _rdp_of_runs(q, [(z, steps_per_round) for z in sigmas], delta) <= target
  # The plan's ledger runs are the same plan.
  ledger = acc.Ledger('rdp')
  ledger.extend(plan.runs(s))
  assert ledger.epsilon(delta) == pytest.approx(planned, abs=1e-9)


def test_calibrated_step_schedule_with_pld():
  q, steps_per_round, rounds, target, delta, disc = 0.05, 25, 4, 2.0, 1e-5, 1e-3
  params = (('every', 2), ('factor', 0.8))
  plan = calibration.SiloPlan(q, tuple(range(rounds)), steps_per_round, 'step', params,
                              accountant='pld')
  s = calibration.calibrate(plan, target, delta)
  sigmas = [plan.sigma(s, r) for r in range(rounds)]
  event = dpa.ComposedDpEvent([
      dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(float(z))),
                              steps_per_round) for z in sigmas])
  eps = dpa.pld.PLDAccountant(value_discretization_interval=disc).compose(event).get_epsilon(
      delta)
  assert 0.99 * target <= eps <= target
  assert math.isclose(sigmas[2] / sigmas[0], 0.8, rel_tol=1e-6)
