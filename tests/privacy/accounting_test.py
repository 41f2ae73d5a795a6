"""Tests for adpfl_jax.privacy.accounting. dp-accounting called directly is the oracle."""

import copy
import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
from scipy import stats

from adpfl_jax.privacy import accounting as acc
from adpfl_jax.privacy import calibration
from adpfl_jax.privacy import filters

ADD_REMOVE = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE


def _poisson_gaussian(q, z):
  return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))


def _rdp_eps(event, delta):
  return dpa.rdp.RdpAccountant().compose(event).get_epsilon(delta)


def _pld_eps(event, delta, disc=1e-4):
  return dpa.pld.PLDAccountant(value_discretization_interval=disc).compose(event).get_epsilon(
      delta)


# ------------------------------------------------------------------------------------------------
# Reference values (docs/privacy.md §2.5, §11.2).
# ------------------------------------------------------------------------------------------------
def test_reference_values_jax_privacy_doctest():
  spec = acc.StepSpec(0.1, 3.0)
  pld = acc.Ledger('pld')
  pld.record(spec, 512)
  rdp = acc.Ledger('rdp')
  rdp.record(spec, 512)
  assert pld.epsilon(1e-6) == pytest.approx(3.77, abs=0.01)
  assert rdp.epsilon(1e-6) == pytest.approx(4.051, abs=1e-3)
  event = dpa.SelfComposedDpEvent(_poisson_gaussian(0.1, 3.0), 512)
  assert pld.epsilon(1e-6) == pytest.approx(_pld_eps(event, 1e-6), abs=1e-6)
  assert rdp.epsilon(1e-6) == pytest.approx(_rdp_eps(event, 1e-6), abs=1e-9)


def test_calibrated_sigma_reference_pld():
  # 9.662 at the fine discretisation; the calibration searches at the coarse 1e-3 grid (an upper
  # bound of ε), so its σ is at most a hair larger.
  sigma = calibration.calibrate_noise_multiplier(1.0, 1e-6, 0.1, 512, accountant='pld')
  assert 9.660 <= sigma <= 9.675
  eps = _pld_eps(dpa.SelfComposedDpEvent(_poisson_gaussian(0.1, sigma), 512), 1e-6)
  assert 0.99 <= eps <= 1.0


@pytest.mark.parametrize('q,steps,target,delta', [
    (0.1, 512, 1.0, 1e-6),
    (0.01, 1000, 2.0, 1e-5),
    (0.05, 200, 0.5, 1e-5),
    (1.0, 10, 4.0, 1e-5),
])
def test_rdp_calibration_lands_just_below_target(q, steps, target, delta):
  sigma = calibration.calibrate_noise_multiplier(target, delta, q, steps, 'rdp')
  eps = _rdp_eps(dpa.SelfComposedDpEvent(_poisson_gaussian(q, sigma), steps), delta)
  assert 0.99 * target <= eps <= target
  # Smallest: 0.1% less noise overshoots.
  assert _rdp_eps(dpa.SelfComposedDpEvent(_poisson_gaussian(q, sigma * 0.999), steps),
                  delta) > target


def test_per_silo_calibration():
  for q, n in zip([0.02, 0.1, 0.05], [300, 100, 250]):
    z = calibration.calibrate_noise_multiplier(3.0, 1e-5, q, n, 'rdp')
    eps = _rdp_eps(dpa.SelfComposedDpEvent(_poisson_gaussian(q, z), n), 1e-5)
    assert 0.99 * 3.0 <= eps <= 3.0


# ------------------------------------------------------------------------------------------------
# Ledger vs dp-accounting.
# ------------------------------------------------------------------------------------------------
def _heterogeneous_steps():
  sigmas = [2.0, 2.0, 1.8, 1.8, 1.5, 1.2, 1.2, 1.5, 1.0, 0.9]  # per round, not monotone
  steps_per_round, q = 3, 0.02
  return q, [z for z in sigmas for _ in range(steps_per_round)]


