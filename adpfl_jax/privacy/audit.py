"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023), per silo.

An accounted ε is an upper bound on what any attack can learn about one record. The audit runs an
attack and turns its success into a *lower* bound ε_lb at a chosen confidence: a correct
implementation always has ε_lb ≤ ε (up to the audit's failure probability, the significance); a
lower bound above the accounted ε proves the implementation or the accounting wrong.

Canaries (gradient space, the strongest white-box choice here because every client update is
released each round). Each silo k gets ``m`` canaries; canary j is a record whose clipped gradient is
always ``C · e_{i_j}`` — the largest contribution a record may make (norm C), on its own public
coordinate i_j of the flat parameter vector. Each canary is included in the silo's data with
probability ½, by secret randomness drawn once per run (a pure function of the run's identity, never
of the data). An included canary is Poisson-sampled like every record (rate q, fresh for each local
step) and its gradient is added to the clipped sum *before* the noise, so it is protected exactly
like a real record: the run is (ε, δ)-DP with respect to each canary's presence, with the ε of the
silo's ledger (canaries are never truncated, and untruncated Poisson sampling costs at most what
the ledger charges for the truncated sampler). Canaries enter the gradient release only (not the
auxiliary counts): their sensitivity on the combined query stays within C.

Scores. The auditor sees what the silo releases — its update Δ_k at every round it takes part in —
and scores canary j by ``Σ_rounds −Δ_k[i_j]`` (an included canary pushes its coordinate down
through SGD). Higher scores mean "included". The one-run bound of Steinke et al. (guess "in" for
the canaries above a threshold, count correct guesses, reject every ε whose p-value is below the
significance; Bonferroni over thresholds) is computed by ``jax_privacy.auditing.CanaryScoreAuditor``
(``epsilon_one_run``), not re-implemented here.

Everything on the host is a pure function of ``(seed, identity)``; the device only adds the planned
canary gradients and returns their coordinates of each client update.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

_AUDIT = 0xA0D17


@dataclasses.dataclass
class AuditPlan:
  """The secret canary design of one run (per silo: coordinates and inclusion bits)."""

  index: np.ndarray  # (K, m) int32 canary coordinates of the flat parameter vector
  included: np.ndarray  # (K, m) bool: the secret ½-coin of each canary
  rates: np.ndarray  # (K,) Poisson sampling rate of every record (and canary) of silo k
  scale: float  # canary gradient norm when no clip applies (non-private runs)
  entropy: tuple  # (seed, identity): the run's secret randomness

  @property
  def canaries(self) -> int:
    return int(self.index.shape[1])

  @classmethod
  def make(cls, *, seed: int, identity: int, num_clients: int, param_count: int,
           canaries: int, rates, scale: float) -> 'AuditPlan':
    """Draws coordinates (distinct per silo when the model has room) and inclusion bits."""
    if canaries < 1:
      raise ValueError(f'config.privacy.audit.canaries={canaries} must be >= 1')
    if canaries > param_count:
      raise ValueError(f'config.privacy.audit.canaries={canaries} exceeds the model\'s '
                       f'{param_count} parameters (one coordinate per canary)')
    rng = np.random.default_rng([seed, identity, _AUDIT])
    if canaries * num_clients <= param_count:
      coords = rng.choice(param_count, canaries * num_clients, replace=False)
      index = coords.reshape(num_clients, canaries)
    else:  # a small model: silos share coordinates (their releases are separate anyway)
      index = np.tile(rng.choice(param_count, canaries, replace=False), (num_clients, 1))
    included = rng.random((num_clients, canaries)) < 0.5
    return cls(index=index.astype(np.int32), included=included,
               rates=np.asarray(rates, np.float64), scale=float(scale),
               entropy=(int(seed), int(identity)))

  def round_arrays(self, round_: int, clients, steps: int):
    """(M, m) coordinates and (M, steps, m) 0/1 canary gradients of one round's clients.

    Entry [i, t, j] is 1 iff canary j of client ``clients[i]`` is included and Poisson-sampled
    at local step t (rate q of that silo, fresh each step).
    """
    clients = np.asarray(clients)
    rng = np.random.default_rng([*self.entropy, round_, _AUDIT + 1])
    draws = rng.random((len(clients), steps, self.canaries))
    sampled = draws < self.rates[clients][:, None, None]
    mask = sampled & self.included[clients][:, None, :]
    return self.index[clients], mask.astype(np.float32)


