"""Rényi privacy filters: a budget fixed in advance for runs whose σ depends on released data.

A public schedule fixes every step's mechanism before training, so ordinary composition applies.
When σ depends on what earlier steps released (``privacy.adaptive_noise``), the ε of the realised
ledger is not a valid guarantee; a filter is (Feldman & Zrnic 2021, docs/privacy.md §5.3): the
budget is fixed before training and the run halts before any step that would exceed it.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from adpfl_jax.privacy import accounting


class BudgetExceededError(RuntimeError):
  """Raised by ``RdpFilter.spend`` for a step the filter does not admit."""


class RdpFilter:
  """Rényi privacy filter (Feldman & Zrnic 2021, arXiv 2008.11193) for data-dependent σ or q.

  Theorem (Feldman & Zrnic): fix an order α and a budget B(α) in advance. If mechanisms are chosen
  adaptively (each may depend on all earlier outputs) and the run halts before Σ_t ρ_t(α) would
  exceed B(α), the whole interaction is (α, B(α))-RDP, hence (ε, δ)-DP by the RDP conversion.
  Refusing a step is itself an adaptive choice (the null mechanism, ρ = 0), so the filter may
  refuse a large step and later admit a smaller one.

  Orders. The filter uses a FIXED set of orders A, fixed at construction with their budgets
  B(α) = the largest RDP at α whose conversion (dp-accounting's ``compute_epsilon`` at that single
  order) is ≤ target ε at the filter's δ. A step is admitted only if, for EVERY α in A, the spent
  RDP plus the step's RDP stays ≤ B(α). Then every α in A is an individually valid filter (halting
  early for another order's sake is just another adaptive choice), so the result is
  (α, B(α))-RDP for all α in A, and (target ε, δ)-DP. The tempting alternative "continue while
  SOME order is within budget" is NOT covered by the theorem: the order that ends up within
  budget would be chosen after seeing the data, and for the other orders the filter would have
  run past its budget. With |A| = 1 (the default, chosen by ``for_plan`` as the optimal order of
  a planned non-adaptive run) this is the standard single-order filter; extra orders only make it
  stop earlier.

  Only RDP-accountable steps are allowed (Gaussian, or Laplace with q = 1; untruncated, or
  truncation impossible). There is no general PLD filter (docs/privacy.md §5.3).

  Args:
    target_epsilon: ε budget, > 0.
    delta: δ in (0, 1).
    orders: one order α > 1.01, or a small fixed sequence of them.
  """

  def __init__(self, target_epsilon: float, delta: float,
               orders: Union[float, Sequence[float]]):
    self._target = accounting.check_target_epsilon(target_epsilon)
    self._delta = accounting.check_delta(delta)
    seq = [orders] if np.ndim(orders) == 0 else list(orders)
    if not seq:
      raise ValueError('orders must contain at least one RDP order')
    self._orders = tuple(accounting.as_float(a, 'orders') for a in seq)
    for a in self._orders:
      if not (math.isfinite(a) and a > 1.01):
        raise ValueError(f'orders must be finite and > 1.01, got {a!r}')
    self._budget = np.array([self._budget_at(a) for a in self._orders])
    bad = [a for a, b in zip(self._orders, self._budget) if b <= 0.0]
    if bad:
      raise ValueError(f'orders {bad} leave no RDP budget for target_epsilon={self._target!r} at '
                       f'delta={self._delta!r}; choose larger orders')
    self._spent = np.zeros(len(self._orders))
    self._ledger = accounting.Ledger('rdp')

  def _budget_at(self, order: float) -> float:
    """Largest ρ with compute_epsilon([order], [ρ], δ) ≤ target (checked with dp-accounting)."""
    budget = (self._target - math.log1p(-1.0 / order)
              + math.log(self._delta * order) / (order - 1.0))
    for _ in range(100):
      if budget <= 0.0:
        return budget
      if rdp_lib.compute_epsilon([order], [budget], self._delta)[0] <= self._target:
        return budget
      budget = np.nextafter(budget, -np.inf) - 1e-15 * abs(budget)
    return budget

  @classmethod
  def for_plan(cls, target_epsilon: float, delta: float,
               planned_runs: Iterable[tuple[accounting.StepSpec, int]]) -> 'RdpFilter':
    """Single-order filter at the ε-optimal RDP order of a planned (non-adaptive) run.

    If the plan itself meets the target (by RDP), the filter admits at least the planned steps.
    """
    delta = accounting.check_delta(delta)
    total = np.zeros(len(accounting.DEFAULT_RDP_ORDERS))
    for spec, count in planned_runs:
      spec, count = accounting.validate_run(spec, count, 'rdp')
      total += count * accounting.rdp_vector(spec)
    eps, order = rdp_lib.compute_epsilon(accounting.DEFAULT_RDP_ORDERS, total, delta)
    if not math.isfinite(eps):
      raise ValueError('the planned run has infinite ε (a step without noise?); no filter order '
                       'can be derived from it')
    return cls(target_epsilon, delta, float(order))

  @property
  def orders(self) -> tuple[float, ...]:
    return self._orders

  @property
  def budget(self) -> np.ndarray:
    """B(α) per order, fixed at construction."""
    return self._budget.copy()

  @property
  def spent(self) -> np.ndarray:
    """Σ ρ_t(α) of the admitted steps, per order."""
    return self._spent.copy()

  @property
  def ledger(self) -> accounting.Ledger:
    """A copy of the RDP ledger of admitted steps (provenance)."""
    return self._ledger.copy()

  def _cost(self, spec: accounting.StepSpec, count: int) -> np.ndarray:
    spec, count = accounting.validate_run(spec, count, 'rdp')
    if spec.truncation_probability > 0.0:
      raise ValueError(
          f'RdpFilter cannot admit truncated Poisson steps (truncated_batch_size='
          f'{spec.truncated_batch_size}, dataset_size={spec.dataset_size}): they have no RDP '
          'bound in dp-accounting. Use a batch size that cannot truncate.')
    return count * accounting.rdp_vector(spec, self._orders)

  def admit(self, spec: accounting.StepSpec, count: int = 1) -> bool:
    """True iff ``count`` more steps of ``spec`` keep every order within its budget."""
    after = self._spent + self._cost(spec, count)
    return bool(np.all(after <= self._budget))

  def spend(self, spec: accounting.StepSpec, count: int = 1) -> None:
    """Records the steps; raises ``BudgetExceededError`` (and records nothing) if not admitted."""
    cost = self._cost(spec, count)
    after = self._spent + cost
    if not np.all(after <= self._budget):
      raise BudgetExceededError(
          f'RdpFilter refuses {count} step(s) of {spec}: RDP at orders {self._orders} would be '
          f'{after.tolist()} > budget {self._budget.tolist()} (target ε={self._target}, '
          f'δ={self._delta})')
    self._spent = after
    self._ledger.record(spec, count)

  def epsilon_bound(self, delta: Optional[float] = None) -> float:
    """The guaranteed ε at ``delta`` (default: the filter's δ, giving ≤ target ε).

    It follows from the budgets B(α) fixed in advance, not from the realised spend: with adaptive
    choices only the filter's budget is a valid RDP statement.
    """
    d = self._delta if delta is None else accounting.check_delta(delta)
    return min(float(rdp_lib.compute_epsilon([a], [b], d)[0])
               for a, b in zip(self._orders, self._budget))

  def spent_epsilon(self, delta: Optional[float] = None) -> float:
    """ε converted from the realised spend (≤ ``epsilon_bound``; informative for adaptive runs)."""
    d = self._delta if delta is None else accounting.check_delta(delta)
    return min(float(rdp_lib.compute_epsilon([a], [r], d)[0])
               for a, r in zip(self._orders, self._spent))