def test_ledger_matches_dp_accounting_heterogeneous_schedule():
  q, per_step = _heterogeneous_steps()
  oracle_event = dpa.ComposedDpEvent([_poisson_gaussian(q, z) for z in per_step])
  delta = 1e-5
  ledgers = {}
  for name in ('rdp', 'pld'):
    ledger = acc.Ledger(name, pld_discretization=1e-3)
    for z in per_step:
      ledger.record(acc.StepSpec(q, z))
    ledgers[name] = ledger
    assert ledger.steps == len(per_step)
    assert len(ledger.runs) == 7  # consecutive equal specs merged
  rdp_eps = ledgers['rdp'].epsilon(delta)
  pld_eps = ledgers['pld'].epsilon(delta)
  assert rdp_eps == pytest.approx(_rdp_eps(oracle_event, delta), abs=1e-9, rel=0)
  assert pld_eps == pytest.approx(_pld_eps(oracle_event, delta, 1e-3), abs=1e-6, rel=0)
  assert pld_eps <= rdp_eps
  # dp_event() is the equivalent composed event.
  assert _rdp_eps(ledgers['rdp'].dp_event(), delta) == pytest.approx(rdp_eps, abs=1e-9)


def test_fast_path_equals_naive_online_accounting():
  """Per-round queries of the cached ledger equal a fresh RdpAccountant composed step by step."""
  q, delta = 0.01, 1e-5
  rng = np.random.default_rng(0)
  levels = [1.0, 1.2, 1.5, 2.0, 3.0]
  naive = dpa.rdp.RdpAccountant()
  ledger = acc.Ledger('rdp')
  for r in range(30):
    z = levels[int(rng.integers(len(levels)))]
    naive.compose(_poisson_gaussian(q, z), 2)
    ledger.record(acc.StepSpec(q, z), 2)
    if r % 10 == 9:
      assert ledger.epsilon(delta) == pytest.approx(naive.get_epsilon(delta), abs=1e-9, rel=0)


def test_epsilon_if_does_not_record_and_matches_recording():
  ledger = acc.Ledger('rdp')
  ledger.record(acc.StepSpec(0.02, 1.3), 100)
  before = ledger.copy()
  extra = [(acc.StepSpec(0.02, 1.3), 10), (acc.StepSpec(0.02, 0.9), 5)]
  predicted = ledger.epsilon_if(extra, 1e-5)
  assert ledger == before
  ledger.extend(extra)
  assert ledger.epsilon(1e-5) == predicted
  assert predicted > before.epsilon(1e-5)


def test_json_round_trip_preserves_epsilon_exactly():
  ledger = acc.Ledger('rdp')
  ledger.record(acc.StepSpec(0.013, 1.1), 7)
  ledger.record(acc.StepSpec(0.013, 0.1 + 0.2), 3)  # a float that needs all 17 digits
  ledger.record(acc.StepSpec(1.0, 2.5, 'laplace'))
  ledger.record(acc.StepSpec(0.02, 1.4, truncated_batch_size=200, dataset_size=1000), 4)
  text = ledger.to_json()
  json.loads(text)  # valid JSON
  restored = acc.Ledger.from_json(text)
  assert restored == ledger
  assert restored.runs == ledger.runs
  assert restored.epsilon(1e-5) == ledger.epsilon(1e-5)
  pld = acc.Ledger('pld', pld_discretization=1e-2)
  pld.record(acc.StepSpec(0.1, 1.0, 'laplace'), 20)
  pld.record(acc.StepSpec(0.1, 2.0), 20)
  restored = acc.Ledger.from_json(pld.to_json())
  assert restored == pld and restored.epsilon(1e-5) == pld.epsilon(1e-5)
  with pytest.raises(ValueError, match='format'):
    acc.Ledger.from_json(json.dumps({'runs': []}))


