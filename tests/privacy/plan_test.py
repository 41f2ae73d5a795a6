"""The privacy plan: what it charges covers both neighbours of every silo (regression tests)."""

import importlib.util
import os

import dp_accounting as dpa
import numpy as np
import pytest

from adpfl_jax.federated import sampling
from adpfl_jax.privacy import accounting
from adpfl_jax.privacy import plan as plan_lib

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')


def _quickstart(arg):
  spec = importlib.util.spec_from_file_location(
      'quickstart', os.path.join(ROOT, 'experiments', 'quickstart.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _participation(cfg, k):
  return sampling.participation(cfg.seed, cfg.fed.rounds, k, cfg.fed.clients_per_round)


def _planned_ledger(plan, silo, rounds, steps):
  """The ledger a completed run charges silo ``silo``: every planned round's step spec."""
  ledger = accounting.Ledger(plan.accountant)
  for r in range(rounds):
    ledger.record(plan.spec(silo, float(plan.planned_noise(r, [silo])[0])), steps)
  return ledger


def _oracle_epsilon(ledger, n, delta):
  """ε of a ledger recomputed with dp-accounting alone, for the add-one neighbour (n + 1)."""
  events = []
  for spec, count in ledger.runs:
    if spec.truncated_batch_size is not None:
      event = dpa.TruncatedSubsampledGaussianDpEvent(n + 1, spec.sampling_rate,
                                                     spec.truncated_batch_size,
                                                     spec.noise_multiplier)
    else:
      event = dpa.PoissonSampledDpEvent(spec.sampling_rate,
                                        dpa.GaussianDpEvent(spec.noise_multiplier))
    events.append(dpa.SelfComposedDpEvent(event, count))
  accountant = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
  return accountant.compose(dpa.ComposedDpEvent(events)).get_epsilon(delta)


def test_quickstart_smoke_ledger_covers_the_add_one_neighbour():
  # Reported by an independent review: the smoke ledger said 7.99991, while the truncated event
  # over the add-one neighbour (n + 1 records) gives 8.126 > 8.
  cfg = _quickstart('smoke')
  n, k = int(cfg.data.examples_per_client), int(cfg.data.num_clients)
  plan = plan_lib.PrivacyPlan.from_config(cfg, np.full(k, n), _participation(cfg, k))
  assert plan.max_batch <= n  # truncation is possible: the case under test
  for silo in range(k):
    ledger = _planned_ledger(plan, silo, int(cfg.fed.rounds), int(cfg.fed.local_steps))
    reported = ledger.epsilon(cfg.privacy.delta)
    oracle = _oracle_epsilon(ledger, n, cfg.privacy.delta)
    assert oracle <= cfg.privacy.target_epsilon
    assert reported == pytest.approx(oracle, rel=1e-6)


@pytest.mark.parametrize('accountant', ['pld', 'rdp'])
def test_batch_size_equal_to_silo_size_cannot_truncate_the_neighbour(accountant):
  # batch_size == n is valid (q = 1). A padded batch of n slots would truncate the add-one
  # neighbour's draws of n + 1 records; the plan must either hold n + 1 slots or account it.
  cfg = _quickstart('smoke')
  cfg.unlock()
  cfg.privacy.batch_size = 24
  cfg.privacy.accountant = accountant
  sizes = np.array([24, 24, 24, 24])
  plan = plan_lib.PrivacyPlan.from_config(cfg, sizes, _participation(cfg, len(sizes)))
  spec = plan.spec(0, 1.0)
  assert plan.max_batch > 24 or spec.is_truncated
  assert plan.max_batch == 25 and not spec.is_truncated
  batches = sampling.poisson_plan((0, 1), 0, 0, 24, 1.0, 2, plan.max_batch)
  assert batches.mask.sum(1).tolist() == [24, 24] and batches.truncated == 0


def test_never_truncating_batch_holds_the_neighbour():
  assert plan_lib.max_batch_size(30, 0.5, float('inf')) == 31
  assert plan_lib.max_batch_size(30, 0.9, 4.0) == 31  # the 4-sd rule would exceed n
  assert plan_lib.max_batch_size(256, 0.125, 4.0) == 54
