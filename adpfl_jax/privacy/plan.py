"""The privacy plan: binds sampling, clipping, noise and accounting, and states the guarantee.

Guarantee: record-level (ε, δ)-DP for every silo separately, under add/remove-one of a record of
that silo, for the whole training run. Each local step of silo k is one sampled Gaussian (or
Laplace) mechanism: Poisson sampling at rate q_k = m / n_k (truncated to the padded batch size
when a draw overflows it, and then accounted as truncated Poisson sampling), the clipped sum with
sensitivity C, and noise of multiplier z (the *total* multiplier, including the adaptive clipping
count or percentile histogram, see ``controller.py``). Everything the round releases is a
post-processing of these per-silo mechanisms: aggregation weights use public sizes, clip updates
use noised counts, and the noise schedule is a public function of the round.

The plan lives on the host: one public ``calibration.SiloPlan`` per silo (its rounds, steps,
rate, padded batch and schedule), the calibrated noise scale (``calibration.calibrate``, the same
path ``adpfl account`` uses), the per-silo ledgers, Rényi filters for data-driven noise, and the
budget stop. The budget stop and ε during training use the coarse PLD discretisation of the
calibration (an upper bound); the final summary uses the fine default.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from adpfl_jax.privacy import accounting
from adpfl_jax.privacy import calibration
from adpfl_jax.privacy import filters
from adpfl_jax.privacy import schedules

PRIVACY_MODES = ('dp', 'none')  # record-level DP-SGD in every silo | NP-FL
UNITS = ('example', 'patient', 'lesion')

class _QuietRdpSeries(logging.Filter):
  """dp-accounting logs every fractional RDP order it drops (a conservative exclusion) — often
  hundreds of lines per run at small σ (docs/privacy.md §2.6); keep one line per process instead."""

  seen = False

  def filter(self, record):
    if '_compute_log_a_frac failed to converge' not in record.getMessage():
      return True
    if _QuietRdpSeries.seen:
      return False
    _QuietRdpSeries.seen = True
    record.msg = ('dp-accounting excluded some low fractional RDP orders that did not converge '
                  '(conservative; further notices suppressed)')
    record.args = ()
    return True


logging.getLogger('absl').addFilter(_QuietRdpSeries())

def max_batch_size(n: int, q: float, sigmas: float = 4.0) -> int:
  """Slots of the padded Poisson batch for a client of ``n`` examples sampled at rate ``q``.

  ``ceil(m + sigmas·sd)`` with m = q·n and sd = √(n·q·(1 − q)), and at most ``n + 1``: that many
  slots hold every draw of the client *and* of its add-one neighbour (n + 1 records), so nothing
  can be truncated and the ledger accounts plain Poisson sampling (``sigmas=inf`` always gives
  ``n + 1``). A size of exactly n would still truncate the neighbour's draws (accounted, but
  costly when q is large).
  """
  if not math.isfinite(sigmas):
    return int(n) + 1
  m = n * q
  size = math.ceil(m + sigmas * math.sqrt(n * q * (1.0 - q)))
  return int(n) + 1 if size >= n else max(1, size)


def _rdp_batch_size(n: int, q: float, steps: int, target_epsilon: float, delta: float) -> int:
  """Padded batch size for the RDP accountant, which has no truncated-Poisson event.

  The RDP ledger charges truncation through total variation: over T steps, truncation at B
  changes the output distribution by at most T·η with η = P[Binomial(n + 1, q) > B], which
  costs T·η·(1 + e^ε) of δ. B is the smallest size that keeps this below δ/1000 for the planned
  steps at the target ε, so the reported ε is essentially that of untruncated Poisson sampling.
  """
  budget = delta * 1e-3 / max(steps, 1) / (1.0 + math.exp(min(target_epsilon, 700.0)))
  m = n * q
  sd = math.sqrt(max(n * q * (1 - q), 1e-12))
  b = max(1, math.ceil(m))
  while b <= n and accounting.StepSpec(q, 1.0, 'gaussian', b, n).truncation_probability > budget:
    b += max(1, int(sd // 4))
  return min(b, n + 1)  # n + 1 slots: not even the add-one neighbour can truncate


class PrivacyPlan:
  """Host-side privacy state of a run: the public plan of every silo, its ledger, the budget stop.

  Build it with ``from_config``. Attributes: ``silos`` (one ``calibration.SiloPlan`` per silo),
  ``noise_scale`` (K,) the calibrated scale s_k (σ_k(r) = s_k · shape(r)), ``ledgers`` (one
  ``accounting.Ledger`` per silo), ``filters`` (Rényi filters when σ is data-driven).
  """

  def __init__(self, *, private: bool, sizes, rates, max_batch: int, mechanism: str,
               accountant: str, delta: float, target_epsilon: float, schedule: str,
               schedule_params: dict, unit: str, stop_at_budget: bool, local_steps: int,
               participation: np.ndarray, adaptive: bool):
    k = len(sizes)
    self.private = private
    self.sizes = np.asarray(sizes)
    self.rates = np.asarray(rates, np.float64)
    self.max_batch = int(max_batch)
    self.mechanism = mechanism
    self.accountant = accountant if private else 'none'
    self.delta = float(delta)
    self.target_epsilon = float(target_epsilon)
    self.schedule = schedule
    self.schedule_params = dict(schedule_params)
    self.unit = unit
    self.stop_at_budget = stop_at_budget
    self.local_steps = int(local_steps)
    self.participation = np.asarray(participation, bool)  # (rounds, K)
    self.planned_steps = self.participation.sum(0) * self.local_steps
    self.adaptive = adaptive
    self.valid_guarantee = True
    self.silos = [self._silo_plan(i) for i in range(k)]
    self.noise_scale = np.zeros(k)
    self.ledgers = [accounting.Ledger(accountant=accountant) for _ in range(k)] if private else []
    self.filters = []
    self._eps_cache: dict = {}
    self._last_noise = [0.0] * k
    self._on_plan = np.ones(k, bool)  # silo k's ledger equals its planned prefix
    self._limits = np.full(k, np.inf)

  def _silo_plan(self, k: int) -> calibration.SiloPlan:
    n = int(self.sizes[k])
    truncated = self.max_batch <= n  # the add-one neighbour (n + 1 records) may overflow
    return calibration.SiloPlan(
        sampling_rate=float(self.rates[k]),
        rounds=tuple(int(r) for r in np.flatnonzero(self.participation[:, k])),
        steps_per_round=self.local_steps, schedule=self.schedule,
        schedule_params=tuple(sorted(self.schedule_params.items())),
        accountant=self.accountant if self.private else 'pld', mechanism=self.mechanism,
        truncated_batch_size=self.max_batch if truncated else None,
        dataset_size=n if truncated else None,
        quantize=self.schedule != 'constant' or self.adaptive)

  # ------------------------------------------------------------------------------------------
  @classmethod
  def from_config(cls, config, sizes, participation) -> 'PrivacyPlan':
    """The plan of ``config`` for silos of ``sizes`` taking part in rounds per ``participation``
    ((rounds, K) bool, public: ``federated.sampling.participation``)."""
    p = config.privacy
    sizes = np.asarray(sizes)
    private = p.mode == 'dp'
    rates = np.minimum(1.0, float(p.batch_size) / sizes.astype(np.float64))
    steps = int(config.fed.local_steps)
    participation = np.asarray(participation, bool)
    adaptive = private and bool(p.adaptive_noise.enabled)
    if adaptive or (private and p.mechanism == 'laplace'):
      # The RDP filter and the Laplace events need batches that can never be truncated, not
      # even for the add-one neighbour of the largest silo.
      max_batch = int(sizes.max()) + 1
    elif private and p.accountant == 'rdp':
      max_batch = max(_rdp_batch_size(int(n), float(q), int(t), p.target_epsilon, p.delta)
                      for n, q, t in zip(sizes, rates, participation.sum(0) * steps))
    else:
      max_batch = max(max_batch_size(int(n), float(q), float(p.max_batch_sigmas))
                      for n, q in zip(sizes, rates))
    plan = cls(private=private, sizes=sizes, rates=rates, max_batch=max_batch,
               mechanism=p.mechanism, accountant=p.accountant, delta=p.delta,
               target_epsilon=p.target_epsilon, schedule=p.noise_schedule,
               schedule_params=schedules.params_from_config(
                   p.noise_schedule, p.noise_schedule_params, int(config.fed.rounds)),
               unit=p.unit, stop_at_budget=bool(p.stop_at_budget), local_steps=steps,
               participation=participation, adaptive=adaptive)
    if not private:
      return plan
    if p.calibrate:
      cache: dict = {}
      for i, silo in enumerate(plan.silos):
        if silo not in cache:
          t0 = time.time()
          cache[silo] = calibration.calibrate(silo, plan.target_epsilon, plan.delta)
          if config.log.progress:
            print(f'  calibrated the noise of silo {i} (q = {silo.sampling_rate:.4g}, '
                  f'{len(silo.rounds) * silo.steps_per_round} steps, {plan.accountant}): scale '
                  f'{cache[silo]:.4f} for ε = {plan.target_epsilon:g} [{time.time() - t0:.1f} s]',
                  flush=True)
        plan.noise_scale[i] = cache[silo]
    else:
      # The device computes z in float32; round the scale up so the noise is never below plan.
      plan.noise_scale[:] = float(np.nextafter(np.float32(p.noise_multiplier),
                                               np.float32(np.inf)))
    plan._limits = plan._round_limits()
    if adaptive:
      # σ will depend on privatized data: a Rényi filter per silo, its budget fixed now.
      plan.filters = [filters.RdpFilter.for_plan(plan.target_epsilon, plan.delta,
                                                 silo.runs(plan.noise_scale[i]))
                      for i, silo in enumerate(plan.silos)]
    return plan

  # ------------------------------------------------------------------------------------------
  def spec(self, k: int, z: float) -> accounting.StepSpec:
    """The ledger entry of one local step of silo ``k`` with total noise multiplier ``z``."""
    return self.silos[k].spec(float(z))

  def _epsilon_of(self, runs, discretization=calibration.COARSE_PLD):
    key = (tuple(runs), discretization)
    if key not in self._eps_cache:
      ledger = accounting.Ledger(accountant=self.accountant, pld_discretization=discretization)
      ledger.extend(runs)
      self._eps_cache[key] = ledger.epsilon(self.delta)
    return self._eps_cache[key]

  def _round_limits(self):
    """For each silo, the first planned round whose steps would exceed the target (or inf)."""
    limits = np.full(len(self.sizes), np.inf)
    for k, silo in enumerate(self.silos):
      rounds, scale = silo.rounds, self.noise_scale[k]
      if not rounds or self._epsilon_of(silo.runs(scale)) <= self.target_epsilon:
        continue
      lo, hi = 0, len(rounds)  # rounds[:lo] fit; rounds[:hi] do not
      while hi - lo > 1:
        mid = (lo + hi) // 2
        if self._epsilon_of(silo.runs(scale, upto=rounds[mid - 1] + 1)) <= self.target_epsilon:
          lo = mid
        else:
          hi = mid
      limits[k] = rounds[lo] if lo < len(rounds) else np.inf
    return limits

  def first_exceeding_silo(self):
    """A silo whose very first planned round already exceeds the target (or None)."""
    if not self.private or not self.stop_at_budget:
      return None
    for k, silo in enumerate(self.silos):
      if silo.rounds and self._limits[k] <= silo.rounds[0]:
        return k
    return None

  # ------------------------------------------------------------------------------------------
  def planned_noise(self, round_: int, clients) -> np.ndarray:
    return np.array([self.silos[int(k)].sigma(self.noise_scale[int(k)], round_)
                     for k in clients])

  def would_exceed(self, round_: int, clients, z_next, steps) -> int | None:
    """Silo that round ``round_`` would take past the target (None if none, or no budget stop).

    Judges the step that will actually run — its total noise multiplier ``z_next`` (from the
    controller state the round will use) and its step count ``steps`` (per client, or one int) —
    against the silo's ledger. The fast path (the first exceeding round of every silo computed up
    front by ``_round_limits``) is taken only when both the silo's ledger so far and this step are
    exactly the planned ones; otherwise the candidate ledger is evaluated directly, so no plan
    assumption (e.g. a schedule recalibrated on a forced resume) can let a step through.
    """
    if not self.private or not self.stop_at_budget:
      return None
    steps = np.broadcast_to(np.asarray(steps, np.int64), (len(clients),))
    planned = self.planned_noise(round_, clients)
    for k, z, s, zp in zip(clients, z_next, steps, planned):
      k, z, s = int(k), float(z), int(s)
      if s == 0:
        continue  # a dropped client runs nothing and is charged nothing
      if z <= 0:
        return k
      spec = self.spec(k, z)
      if self.adaptive:
        if not self.filters[k].admit(spec, s):
          return k
        continue
      if self._on_plan[k] and s == self.local_steps and np.float32(z) == np.float32(zp):
        if round_ >= self._limits[k]:
          return k
        continue
      if self._epsilon_of(tuple(self.ledgers[k].runs) + ((spec, s),)) > self.target_epsilon:
        return k
    return None

  def record_round(self, round_: int, clients, z_used, steps) -> None:
    """Charges every participating silo for the steps it ran with the noise it used."""
    steps = np.broadcast_to(np.asarray(steps, np.int64), (len(clients),))
    planned = self.planned_noise(round_, clients)
    for k, z, s, zp in zip(clients, z_used, steps, planned):
      k, z, s = int(k), float(z), int(s)
      self._last_noise[k] = z
      if not self.private:
        continue
      if s != self.local_steps or np.float32(z) != np.float32(zp):
        self._on_plan[k] = False  # the ledger no longer equals the planned prefix
      if s > 0:
        self.ledgers[k].record(self.spec(k, z), s)
        if self.adaptive:
          self.filters[k].spend(self.spec(k, z), s)

  def epsilons(self, final: bool = False) -> np.ndarray:
    if not self.private:
      return np.full(len(self.sizes), np.inf)
    if self.adaptive:
      # With data-dependent σ only the filter's pre-set budget is a valid statement.
      return np.array([f.epsilon_bound() if f.ledger.steps else 0.0 for f in self.filters])
    disc = None if final else calibration.COARSE_PLD
    out = []
    for ledger in self.ledgers:
      runs = tuple(ledger.runs)
      out.append(0.0 if not runs else self._epsilon_of(runs, disc or 1e-4))
    return np.asarray(out)

  def spent_epsilons(self) -> np.ndarray | None:
    """Adaptive runs: ε converted from the realised RDP spend (informative, ≤ the bound)."""
    if not self.adaptive:
      return None
    return np.array([f.spent_epsilon() for f in self.filters])

  def host_state(self) -> dict:
    """Everything a resumed run needs: the full ledgers (not only ε) and the bookkeeping."""
    return {
        'ledgers': [l.to_dict() for l in self.ledgers],
        'filters': [f.ledger.to_dict() for f in self.filters],
        'last_noise': list(self._last_noise),
    }

  def load_host_state(self, host: dict, round_: int, state_scale, *,
                      same_config: bool = True) -> np.ndarray:
    """Restores the ledgers of a checkpoint taken before round ``round_``; returns the scales.

    ``state_scale`` (K,) is the noise scale held by the checkpoint's controller state.

    * ``same_config`` (a plain resume): the run continues exactly as if never interrupted, with
      the checkpoint's scales. Silos whose ledger is not the planned prefix (faults) are judged by
      direct evaluation of their ledger from now on.
    * otherwise (a forced resume with another budget, length or schedule): the scale of every silo
      whose ledger or scale is not what this plan would have produced is recalibrated so that its
      ledger so far plus its remaining planned rounds land on the target. A silo whose ledger
      already leaves no budget refuses the resume (``ValueError`` naming
      ``privacy.target_epsilon``).

    The returned scales must be written into the controller state before the next round.
    """
    self._last_noise = [float(z) for z in host['last_noise']]
    state_scale = np.asarray(state_scale, np.float64)
    if not self.private:
      return state_scale
    self.ledgers = [accounting.Ledger.from_dict(d) for d in host['ledgers']]
    if self.adaptive:
      for k, (f, d) in enumerate(zip(self.filters, host['filters'])):
        for spec, count in accounting.Ledger.from_dict(d).runs:
          if not f.admit(spec, count):
            raise ValueError(
                f'config.privacy.target_epsilon={self.target_epsilon}: silo {k} of the checkpoint '
                f'has already spent more than the Rényi filter of this target admits; resume '
                'with the original target or start a new run')
          f.spend(spec, count)  # replaying the admitted steps rebuilds the filter exactly
      self._on_plan[:] = False
      return state_scale
    scales = state_scale.copy()
    for k in range(len(self.sizes)):
      history = self.ledgers[k].runs
      planned = np.float32(state_scale[k]) == np.float32(self.noise_scale[k]) and (
          history == self.silos[k].runs(self.noise_scale[k], upto=round_))
      self._on_plan[k] = planned
      if planned or same_config:
        continue
      remaining = [r for r in self.silos[k].rounds if r >= round_]
      spent = self._epsilon_of(history) if history else 0.0
      if spent > self.target_epsilon:
        raise ValueError(
            f'config.privacy.target_epsilon={self.target_epsilon}: the checkpoint resumed at '
            f'round {round_} has already spent ε={spent:.4f} of silo {k}, above this target; '
            'resume with its own target or use another --workdir')
      if not remaining:
        continue
      if spent >= self.target_epsilon * (1 - 1e-3):
        raise ValueError(
            f'config.privacy.target_epsilon={self.target_epsilon}: the checkpoint resumed at '
            f'round {round_} has already spent ε={spent:.4f} of silo {k}, leaving nothing for its '
            f'{len(remaining)} remaining planned rounds; raise the target or keep fed.rounds')
      scales[k] = calibration.calibrate(self.silos[k], self.target_epsilon, self.delta,
                                        history=history, start=round_)
    if not same_config:
      self.noise_scale = scales
    return scales

  def current_noise(self):
    return [float(z) for z in self._last_noise]

  def ledgers_json(self) -> list[dict]:
    """Every silo's ledger as a plain JSON object (``Ledger.to_dict``), in silo order."""
    return [l.to_dict() for l in self.ledgers]

  def print_header(self, names, rounds: int):
    if not self.private:
      print(f'NP-FL: no clipping, no noise, no privacy guarantee (ε = ∞). {rounds} rounds.')
      return
    print(f'Record-level DP per silo (unit: {self.unit}), target ε = {self.target_epsilon} at '
          f'δ = {self.delta:g}, accountant {self.accountant}, {self.mechanism} noise, '
          f'{self.schedule} schedule:')
    for k, name in enumerate(names):
      trunc = (f', truncated at {self.max_batch}' if self.max_batch <= self.sizes[k] else '')
      print(f'  {name}: n = {self.sizes[k]}, q = {self.rates[k]:.4f} (expected batch '
            f'{self.rates[k] * self.sizes[k]:.1f}{trunc}), {self.planned_steps[k]} planned '
            f'steps, noise multiplier scale {self.noise_scale[k]:.4f}')
    if not math.isinf(float(np.min(self._limits))):
      print(f'  budget stop planned before round {int(np.min(self._limits))}')