# ------------------------------------------------------------------------------------------------
# Events, mechanisms and edge cases.
# ------------------------------------------------------------------------------------------------
def test_make_step_event_structure():
  assert acc.make_step_event(0.1, 2.0) == _poisson_gaussian(0.1, 2.0)
  assert acc.make_step_event(0.1, 2.0, 'laplace') == dpa.PoissonSampledDpEvent(
      0.1, dpa.LaplaceDpEvent(2.0))
  assert acc.make_step_event(1.0, 2.0) == dpa.GaussianDpEvent(2.0)
  assert acc.make_step_event(0.1, 0.0) == dpa.NonPrivateDpEvent()
  # A silo of 100 records: the event is over its add-one neighbour's 101 records.
  assert acc.make_step_event(0.1, 2.0, truncated_batch_size=30,
                             dataset_size=100) == dpa.TruncatedSubsampledGaussianDpEvent(
                                 101, 0.1, 30, 2.0)


def test_zero_noise_is_infinite_and_q_one_is_allowed():
  for name in ('rdp', 'pld'):
    ledger = acc.Ledger(name, pld_discretization=1e-2)
    ledger.record(acc.StepSpec(0.1, 2.0), 5)
    ledger.record(acc.StepSpec(0.1, 0.0))
    assert math.isinf(ledger.epsilon(1e-5))
  # q = 1, one Gaussian release: PLD matches the analytic Gaussian (Balle & Wang).
  ledger = acc.Ledger('pld')
  ledger.record(acc.StepSpec(1.0, 2.0))
  assert ledger.epsilon(1e-5) == pytest.approx(dpa.get_epsilon_gaussian(2.0, 1e-5), abs=1e-3)
  rdp = acc.Ledger('rdp')
  rdp.record(acc.StepSpec(1.0, 2.0))
  assert rdp.epsilon(1e-5) == pytest.approx(2.1657, abs=1e-4)  # docs/privacy.md §1.3
  assert acc.Ledger('rdp').epsilon(1e-5) == 0.0


def test_laplace_ledger_with_pld_and_rdp_error():
  ledger = acc.Ledger('pld')
  ledger.record(acc.StepSpec(0.1, 1.0, 'laplace'), 100)
  event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.1, dpa.LaplaceDpEvent(1.0)), 100)
  assert ledger.epsilon(1e-5) == pytest.approx(_pld_eps(event, 1e-5), abs=1e-6)
  assert ledger.epsilon(1e-5) == pytest.approx(4.152, abs=1e-3)  # docs/privacy.md §2.4
  with pytest.raises(ValueError, match='pld'):
    acc.Ledger('rdp').record(acc.StepSpec(0.1, 1.0, 'laplace'))
  with pytest.raises(ValueError, match='pld'):
    calibration.calibrate_noise_multiplier(1.0, 1e-5, 0.1, 10, 'rdp', 'laplace')
  # Without subsampling RDP supports Laplace.
  rdp = acc.Ledger('rdp')
  rdp.record(acc.StepSpec(1.0, 1.0, 'laplace'))
  assert rdp.epsilon(1e-5) == pytest.approx(_rdp_eps(dpa.LaplaceDpEvent(1.0), 1e-5), abs=1e-12)


def test_truncated_sampling_pld_uses_dp_accounting_event():
  # A silo of n = 200 records: the add-one neighbour has 201, and the event must be built over
  # the dataset that contains the differing record (dp-accounting's dataset_size = n + 1).
  spec = acc.StepSpec(0.05, 1.2, truncated_batch_size=14, dataset_size=200)
  ledger = acc.Ledger('pld', pld_discretization=1e-3)
  ledger.record(spec, 50)
  oracle = dpa.SelfComposedDpEvent(dpa.TruncatedSubsampledGaussianDpEvent(201, 0.05, 14, 1.2), 50)
  assert ledger.epsilon(1e-5) == pytest.approx(_pld_eps(oracle, 1e-5, 1e-3), abs=1e-6)
  remove_one = dpa.SelfComposedDpEvent(dpa.TruncatedSubsampledGaussianDpEvent(200, 0.05, 14, 1.2),
                                       50)
  assert ledger.epsilon(1e-5) >= _pld_eps(remove_one, 1e-5, 1e-3)
  poisson = _pld_eps(dpa.SelfComposedDpEvent(_poisson_gaussian(0.05, 1.2), 50), 1e-5, 1e-3)
  assert ledger.epsilon(1e-5) > poisson


