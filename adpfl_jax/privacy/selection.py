"""Private selection of hyper-parameters with a random number of trials (Papernot & Steinke 2022).

Picking the best of N trained configs by a score computed on the silos spends privacy too: the
published model depends on every trial. Papernot & Steinke (ICLR 2022, arXiv 2110.03620,
Theorem 2) bound it when the number of trials K is itself random, drawn from a truncated negative
binomial D_{η,γ} (η = 1: geometric; η = 0: logarithmic), each trial runs a mechanism Q that is
(λ, ε(λ))-RDP for every order λ, and only the best trial (its model and score) is released:

    ε_sel(λ) = ε(λ) + (1 + η) · min_λ̂ [ (1 − 1/λ̂) ε(λ̂) + log(1/γ) / λ̂ ] + log E[K] / (λ − 1).

dp-accounting implements exactly this for ``RepeatAndSelectDpEvent`` (its RDP accountant,
``_compute_rdp_repeat_and_select``, then monotonicity in λ); we call it through the accountant.

How this project maps onto the theorem (docs/frontier.md §5):

* Q = "draw one candidate config with public randomness, train it": a mixture over candidates
  with public weights, so its Rényi divergence at every order is at most the largest of the
  candidates' (joint quasi-convexity). The per-silo RDP curve of Q is therefore the order-wise
  maximum of the candidates' per-silo curves, each the sum of its steps' RDP vectors.
* Steps on truncated Poisson batches: a trial's RDP is that of the untruncated Poisson steps,
  and the truncated trial differs from it with probability ≤ η_trial (total variation, the
  fallback of ``accounting``). The selection over K trials differs from the untruncated one with
  probability ≤ E[K] · max η_trial, added to δ exactly as for one run.
* Every silo gets its own total: ε per silo of the whole selection, at the run's δ.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from adpfl_jax.privacy import accounting


def expected_trials(gamma: float, shape: float) -> float:
  """E[K] of the truncated negative binomial D_{shape,γ} (dp-accounting's formula)."""
  return float(rdp_lib._truncated_negative_binomial_mean(gamma, shape))  # pylint: disable=protected-access


def sample_trials(rng: np.random.Generator, gamma: float, shape: float) -> int:
  """One draw of K ~ D_{shape,γ}, K ≥ 1: the negative binomial NB(shape, γ) conditioned on K > 0
  (shape = 1: geometric with success probability γ). Public randomness: draw it from a seed."""
  if not 0 < gamma <= 1:
    raise ValueError(f'gamma must be in (0, 1], got {gamma!r}')
  if shape == 0:  # logarithmic: P[K = k] ∝ (1 − γ)^k / k
    return int(rng.logseries(1.0 - gamma)) if gamma < 1 else 1
  if shape < 0:
    raise ValueError(f'shape must be >= 0, got {shape!r}')
  while True:  # rejection: NB counts failures before `shape` successes; keep K > 0
    k = int(rng.negative_binomial(shape, gamma))
    if k > 0:
      return k


def trial_rdp(runs, orders: Sequence[float]) -> tuple[np.ndarray, float]:
  """(RDP vector of one trial's ledger runs, probability its truncated sampler differs)."""
  orders = tuple(float(a) for a in orders)
  rdp = np.zeros(len(orders))
  eta = 0.0
  for spec, count in runs:
    if not spec.is_private:
      return np.full(len(orders), np.inf), 0.0
    rdp += count * accounting.rdp_vector(spec, orders)
    if spec.is_truncated:
      eta += count * spec.truncation_probability
  return rdp, eta


def selection_epsilon(trial_runs: Sequence, delta: float, gamma: float, shape: float,
                      orders: Sequence[float] | None = None) -> float:
  """ε at ``delta`` of releasing the best of K ~ D_{shape,γ} trials, for ONE silo.

  Args:
    trial_runs: one ledger run list per candidate config (``Ledger.runs``); Q is a public
      random choice among them, so its RDP is their order-wise maximum.
    delta: target δ of the selection.
    gamma, shape: the distribution of the number of trials.
    orders: RDP orders (default dp-accounting's).

  Returns:
    ε (an upper bound) of the whole selection.
  """
  orders = tuple(accounting.DEFAULT_RDP_ORDERS if orders is None else orders)
  curves, etas = zip(*(trial_rdp(runs, orders) for runs in trial_runs))
  rdp = np.max(np.stack(curves), axis=0)
  if not np.any(np.isfinite(rdp)):
    return math.inf
  mean = expected_trials(gamma, shape)
  out = rdp_lib._compute_rdp_repeat_and_select(orders, rdp, mean, shape)  # pylint: disable=protected-access
  eta = mean * max(etas)
  return accounting._epsilon_with_truncation(  # pylint: disable=protected-access
      lambda d: float(rdp_lib.compute_epsilon(orders, out, d)[0]), delta, eta)


def single_trial_epsilon(runs, delta: float, orders: Sequence[float] | None = None) -> float:
  """ε of one trial alone with the same (RDP) accountant, for the side-by-side report."""
  ledger = accounting.Ledger('rdp', rdp_orders=orders)
  ledger.extend(runs)
  return float(ledger.epsilon(delta))
