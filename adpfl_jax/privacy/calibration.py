"""Calibration: the noise scale of a planned run, by one path for training and ``adpfl account``.

A silo's planned run (``SiloPlan``) is public before training: the rounds it takes part in, the
local steps per round, the Poisson rate, the padded batch and the noise schedule σ_r = s · shape(r).
``calibrate`` returns the smallest scale s whose planned ledger has ε ≤ the target, searched by
``dp_accounting.calibrate_dp_mechanism`` over a ledger-backed accountant (``calibrate_scale``).
Training (``privacy/plan.py``) and ``adpfl account --target-epsilon`` both call it with the same
conventions, so they print the same σ for the same inputs:

* σ_r = float32(s) · float32(shape(r)), as the device computes it;
* non-constant σ is rounded DOWN onto a geometric grid (``NOISE_GRID``, relative resolution 1e-2
  for PLD, 2e-3 for RDP) in the ledger: few distinct σ keep accounting cheap, and a smaller
  accounted σ only over-reports ε (docs/privacy.md §3.2);
* the search runs at a coarse PLD discretisation (``COARSE_PLD`` = 1e-3; PLD's pessimistic
  estimate is still an upper bound, so the reported ε at the fine 1e-4 is at most this) and aims a
  hair below the target (``MARGIN``);
* the returned s is rounded UP to the next float32, so the noise the device adds is never below
  the calibrated one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Optional, Sequence

import attr
import dp_accounting
import numpy as np

from adpfl_jax.privacy import accounting
from adpfl_jax.privacy import schedules

COARSE_PLD = 1e-3
# Calibrate a hair below the target so float32 rounding of σ on the device cannot cross it.
MARGIN = 1 - 1e-5
# Relative resolution of the σ grid that ledgers of non-constant schedules round down onto.
NOISE_GRID = {'pld': 1e-2, 'rdp': 2e-3}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _PlanDpEvent(dp_accounting.DpEvent):
  """A planned run list, wrapped so ``calibrate_dp_mechanism`` can pass it to our accountant."""

  runs: tuple


class _LedgerAccountant(dp_accounting.PrivacyAccountant):
  """A ``PrivacyAccountant`` backed by ``Ledger`` (cached RDP vectors / PLDs)."""

  def __init__(self, accountant: str, pld_discretization: float,
               rdp_orders: Optional[Sequence[float]]):
    super().__init__(accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    self._book = accounting.Ledger(accountant, pld_discretization=pld_discretization, rdp_orders=rdp_orders)

  def _maybe_compose(self, event, count, do_compose):
    if isinstance(event, dp_accounting.NoOpDpEvent):
      return None
    if not isinstance(event, _PlanDpEvent):
      return self.CompositionErrorDetails(event, 'only planned run lists are supported')
    if do_compose:
      for spec, c in event.runs:
        self._book.record(spec, c * count)
    return None

  def get_epsilon(self, target_delta: float) -> float:
    return self._book.epsilon(target_delta)


def calibrate_scale(make_runs: Callable[[float], Iterable[tuple[accounting.StepSpec, int]]],
                    target_epsilon: float, delta: float, accountant: str = 'rdp', *,
                    pld_discretization: float = accounting.DEFAULT_PLD_DISCRETIZATION,
                    rdp_orders: Optional[Sequence[float]] = None,
                    initial_scale: float = 1.0,
                    initial_bracket: Optional[tuple[float, float]] = None,
                    rtol: float = 1e-6) -> float:
  """Smallest scale s whose planned ledger ``make_runs(s)`` has ε ≤ ``target_epsilon``.

  ``make_runs(s)`` returns the ``(StepSpec, count)`` runs of the planned run at scale s; ε must be
  non-increasing in s (e.g. σ_t = s · shape(t)). The search brackets s by doubling/halving from
  ``initial_scale`` and then calls ``dp_accounting.calibrate_dp_mechanism`` on the bracket, with
  an accountant backed by ``Ledger`` (so repeated specs reuse cached dp-accounting results).
  ``calibrate_dp_mechanism`` guarantees ε(s) ≤ target; this function re-checks it.

  Args:
    make_runs: scale -> planned runs.
    target_epsilon: ε budget, > 0.
    delta: δ in (0, 1).
    accountant: 'rdp' or 'pld'.
    pld_discretization: PLD discretisation interval.
    rdp_orders: RDP orders (default dp-accounting's).
    initial_scale: first scale tried.
    initial_bracket: optional (lo, hi) guess with ε(lo) > target ≥ ε(hi); widened if wrong.
    rtol: tolerance on s, relative to the lower end of the bracket.

  Returns:
    The scale s (a float > 0).
  """
  target_epsilon = accounting.check_target_epsilon(target_epsilon)
  delta = accounting.check_delta(delta)
  accountant = accounting.check_accountant(accountant)
  cache: dict[float, float] = {}

  def make_event(s: float) -> _PlanDpEvent:
    return _PlanDpEvent(accounting.merge_runs(make_runs(float(s))))

  def make_accountant() -> _LedgerAccountant:
    return _LedgerAccountant(accountant, pld_discretization, rdp_orders)

  def eps(s: float) -> float:
    if s not in cache:
      cache[s] = make_accountant().compose(make_event(s)).get_epsilon(delta)
    return cache[s]

  if initial_bracket is None:
    hi = accounting.as_float(initial_scale, 'initial_scale')
    lo = hi / 2.0
  else:
    lo, hi = (accounting.as_float(x, 'initial_bracket') for x in initial_bracket)
  if not (math.isfinite(hi) and math.isfinite(lo) and 0 < lo < hi):
    raise ValueError(f'initial_scale / initial_bracket must be finite, > 0 and increasing; got '
                     f'initial_scale={initial_scale!r}, initial_bracket={initial_bracket!r}')
  for _ in range(64):  # Widen upwards until ε(hi) ≤ target.
    if eps(hi) <= target_epsilon:
      break
    lo, hi = hi, 2.0 * hi
  else:
    raise ValueError(
        f'no scale up to {hi:g} reaches target_epsilon={target_epsilon!r} at delta={delta!r} '
        f'with accountant={accountant!r} (with truncated Poisson batches the RDP fallback needs '
        'P[a draw overflows] << delta / steps: use accountant=pld or a larger '
        'truncated_batch_size)')
  for _ in range(64):  # Widen downwards until ε(lo) > target.
    if eps(lo) > target_epsilon:
      break
    lo, hi = lo / 2.0, lo
  else:
    return hi  # Any positive scale meets the target (degenerate plan).
  scale = dp_accounting.calibrate_dp_mechanism(
      make_fresh_accountant=make_accountant, make_event_from_param=make_event,
      target_epsilon=target_epsilon, target_delta=delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=rtol * lo)
  scale = float(scale)
  if not eps(scale) <= target_epsilon:  # Never overshoot, whatever the search did.
    scale = hi
  return scale


@dataclasses.dataclass(frozen=True)
class SiloPlan:
  """The public plan of one silo's run: what its ledger will hold at a given noise scale.

  Attributes:
    sampling_rate: Poisson rate q = m / n.
    rounds: the rounds the silo takes part in (increasing).
    steps_per_round: local steps per round.
    schedule: noise schedule kind (``schedules.KINDS``).
    schedule_params: its validated parameters, as sorted ``(key, value)`` pairs.
    accountant: 'pld' or 'rdp'.
    mechanism: 'gaussian' or 'laplace'.
    truncated_batch_size: padded batch size B when a draw may overflow it (else None).
    dataset_size: the silo's record count n (with ``truncated_batch_size``).
    quantize: round σ down onto ``NOISE_GRID[accountant]`` (non-constant or data-driven σ).
  """

  sampling_rate: float
  rounds: tuple[int, ...]
  steps_per_round: int
  schedule: str = 'constant'
  schedule_params: tuple = ()
  accountant: str = 'pld'
  mechanism: str = 'gaussian'
  truncated_batch_size: Optional[int] = None
  dataset_size: Optional[int] = None
  quantize: bool = False

  def shape(self, round_: int) -> np.float32:
    fn = schedules.np_schedule(self.schedule, dict(self.schedule_params))
    return np.float32(fn(np.asarray([round_]))[0])

  def sigma(self, scale: float, round_: int) -> float:
    """The total noise multiplier of round ``round_`` at ``scale``, as the device computes it."""
    return float(np.float32(scale) * self.shape(round_))

  def spec(self, sigma: float) -> accounting.StepSpec:
    """The ledger entry of one step with total multiplier ``sigma`` (rounded down if quantized)."""
    if self.quantize and sigma > 0:
      sigma = accounting.quantize_noise(float(sigma), NOISE_GRID[self.accountant])
    return accounting.StepSpec(self.sampling_rate, float(sigma), self.mechanism,
                               self.truncated_batch_size, self.dataset_size)

  def runs(self, scale: float, start: int = 0, upto: Optional[int] = None) -> tuple:
    """Merged ``(spec, count)`` runs of the planned rounds in ``[start, upto)`` at ``scale``."""
    return accounting.merge_runs(
        (self.spec(self.sigma(scale, r)), self.steps_per_round) for r in self.rounds
        if r >= start and (upto is None or r < upto))


def calibrate(plan: SiloPlan, target_epsilon: float, delta: float, *, history: Sequence = (),
              start: int = 0) -> float:
  """The smallest float32 scale s with ε(history + planned rounds ≥ ``start`` at s) ≤ target.

  ``history`` holds ledger runs already spent (a resumed run recalibrating its remaining rounds).
  Returns 0 for a silo with no planned round.
  """
  if not any(r >= start for r in plan.rounds):
    return 0.0
  scale = calibrate_scale(lambda s: list(history) + list(plan.runs(s, start)),
                          target_epsilon * MARGIN, delta, plan.accountant,
                          pld_discretization=COARSE_PLD)
  return float(np.nextafter(np.float32(scale), np.float32(np.inf)))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float,
                               steps: int, accountant: str = 'pld',
                               mechanism: str = 'gaussian', **plan_kwargs: Any) -> float:
  """Constant σ for ``steps`` Poisson-sampled steps: ``calibrate`` of a one-step-per-round plan."""
  steps = accounting.as_int(steps, 'steps', 1)
  plan = SiloPlan(accounting.check_sampling_rate(sampling_rate), tuple(range(steps)), 1,
                  accountant=accounting.check_accountant(accountant), mechanism=mechanism,
                  **plan_kwargs)
  return calibrate(plan, accounting.check_target_epsilon(target_epsilon),
                   accounting.check_delta(delta))