@pytest.mark.parametrize('n,batch,q,z,steps', [
    (48, 19, 8 / 48, 1.0, 3), (48, 10, 8 / 48, 1.0, 3), (256, 54, 0.125, 1.4, 240),
    (20, 8, 0.3, 0.8, 50), (10, 10, 0.5, 1.0, 20), (60, 14, 4 / 60, 0.9, 120)])
def test_add_one_neighbour_is_the_worse_pair(n, batch, q, z, steps):
  # ε with the dataset holding the differing record at n + 1 (add-one) covers the remove-one
  # pair (n) too: the ledger may account the add-one event alone.
  eps = {size: _pld_eps(dpa.SelfComposedDpEvent(
      dpa.TruncatedSubsampledGaussianDpEvent(size, q, batch, z), steps), 1e-5, 1e-3)
         for size in (n, n + 1)}
  assert eps[n + 1] >= eps[n] - 1e-9


def test_batch_of_n_slots_truncates_the_add_one_neighbour():
  # B = n holds every draw of the silo but not of its neighbour with n + 1 records.
  spec = acc.StepSpec(0.5, 1.0, truncated_batch_size=10, dataset_size=10)
  assert spec.is_truncated and spec.truncation_probability > 0
  assert not acc.StepSpec(0.5, 1.0, truncated_batch_size=11, dataset_size=10).is_truncated


def test_truncated_sampling_rdp_total_variation_fallback():
  q, z, steps, delta = 0.05, 1.0, 100, 1e-5
  poisson_event = dpa.SelfComposedDpEvent(_poisson_gaussian(q, z), steps)
  oracle = dpa.rdp.RdpAccountant().compose(poisson_event)
  # Batch that can never overflow: identical to Poisson.
  never = acc.Ledger('rdp')
  never.record(acc.StepSpec(q, z, truncated_batch_size=201, dataset_size=200), steps)
  assert never.epsilon(delta) == pytest.approx(oracle.get_epsilon(delta), abs=1e-12)
  # Rarely overflowing batch: ε is the least fixed point of ε = ε_P(δ - η(1 + e^ε)).
  batch, n = 40, 200
  eta = steps * stats.binom.sf(batch, n + 1, q)
  assert 0 < eta < delta / 100
  ledger = acc.Ledger('rdp')
  ledger.record(acc.StepSpec(q, z, truncated_batch_size=batch, dataset_size=n), steps)
  eps = ledger.epsilon(delta)
  assert eps >= oracle.get_epsilon(delta)
  assert oracle.get_epsilon(delta - eta * (1 + math.exp(eps))) <= eps
  assert oracle.get_epsilon(delta - eta * (1 + math.exp(eps))) == pytest.approx(eps, rel=1e-6)
  # Overflow more likely than δ: no finite guarantee from this fallback.
  tight = acc.Ledger('rdp')
  tight.record(acc.StepSpec(q, z, truncated_batch_size=12, dataset_size=n), steps)
  assert math.isinf(tight.epsilon(delta))


