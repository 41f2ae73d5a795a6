"""The privacy plan: binds sampling, clipping, noise and accounting, and states the guarantee.

Guarantee: record-level (ε, δ)-DP for every silo separately, under add/remove-one of a record of
that silo, for the whole training run. Each local step of silo k is one sampled Gaussian (or
Laplace) mechanism: Poisson sampling at rate q_k = m / n_k (truncated to the padded batch size
when a draw overflows it, and then accounted as truncated Poisson sampling), the clipped sum with
sensitivity C, and noise of multiplier z (the *total* multiplier, including the adaptive clipping
count or percentile histogram, see ``controller.py``). Everything the round releases is a
post-processing of these per-silo mechanisms: aggregation weights use public sizes, clip updates
use noised counts, and the noise schedule is a public function of the round.

The plan lives on the host: calibration (``calibrate_dp_mechanism`` through ``accounting``),
the per-silo ledgers, and the budget stop. Calibration, the budget stop and ε during training use
a coarse PLD discretisation (1e-3; PLD's pessimistic estimate is still an upper bound, so the
calibrated σ is at most slightly larger than needed); the final summary uses the fine default.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from adpfl_jax.federated import sampling
from adpfl_jax.privacy import accounting
from adpfl_jax.privacy import schedules

class _QuietRdpSeries(logging.Filter):
  """dp-accounting logs every fractional RDP order it drops (a conservative exclusion) — often
  hundreds of lines per run at small σ (privacy.md §2.10); keep one line per process instead."""

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

_COARSE_PLD = 1e-3
# Calibrate a hair below the target so float32 rounding of σ on the device cannot cross it.
_CALIBRATION_MARGIN = 1 - 1e-5
# Relative resolution of the σ grid that ledgers of non-constant schedules round down onto.
_QUANT = {'pld': 1e-2, 'rdp': 2e-3, 'none': 1e-2}


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
  while b < n and accounting.StepSpec(q, 1.0, 'gaussian', b, n).truncation_probability > budget:
    b += max(1, int(sd // 4))
  return min(b, n)


class PrivacyPlan:
  """Host-side privacy state of a run: one ledger per silo plus the planned schedule."""

  def __init__(self, *, private: bool, sizes, rates, max_batch: int, mechanism: str,
               accountant: str, delta: float, target_epsilon: float, noise_scale,
               schedule: str, schedule_params: dict, unit: str, stop_at_budget: bool,
               planned_steps, valid_guarantee: bool = True):
    self.private = private
    self.sizes = np.asarray(sizes)
    self.rates = np.asarray(rates, np.float64)
    self.max_batch = int(max_batch)
    self.mechanism = mechanism
    self.accountant = accountant if private else 'none'
    self.delta = float(delta)
    self.target_epsilon = float(target_epsilon)
    self.noise_scale = np.asarray(noise_scale, np.float64)
    self.schedule = schedule
    self.schedule_params = dict(schedule_params)
    self._shape = schedules.np_schedule(schedule, self.schedule_params)
    self.unit = unit
    self.stop_at_budget = stop_at_budget
    self.planned_steps = np.asarray(planned_steps)
    self.valid_guarantee = valid_guarantee
    k = len(self.sizes)
    self.ledgers = [accounting.Ledger(accountant=accountant) for _ in range(k)] if private else []
    self._eps_cache: dict = {}
    self._last_noise = [0.0] * k
    self._off_plan = False
    self._rounds_recorded = 0
    self._limits = np.full(k, np.inf)
    self.adaptive = False
    self.filters = []
    self.quantize = schedule != 'constant'

  # ------------------------------------------------------------------------------------------
  @classmethod
  def from_config(cls, config, sizes) -> 'PrivacyPlan':
    p = config.privacy
    sizes = np.asarray(sizes)
    private = p.mode == 'dp'
    m = float(p.batch_size)
    rates = np.minimum(1.0, m / sizes.astype(np.float64))
    k = len(sizes)
    rounds = int(config.fed.rounds)
    steps = int(config.fed.local_steps)
    participation = np.zeros((rounds, k), bool)
    for r in range(rounds):
      participation[r, sampling.participating_clients(
          int(config.seed), r, k, int(config.fed.clients_per_round))] = True
    planned_steps = participation.sum(0) * steps
    adaptive = private and bool(p.adaptive_noise.enabled)
    if adaptive or (private and p.mechanism == 'laplace'):
      # The RDP filter and the Laplace events need batches that can never be truncated.
      max_batch = int(sizes.max())
    elif private and p.accountant == 'rdp':
      max_batch = max(_rdp_batch_size(int(n), float(q), int(t), p.target_epsilon, p.delta)
                      for n, q, t in zip(sizes, rates, planned_steps))
    else:
      max_batch = max(sampling.max_batch_size(int(n), float(q), float(p.max_batch_sigmas))
                      for n, q in zip(sizes, rates))
    schedule = p.noise_schedule
    params = schedule_params(schedule, dict(p.noise_schedule_params), rounds)
    plan = cls(private=private, sizes=sizes, rates=rates, max_batch=max_batch,
               mechanism=p.mechanism, accountant=p.accountant, delta=p.delta,
               target_epsilon=p.target_epsilon, noise_scale=np.zeros(k), schedule=schedule,
               schedule_params=params, unit=p.unit, stop_at_budget=bool(p.stop_at_budget),
               planned_steps=planned_steps)
    plan.participation = participation
    plan.local_steps = steps
    plan.adaptive = adaptive
    plan.quantize = plan.quantize or adaptive
    if not private:
      return plan
    if not p.calibrate:
      plan.noise_scale = np.full(k, float(p.noise_multiplier))
    else:
      plan.noise_scale = plan._calibrate()
    # The device computes z in float32; round the scale up so the noise is never below plan.
    plan.noise_scale = np.array([np.nextafter(np.float32(s), np.float32(np.inf))
                                 for s in plan.noise_scale], np.float64)
    plan._limits = plan._round_limits()
    if adaptive:
      # σ will depend on privatized data: a Rényi filter per silo, its budget fixed now.
      plan.filters = [accounting.RdpFilter.for_plan(
          plan.target_epsilon, plan.delta, plan._planned_specs(k, plan.noise_scale[k]))
                      for k in range(k)]
    return plan

  # ------------------------------------------------------------------------------------------
  def spec(self, k: int, z: float) -> accounting.StepSpec:
    """The ledger entry of one local step of silo ``k`` with total noise multiplier ``z``."""
    n = int(self.sizes[k])
    truncated = self.max_batch < n
    if self.quantize and z > 0:
      # Many distinct σ (a schedule) would make every ledger query slow; rounding the accounted
      # σ DOWN onto a fine geometric grid keeps it cheap and only ever over-reports ε.
      z = accounting.quantize_noise(float(z), _QUANT[self.accountant])
    return accounting.StepSpec(
        sampling_rate=float(self.rates[k]), noise_multiplier=float(z), mechanism=self.mechanism,
        truncated_batch_size=self.max_batch if truncated else None,
        dataset_size=n if truncated else None)

  def _client_rounds(self, k):
    return np.flatnonzero(self.participation[:, k])

  def _planned_specs(self, k, scale, upto=None):
    """(spec, count) runs of silo k's planned ledger over rounds < upto."""
    runs = []
    for r in self._client_rounds(k):
      if upto is not None and r >= upto:
        break
      z = float(np.float32(scale) * np.float32(self._shape(np.asarray([r]))[0]))
      spec = self.spec(k, z)
      if runs and runs[-1][0] == spec:
        runs[-1] = (spec, runs[-1][1] + self.local_steps)
      else:
        runs.append((spec, self.local_steps))
    return runs

  def _epsilon_of(self, runs, discretization=_COARSE_PLD):
    key = (tuple(runs), discretization)
    if key not in self._eps_cache:
      ledger = accounting.Ledger(accountant=self.accountant, pld_discretization=discretization)
      for spec, count in runs:
        ledger.record(spec, count)
      self._eps_cache[key] = ledger.epsilon(self.delta)
    return self._eps_cache[key]

  def _calibrate(self):
    """Per-silo noise scale: the smallest s whose planned ledger has ε ≤ target."""
    out = np.zeros(len(self.sizes))
    cache = {}
    for k in range(len(self.sizes)):
      rounds = tuple(self._client_rounds(k))
      key = (float(self.rates[k]), int(self.sizes[k]), rounds)
      if key not in cache:
        if not rounds:
          cache[key] = 0.0
          continue
        cache[key] = accounting.calibrate_scale(
            lambda s, k=k: self._planned_specs(k, s), self.target_epsilon * _CALIBRATION_MARGIN,
            self.delta, self.accountant, pld_discretization=_COARSE_PLD)
      out[k] = cache[key]
    return out

  def _round_limits(self):
    """For each silo, the first planned round whose steps would exceed the target (or inf)."""
    limits = np.full(len(self.sizes), np.inf)
    for k in range(len(self.sizes)):
      rounds = self._client_rounds(k)
      if not len(rounds):
        continue
      if self._epsilon_of(self._planned_specs(k, self.noise_scale[k])) <= self.target_epsilon:
        continue
      lo, hi = 0, len(rounds)  # rounds[:lo] fit; rounds[:hi] do not
      while hi - lo > 1:
        mid = (lo + hi) // 2
        upto = int(rounds[mid - 1]) + 1
        if self._epsilon_of(self._planned_specs(k, self.noise_scale[k], upto)) \
            <= self.target_epsilon:
          lo = mid
        else:
          hi = mid
      limits[k] = rounds[lo] if lo < len(rounds) else np.inf
    return limits

  def first_exceeding_silo(self):
    """A silo whose very first planned round already exceeds the target (or None)."""
    if not self.private or not self.stop_at_budget:
      return None
    for k in range(len(self.sizes)):
      rounds = self._client_rounds(k)
      if len(rounds) and self._limits[k] <= rounds[0]:
        return k
    return None

  # ------------------------------------------------------------------------------------------
  def planned_noise(self, round_: int, clients) -> np.ndarray:
    shape = np.float32(self._shape(np.asarray([round_]))[0])
    return np.array([float(np.float32(self.noise_scale[k]) * shape) for k in clients])

  def would_exceed(self, round_: int, clients, z_next):
    """Silo that round ``round_`` would take past the target (None if none, or no budget stop).

    While the run follows its public plan, the first exceeding round of every silo was computed
    up front (``_round_limits``); off plan (noise that differs from the planned schedule) the
    candidate ledger is evaluated directly.
    """
    if not self.private or not self.stop_at_budget:
      return None
    for k, z in zip(clients, z_next):
      k = int(k)
      if z <= 0:
        return k
      if self.adaptive:
        if not self.filters[k].admit(self.spec(k, float(z)), self.local_steps):
          return k
        continue
      if not self._off_plan:
        if round_ >= self._limits[k]:
          return k
        continue
      runs = list(self.ledgers[k].runs) + [(self.spec(k, float(z)), self.local_steps)]
      if self._epsilon_of(tuple(runs)) > self.target_epsilon:
        return k
    return None

  def record_round(self, clients, z_used, steps: int, steps_per_client=None):
    """Charges every participating silo for the steps it ran with the noise it used."""
    for i, k in enumerate(clients):
      k = int(k)
      s = steps if steps_per_client is None else int(steps_per_client[i])
      self._last_noise[k] = float(z_used[i])
      if self.private and s > 0:
        self.ledgers[k].record(self.spec(k, float(z_used[i])), s)
        if self.adaptive:
          self.filters[k].spend(self.spec(k, float(z_used[i])), s)
    if self.private:
      planned = self.planned_noise(self._rounds_recorded, clients)
      if not np.allclose(planned, np.asarray(z_used, np.float64), rtol=1e-6, atol=0):
        self._off_plan = True
      if steps_per_client is not None and np.any(np.asarray(steps_per_client) != steps):
        self._off_plan = True
    self._rounds_recorded += 1

  def epsilons(self, final: bool = False) -> np.ndarray:
    if not self.private:
      return np.full(len(self.sizes), np.inf)
    if self.adaptive:
      # With data-dependent σ only the filter's pre-set budget is a valid statement.
      return np.array([f.epsilon_bound() if f.ledger.steps else 0.0 for f in self.filters])
    disc = None if final else _COARSE_PLD
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
        'off_plan': self._off_plan,
        'rounds_recorded': self._rounds_recorded,
    }

  def load_host_state(self, host: dict) -> None:
    if self.private:
      self.ledgers = [accounting.Ledger.from_dict(d) for d in host['ledgers']]
      for f, d in zip(self.filters, host['filters']):
        for spec, count in accounting.Ledger.from_dict(d).runs:
          f.spend(spec, count)  # replaying the admitted steps rebuilds the filter exactly
    self._last_noise = [float(z) for z in host['last_noise']]
    self._off_plan = bool(host['off_plan'])
    self._rounds_recorded = int(host['rounds_recorded'])

  def current_noise(self):
    return [float(z) for z in self._last_noise]

  def ledgers_json(self):
    return [json_ledger for json_ledger in (l.to_json() for l in self.ledgers)]

  def print_header(self, names, rounds: int):
    if not self.private:
      print(f'NP-FL: no clipping, no noise, no privacy guarantee (ε = ∞). {rounds} rounds.')
      return
    print(f'Record-level DP per silo (unit: {self.unit}), target ε = {self.target_epsilon} at '
          f'δ = {self.delta:g}, accountant {self.accountant}, {self.mechanism} noise, '
          f'{self.schedule} schedule:')
    for k, name in enumerate(names):
      trunc = (f', truncated at {self.max_batch}' if self.max_batch < self.sizes[k] else '')
      print(f'  {name}: n = {self.sizes[k]}, q = {self.rates[k]:.4f} (expected batch '
            f'{self.rates[k] * self.sizes[k]:.1f}{trunc}), {self.planned_steps[k]} planned '
            f'steps, noise multiplier scale {self.noise_scale[k]:.4f}')
    if not math.isinf(float(np.min(self._limits))):
      print(f'  budget stop planned before round {int(np.min(self._limits))}')


def schedule_params(kind: str, params, rounds: int) -> dict:
  """The parameters of schedule ``kind`` from a config section holding every kind's keys.

  ``rounds`` = 0 in the config means the run's ``fed.rounds``.
  """
  wanted = {'constant': (), 'exponential': ('rate',), 'step': ('factor', 'every'),
            'linear': ('start', 'end', 'rounds'), 'cosine': ('start', 'end', 'rounds')}
  if kind not in wanted:
    raise ValueError(f'schedule {kind!r} is not one of {tuple(wanted)}')
  out = {k: params[k] for k in wanted[kind] if k in params}
  if 'rounds' in wanted[kind] and not out.get('rounds'):
    out['rounds'] = rounds
  return schedules.validate_params(kind, out, rounds)