class AuditScores:
  """Accumulates the canary scores of every silo over the rounds it took part in (host)."""

  def __init__(self, plan: AuditPlan):
    self.plan = plan
    self.scores = np.zeros(plan.index.shape, np.float64)

  def add(self, clients, ran_steps, scores) -> None:
    """Adds one round's (M, m) scores of the clients that ran at least one step."""
    for i, k in enumerate(clients):
      if int(ran_steps[i]) > 0:
        self.scores[int(k)] += np.asarray(scores[i], np.float64)

  def state(self) -> dict:
    return {'scores': self.scores.tolist()}

  def load(self, state: dict) -> None:
    self.scores = np.asarray(state['scores'], np.float64).reshape(self.plan.index.shape)


def save_scores(path: str, scores: AuditScores, accounted, delta: float, names) -> None:
  """Canary scores, coins and coordinates of a finished run (``adpfl audit`` recomputes from it)."""
  np.savez(path, scores=scores.scores, included=scores.plan.included, index=scores.plan.index,
           epsilon=np.asarray(accounted, np.float64), delta=np.float64(delta),
           names=np.asarray([str(n) for n in names]))


def load_scores(path: str) -> tuple[AuditScores, np.ndarray, float, list]:
  with np.load(path) as z:
    plan = AuditPlan(index=z['index'], included=z['included'], rates=np.zeros(len(z['index'])),
                     scale=1.0, entropy=())
    scores = AuditScores(plan)
    scores.scores = z['scores']
    return scores, z['epsilon'], float(z['delta']), [str(n) for n in z['names']]


def epsilon_lower_bound(in_scores, out_scores, delta: float, significance: float = 0.05) -> float:
  """One-run ε lower bound (Steinke et al. 2023) at confidence 1 − significance.

  ``jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run`` (Bonferroni over thresholds): 0 when
  the guesses are no better than chance.
  """
  from jax_privacy import auditing  # pylint: disable=g-import-not-at-top
  in_scores, out_scores = np.asarray(in_scores, float), np.asarray(out_scores, float)
  if not in_scores.size or not out_scores.size:
    return 0.0
  auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
  return float(auditor.epsilon_one_run(significance=significance, delta=delta))


def report(scores: AuditScores, accounted, delta: float, significance: float,
           names=None) -> dict:
  """The audit of every silo: ε lower bound next to the accounted ε (``audit.json``)."""
  plan = scores.plan
  accounted = np.asarray(accounted, np.float64)
  silos = []
  for k in range(plan.index.shape[0]):
    s, inc = scores.scores[k], plan.included[k]
    lb = epsilon_lower_bound(s[inc], s[~inc], delta, significance)
    silos.append({
        'silo': names[k] if names is not None else k,
        'epsilon': float(accounted[k]),
        'epsilon_lower_bound': lb,
        'canaries': plan.canaries,
        'included': int(inc.sum()),
        'consistent': bool(not math.isfinite(accounted[k]) or lb <= accounted[k]),
    })
  lbs = [s['epsilon_lower_bound'] for s in silos]
  worst = int(np.argmax(lbs))
  return {
      'method': 'one-run audit (Steinke, Nasr & Jagielski 2023), Dirac gradient canaries, '
                'score = -sum of the silo\'s released updates at the canary coordinate',
      'significance': significance,
      'confidence': 1.0 - significance,
      'delta': delta,
      'canaries_per_silo': plan.canaries,
      'epsilon_lower_bound': lbs[worst],
      'epsilon': float(np.max(accounted)),
      'consistent': all(s['consistent'] for s in silos),
      'silos': silos,
  }