def test_quantize_noise_rounds_down_and_never_under_reports():
  rng = np.random.default_rng(1)
  grid = 0.01
  for z in rng.uniform(0.3, 5.0, size=50):
    zq = acc.quantize_noise(float(z), grid)
    assert zq <= z
    assert zq * (1 + grid) > z * (1 - 1e-12)
    k = math.log(zq) / math.log(1 + grid)
    assert abs(k - round(k)) < 1e-6  # on the geometric grid
  assert acc.quantize_noise(0.3, [0.1, 0.2, 0.3, 0.4]) == 0.3
  assert acc.quantize_noise(0.35, [0.1, 0.2, 0.3, 0.4]) == 0.3
  assert acc.quantize_noise(0.0, 0.01) == 0.0
  with pytest.raises(ValueError, match='smallest grid value'):
    acc.quantize_noise(0.05, [0.1, 0.2])
  # (xi) A quantised ledger's ε is >= the exact schedule's ε (dp-accounting oracle).
  q, sigmas = 0.05, np.linspace(2.0, 0.8, 12)
  exact = _rdp_eps(dpa.ComposedDpEvent([_poisson_gaussian(q, float(z)) for z in sigmas]), 1e-5)
  ledger = acc.Ledger('rdp')
  for z in sigmas:
    ledger.record(acc.StepSpec(q, acc.quantize_noise(float(z), 0.05)))
  assert ledger.epsilon(1e-5) >= exact


@pytest.mark.parametrize('make,match', [
    (lambda: acc.StepSpec(0.0, 1.0), 'sampling_rate'),
    (lambda: acc.StepSpec(1.5, 1.0), 'sampling_rate'),
    (lambda: acc.StepSpec(float('nan'), 1.0), 'sampling_rate'),
    (lambda: acc.StepSpec(0.1, -0.5), 'noise_multiplier'),
    (lambda: acc.StepSpec(0.1, float('inf')), 'noise_multiplier'),
    (lambda: acc.StepSpec(0.1, 1.0, 'cauchy'), 'mechanism'),
    (lambda: acc.StepSpec(0.1, 1.0, truncated_batch_size=10), 'dataset_size'),
    (lambda: acc.StepSpec(0.1, 1.0, 'laplace', 10, 100), 'truncated_batch_size'),
    (lambda: acc.make_step_event(-0.1, 1.0), 'sampling_rate'),
    (lambda: acc.Ledger('rdp').epsilon(0.0), 'delta'),
    (lambda: acc.Ledger('rdp').epsilon(1.0), 'delta'),
    (lambda: acc.Ledger('moments'), 'accountant'),
    (lambda: acc.Ledger('rdp', dpa.NeighboringRelation.REPLACE_ONE), 'REPLACE_ONE'),
    (lambda: acc.Ledger('pld', 'replace_one'), 'REPLACE_ONE'),
    (lambda: acc.Ledger('rdp', dpa.NeighboringRelation.REPLACE_SPECIAL), 'neighboring_relation'),
    (lambda: acc.Ledger('rdp').record(acc.StepSpec(0.1, 1.0), 0), 'count'),
    (lambda: calibration.calibrate_noise_multiplier(0.0, 1e-5, 0.1, 10), 'target_epsilon'),
    (lambda: calibration.calibrate_noise_multiplier(-1.0, 1e-5, 0.1, 10), 'target_epsilon'),
    (lambda: calibration.calibrate_noise_multiplier(1.0, 2.0, 0.1, 10), 'delta'),
    (lambda: calibration.calibrate_noise_multiplier(1.0, 1e-5, 0.0, 10), 'sampling_rate'),
    (lambda: calibration.calibrate_noise_multiplier(1.0, 1e-5, 0.1, 0), 'steps'),
    (lambda: filters.RdpFilter(1.0, 1e-5, 1.0), 'orders'),
    (lambda: filters.RdpFilter(0.0, 1e-5, 8.0), 'target_epsilon'),
])
def test_invalid_values_raise_value_error_naming_parameter(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_add_or_remove_relation_accepted_by_name():
  assert acc.Ledger('rdp', 'add_or_remove_one').neighboring_relation == ADD_REMOVE


# ------------------------------------------------------------------------------------------------
# Calibration of planned runs (calibration.SiloPlan / calibrate / calibrate_scale).
# ------------------------------------------------------------------------------------------------
def test_calibrated_schedule_never_overshoots():
  q, target, delta = 0.01, 1.5, 1e-5
  plan = calibration.SiloPlan(q, tuple(range(4)), 15, 'linear',
                              (('end', 0.8), ('rounds', 4), ('start', 1.5)), accountant='rdp')
  s = calibration.calibrate(plan, target, delta)
  exact = dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(_poisson_gaussian(q, plan.sigma(s, r)), 15)
                               for r in range(4)])
  eps = _rdp_eps(exact, delta)
  assert 0.99 * target <= eps <= target
  assert np.float32(s) == s  # a float32 scale, rounded up: the device adds at least this noise


