"""Private selection (Papernot & Steinke 2022, Thm 2): the reported total ε composes per the theorem."""

import math

import dp_accounting
import numpy as np
import pytest

from adpfl_jax.privacy import accounting
from adpfl_jax.privacy import selection

ORDERS = tuple(float(a) for a in range(2, 129))
DELTA = 1e-5


def _by_hand(rho, gamma, shape):
  """Theorem 2 written out: ε'(λ) = ρ(λ) + (1+η)·min_λ̂[(1−1/λ̂)ρ(λ̂) + log(1/γ)/λ̂] + log E[K]/(λ−1),
  made monotone in λ, then converted with ε = min_λ [ρ' + log1p(−1/λ) − log(δλ)/(λ−1)]."""
  lam = np.array(ORDERS)
  if shape == 1:
    mean = 1 / gamma
  else:
    mean = shape * (1 / gamma - 1) / (1 - gamma ** shape)
  c = (1 + shape) * np.min((1 - 1 / lam) * rho + math.log(1 / gamma) / lam)
  out = rho + c + math.log(mean) / (lam - 1)
  out = np.array([out[i:].min() for i in range(len(out))])
  return float(np.min(out + np.log1p(-1 / lam) - np.log(DELTA * lam) / (lam - 1)))


@pytest.mark.parametrize('gamma,shape', [(0.1, 1.0), (0.05, 0.5), (0.2, 2.0)])
def test_total_epsilon_is_theorem_2(gamma, shape):
  sigma, steps = 4.0, 10
  runs = [(accounting.StepSpec(1.0, sigma), steps)]
  got = selection.selection_epsilon([runs], DELTA, gamma, shape, ORDERS)
  rho = steps * np.array(ORDERS) / (2 * sigma ** 2)  # Gaussian RDP, q = 1
  np.testing.assert_allclose(got, _by_hand(rho, gamma, shape), rtol=1e-6)
  # ... and dp-accounting's own RepeatAndSelectDpEvent agrees.
  acc = dp_accounting.rdp.RdpAccountant(orders=list(ORDERS))
  acc.compose(dp_accounting.dp_event.RepeatAndSelectDpEvent(
      dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), steps),
      selection.expected_trials(gamma, shape), shape))
  np.testing.assert_allclose(got, acc.get_epsilon(DELTA), rtol=1e-6)
  single = selection.single_trial_epsilon(runs, DELTA, ORDERS)
  assert single < got  # selection is never free


def test_candidates_take_the_worst_curve_and_truncation_adds_to_delta():
  weak = [(accounting.StepSpec(0.1, 2.0), 50)]
  strong = [(accounting.StepSpec(0.1, 1.0), 50)]
  both = selection.selection_epsilon([weak, strong], DELTA, 0.1, 1.0)
  assert both == pytest.approx(selection.selection_epsilon([strong], DELTA, 0.1, 1.0))
  assert both > selection.selection_epsilon([weak], DELTA, 0.1, 1.0)
  # A truncated sampler (B close to qn) can only raise the total.
  trunc = [(accounting.StepSpec(0.1, 2.0, truncated_batch_size=20, dataset_size=40), 50)]
  plain = [(accounting.StepSpec(0.1, 2.0), 50)]
  eps_trunc = selection.selection_epsilon([trunc], DELTA, 0.1, 1.0)
  assert math.isfinite(eps_trunc)
  assert eps_trunc > selection.selection_epsilon([plain], DELTA, 0.1, 1.0)


def test_sampled_number_of_trials_has_the_stated_mean():
  rng = np.random.default_rng(0)
  for gamma, shape in [(0.2, 1.0), (0.3, 0.5), (0.25, 0.0)]:
    draws = [selection.sample_trials(rng, gamma, shape) for _ in range(20000)]
    assert min(draws) >= 1
    assert np.mean(draws) == pytest.approx(selection.expected_trials(gamma, shape), rel=0.05)