def test_calibrate_scale_generic():
  q, delta, target = 0.02, 1e-5, 2.0

  def runs(s):
    return [(acc.StepSpec(q, s), 100), (acc.StepSpec(q, 2 * s), 100)]

  s = calibration.calibrate_scale(runs, target, delta, 'rdp')
  oracle = dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(_poisson_gaussian(q, s), 100),
                                dpa.SelfComposedDpEvent(_poisson_gaussian(q, 2 * s), 100)])
  assert 0.99 * target <= _rdp_eps(oracle, delta) <= target


# ------------------------------------------------------------------------------------------------
# Rényi filter.
# ------------------------------------------------------------------------------------------------
def test_filter_halts_before_exceeding_with_adaptive_sigma():
  target, delta, q = 2.0, 1e-5, 0.02
  plan = [(acc.StepSpec(q, 1.2), 200)]
  filt = filters.RdpFilter.for_plan(target, delta, plan)
  (order,) = filt.orders
  rng = np.random.default_rng(0)
  admitted, refusals = [], 0
  running = dpa.rdp.RdpAccountant(orders=[order])  # oracle at the filter's order
  while refusals < 10:
    # A data-dependent choice of σ (e.g. driven by a noisy validation loss).
    spec = acc.StepSpec(q, float(rng.choice([1.1, 1.2, 1.6])))
    event = _poisson_gaussian(q, spec.noise_multiplier)
    if not filt.admit(spec):
      refusals += 1
      # The refused step would have taken the admitted run past the target.
      assert copy.deepcopy(running).compose(event).get_epsilon(delta) > target
      with pytest.raises(filters.BudgetExceededError):
        filt.spend(spec)
      continue
    filt.spend(spec)
    admitted.append(spec)
    running.compose(event)
    assert running.get_epsilon(delta) <= target
    assert filt.spent_epsilon() <= target
  assert len(admitted) > 50
  # The guarantee (from the budget fixed in advance) is at most the target; the full-grid RDP of
  # the admitted steps (a non-adaptive reading) is also below it.
  assert filt.epsilon_bound() <= target
  assert filt.ledger.steps == len(admitted)
  assert filt.ledger.epsilon(delta) <= target


def test_filter_admits_the_plan_and_multi_order_stops_at_first_order():
  target, delta, q = 3.0, 1e-5, 0.05
  sigma = calibration.calibrate_noise_multiplier(target, delta, q, 100, 'rdp')
  spec = acc.StepSpec(q, sigma)
  filt = filters.RdpFilter.for_plan(target, delta, [(spec, 100)])
  for _ in range(100):
    filt.spend(spec)
  assert filt.epsilon_bound() <= target
  multi = filters.RdpFilter(target, delta, [8.0, 16.0, 32.0])
  singles = [filters.RdpFilter(target, delta, a) for a in (8.0, 16.0, 32.0)]
  n_multi = 0
  while multi.admit(spec):
    multi.spend(spec)
    n_multi += 1
  n_single = []
  for f in singles:
    n = 0
    while f.admit(spec) and n < 10_000:
      f.spend(spec)
      n += 1
    n_single.append(n)
  assert n_multi == min(n_single)
  with pytest.raises(ValueError, match='truncated'):
    multi.admit(acc.StepSpec(q, 1.0, truncated_batch_size=5, dataset_size=100))
