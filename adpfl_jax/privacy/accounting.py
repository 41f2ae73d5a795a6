"""Host-side privacy accounting for record-level DP-SGD inside each silo (dp-accounting based).

Unit and relation. Each silo (hospital) runs DP-SGD on its own records and keeps its own
``Ledger``. Every local step is one Poisson-subsampled mechanism: each record joins the batch
independently with probability ``q``, the clipped per-record contributions are summed and noised
with multiplier ``z`` (Gaussian noise for an L2 clip, Laplace noise for an L1 clip; see
docs/privacy.md §6.4). The neighbouring relation is ``ADD_OR_REMOVE_ONE`` only: ``REPLACE_ONE`` is
rejected because dp-accounting's RDP and PLD accountants disagree on its sensitivity
(docs/privacy.md §1.3).

All privacy arithmetic comes from dp-accounting (0.6.0): RDP vectors are computed by
``dp_accounting.rdp.RdpAccountant`` and converted with
``dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon``; PLDs by
``dp_accounting.pld.privacy_loss_distribution`` (the functions ``PLDAccountant`` itself calls,
with the same arguments). This module only caches and adds things that are exactly additive:

* RDP: one vector per distinct step spec, cached in a module-level LRU cache; the ledger's RDP is
  ``Σ count · vector`` (RDP composes by addition, so this equals composing the
  ``ComposedDpEvent`` in ``RdpAccountant``, with the same floating-point sums).
* PLD: one self-composed PLD per distinct (spec, total count), cached; the ledger composes one PLD
  per *distinct* spec. The ε of a composition does not depend on the order of its parts, so
  grouping equal specs that are not consecutive is exact (up to float rounding, ~1e-10).
  Cost: one PLD construction + ``self_compose`` per new (spec, count) and one convolution per
  distinct spec per query. With 50 distinct σ at the default 1e-4 discretisation a query costs
  seconds; take online decisions with RDP or a coarse discretisation (docs/privacy.md §3.2).

Truncated Poisson batches. Clients realise a Poisson sample as a padded array of fixed size B; if
a draw exceeds B, a uniformly random subset of size B is kept. Adding a record can then displace
another one, so plain Poisson accounting would under-report. dp-accounting 0.6.0 describes this
with ``TruncatedSubsampledGaussianDpEvent(dataset_size, sampling_probability,
truncated_batch_size, noise_multiplier)`` (arXiv 2508.15089), where ``dataset_size`` is the size
of the dataset that *contains* the differing record:

* The neighbours of a silo with n records are the dataset without one record (n − 1; the pair's
  larger dataset has n records) and the dataset with one more record (n + 1). Both pairs must be
  covered. A ``StepSpec`` stores the silo's own size n (``dataset_size``) and builds the event with
  N = n + 1, the add-one pair: its truncation weight ``p = P[Binom(N - 1, q) ≥ B]`` is the larger
  of the two and ε grows with it (checked numerically over a grid of our settings in
  ``tests/privacy/accounting_test.py``). Truncation is possible as soon as B ≤ n (B < N): a padded
  batch of exactly n slots still truncates the add-one neighbour.
* ``PLDAccountant`` supports the event: it builds the mixture, with weight p (the other records
  alone fill the batch), of a REPLACE_ONE subsampled Gaussian at the conditional inclusion
  probability, and weight ``1 - p`` of the usual add/remove subsampled Gaussian. The PLD ledger
  uses that event as is.
* ``RdpAccountant`` does not support it (``supports()`` is False). The RDP ledger therefore uses
  an honest total-variation fallback: run the same randomness through the truncated sampler and
  the untruncated Poisson sampler; their transcripts differ only if some step's draw exceeds B,
  which for any neighbour (at most n + 1 records) has probability at most
  ``η = Σ_steps P[Binom(n + 1, q) > B]``. If the Poisson run is (ε, δ_P)-DP, the truncated run is
  (ε, δ_P + η(1 + e^ε))-DP. ``Ledger.epsilon(δ)`` returns the least ε with
  ``ε ≥ ε_Poisson(δ - η(1 + e^ε))`` (a monotone fixed point, iterated), or ∞ if no δ is left.
  Size B a few standard deviations above qn and η is negligible (e.g. 1e-12); if B is tight,
  use ``accountant='pld'``. Truncation is only defined for the Gaussian mechanism.

Public noise schedules and calibration: ``calibrate_scale`` (generic: a function from a scale s
to the ledger runs of the planned run), ``calibrate_noise_multiplier`` (constant σ or σ_t = s ·
schedule(t)) and ``calibrate_noise_multipliers`` (one σ_k per silo), all driven by
``dp_accounting.calibrate_dp_mechanism``, which returns a parameter with ε ≤ target.

Data-dependent noise choices need a filter fixed in advance: ``RdpFilter`` (Feldman & Zrnic).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import attr
import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
import numpy as np
from scipy import stats

NeighboringRelation = dp_accounting.NeighboringRelation

ACCOUNTANTS = ('rdp', 'pld')
MECHANISMS = ('gaussian', 'laplace')
DEFAULT_PLD_DISCRETIZATION = 1e-4
DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in rdp_lib.DEFAULT_RDP_ORDERS)
_LEDGER_FORMAT = 'adpfl_jax.privacy.accounting.Ledger/v1'

Run = tuple['StepSpec', int]


# ------------------------------------------------------------------------------------------------
# Validation helpers. Every error names the offending parameter and value.
# ------------------------------------------------------------------------------------------------
def _as_float(value: Any, name: str) -> float:
  if isinstance(value, bool):
    raise ValueError(f'{name} must be a number, got {value!r}')
  try:
    out = float(value)
  except (TypeError, ValueError) as err:
    raise ValueError(f'{name} must be a number, got {value!r}') from err
  if math.isnan(out):
    raise ValueError(f'{name} must not be NaN, got {value!r}')
  return out


def _as_int(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
      value = int(value)
    else:
      raise ValueError(f'{name} must be an integer, got {value!r}')
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value!r}')
  return int(value)


def check_sampling_rate(sampling_rate: Any, name: str = 'sampling_rate') -> float:
  """Returns ``sampling_rate`` as a float after checking it lies in (0, 1]."""
  q = _as_float(sampling_rate, name)
  if not 0.0 < q <= 1.0:
    raise ValueError(f'{name} must be in (0, 1], got {sampling_rate!r}')
  return q


def check_noise_multiplier(noise_multiplier: Any, name: str = 'noise_multiplier') -> float:
  """Returns ``noise_multiplier`` as a float after checking it is finite and >= 0."""
  z = _as_float(noise_multiplier, name)
  if not math.isfinite(z) or z < 0.0:
    raise ValueError(f'{name} must be finite and >= 0 (0 means no noise: ε = inf), got '
                     f'{noise_multiplier!r}')
  return z + 0.0  # Normalises -0.0.


def check_delta(delta: Any, name: str = 'delta') -> float:
  """Returns ``delta`` as a float after checking it lies in (0, 1)."""
  d = _as_float(delta, name)
  if not 0.0 < d < 1.0:
    raise ValueError(f'{name} must be in (0, 1), got {delta!r}')
  return d


def check_target_epsilon(target_epsilon: Any, name: str = 'target_epsilon') -> float:
  """Returns ``target_epsilon`` as a float after checking it is finite and > 0."""
  e = _as_float(target_epsilon, name)
  if not math.isfinite(e) or e <= 0.0:
    raise ValueError(f'{name} must be finite and > 0, got {target_epsilon!r}')
  return e


def check_accountant(accountant: Any) -> str:
  """Returns the accountant name ('rdp' or 'pld')."""
  if not isinstance(accountant, str) or accountant.lower() not in ACCOUNTANTS:
    raise ValueError(f'accountant must be one of {ACCOUNTANTS}, got {accountant!r}')
  return accountant.lower()


def check_neighboring_relation(relation: Any) -> NeighboringRelation:
  """Accepts ADD_OR_REMOVE_ONE (enum or its name, any case); rejects everything else."""
  if isinstance(relation, str):
    name = relation.strip().upper().replace('-', '_').replace('/', '_OR_')
    if name in ('ADD_REMOVE', 'ADD_OR_REMOVE', 'ADD_REMOVE_ONE'):
      name = 'ADD_OR_REMOVE_ONE'
    try:
      relation = NeighboringRelation[name]
    except KeyError as err:
      raise ValueError(f'neighboring_relation {relation!r} is not a NeighboringRelation name; '
                       'use ADD_OR_REMOVE_ONE') from err
  if relation == NeighboringRelation.REPLACE_ONE:
    raise ValueError(
        'neighboring_relation=REPLACE_ONE is not supported: dp-accounting 0.6.0 doubles the '
        'sensitivity for REPLACE_ONE in PLD but not in RDP, so RDP can under-report ε by about 4x '
        '(google/differential-privacy #378, docs/privacy.md §1.3). Use ADD_OR_REMOVE_ONE with Poisson '
        'sampling.')
  if relation != NeighboringRelation.ADD_OR_REMOVE_ONE:
    raise ValueError(f'neighboring_relation must be ADD_OR_REMOVE_ONE, got {relation!r}')
  return relation


# ------------------------------------------------------------------------------------------------
# One local step.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Hashable, serialisable description of one local DP-SGD step of one silo.

  Attributes:
    sampling_rate: Poisson sampling probability q in (0, 1]; 1 means the full dataset.
    noise_multiplier: noise std / clip norm (L2 clip for 'gaussian', L1 clip for 'laplace');
      0 means no noise (ε = inf).
    mechanism: 'gaussian' or 'laplace'.
    truncated_batch_size: if set, the sampler keeps a random subset of this size when a Poisson
      draw is larger (padded fixed-size batches); requires ``dataset_size``. A value above
      ``dataset_size`` can never truncate (not even the add-one neighbour) and means plain
      Poisson sampling.
    dataset_size: the silo's (public) number of records n; only used with truncation. The
      accountant covers both neighbours, n − 1 and n + 1 records (module docstring).
  """

  sampling_rate: float
  noise_multiplier: float
  mechanism: str = 'gaussian'
  truncated_batch_size: Optional[int] = None
  dataset_size: Optional[int] = None

  def __post_init__(self):
    setattr_ = functools.partial(object.__setattr__, self)
    setattr_('sampling_rate', check_sampling_rate(self.sampling_rate))
    setattr_('noise_multiplier', check_noise_multiplier(self.noise_multiplier))
    if not isinstance(self.mechanism, str) or self.mechanism.lower() not in MECHANISMS:
      raise ValueError(f'mechanism must be one of {MECHANISMS}, got {self.mechanism!r}')
    setattr_('mechanism', self.mechanism.lower())
    b, n = self.truncated_batch_size, self.dataset_size
    if (b is None) != (n is None):
      raise ValueError('truncated_batch_size and dataset_size must be given together, got '
                       f'truncated_batch_size={b!r}, dataset_size={n!r}')
    if b is not None:
      setattr_('truncated_batch_size', _as_int(b, 'truncated_batch_size', 1))
      setattr_('dataset_size', _as_int(n, 'dataset_size', 1))
      if self.truncated_batch_size > self.dataset_size:
        # Even the add-one neighbour (n + 1 records) fits: plain Poisson sampling.
        setattr_('truncated_batch_size', None)
        setattr_('dataset_size', None)
      elif self.mechanism != 'gaussian':
        raise ValueError(
            f'truncated_batch_size={b!r} with mechanism={self.mechanism!r}: truncated Poisson '
            'sampling is only accounted for the Gaussian mechanism (dp-accounting has no '
            'truncated Laplace event); use untruncated Poisson batches for Laplace.')

  @property
  def is_private(self) -> bool:
    return self.noise_multiplier > 0.0

  @property
  def is_truncated(self) -> bool:
    return self.truncated_batch_size is not None

  @property
  def neighbour_size(self) -> Optional[int]:
    """Records in the larger dataset of the worst neighbouring pair: n + 1 (the add-one pair)."""
    return None if self.dataset_size is None else self.dataset_size + 1

  @property
  def truncation_probability(self) -> float:
    """Upper bound on P[a Poisson draw from any neighbour (≤ n + 1 records) exceeds B]."""
    if self.truncated_batch_size is None:
      return 0.0
    return _truncation_probability(self.sampling_rate, self.truncated_batch_size,
                                   self.dataset_size)

  def poisson(self) -> 'StepSpec':
    """The same step with untruncated Poisson sampling."""
    return dataclasses.replace(self, truncated_batch_size=None, dataset_size=None)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> 'StepSpec':
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
      raise ValueError(f'unknown StepSpec keys {sorted(unknown)}; expected a subset of '
                       f'{sorted(names)}')
    return cls(**data)


@functools.lru_cache(maxsize=4096)
def _truncation_probability(q: float, b: int, n: int) -> float:
  return float(stats.binom.sf(b, n + 1, q))


def step_event(spec: StepSpec) -> dp_accounting.DpEvent:
  """The dp-accounting event of one step described by ``spec`` (see ``make_step_event``)."""
  if not isinstance(spec, StepSpec):
    raise TypeError(f'spec must be a StepSpec, got {type(spec).__name__}: {spec!r}')
  if not spec.is_private:
    return dp_accounting.NonPrivateDpEvent()
  z, q = spec.noise_multiplier, spec.sampling_rate
  if spec.is_truncated:
    return dp_accounting.TruncatedSubsampledGaussianDpEvent(
        dataset_size=spec.neighbour_size, sampling_probability=q,
        truncated_batch_size=spec.truncated_batch_size, noise_multiplier=z)
  inner = (dp_accounting.GaussianDpEvent(z) if spec.mechanism == 'gaussian'
           else dp_accounting.LaplaceDpEvent(z))
  if q == 1.0:
    return inner  # Poisson sampling with q = 1 keeps every record: the bare mechanism.
  return dp_accounting.PoissonSampledDpEvent(q, inner)


def make_step_event(sampling_rate: float, noise_multiplier: float, mechanism: str = 'gaussian',
                    truncated_batch_size: Optional[int] = None,
                    dataset_size: Optional[int] = None) -> dp_accounting.DpEvent:
  """Returns the dp-accounting event of ONE local DP-SGD step.

  * ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` (or ``LaplaceDpEvent``) for q < 1;
  * the bare ``GaussianDpEvent(z)`` / ``LaplaceDpEvent(z)`` for q = 1 (sampling every record is
    no sampling; this also lets RDP account Laplace without subsampling);
  * ``TruncatedSubsampledGaussianDpEvent(dataset_size + 1, q, truncated_batch_size, z)`` when the
    sampler can truncate oversized Poisson draws of the add-one neighbour (PLD only in dp-accounting 0.6.0; the RDP ledger
    uses the total-variation fallback described in the module docstring);
  * ``NonPrivateDpEvent()`` for z = 0 (ε = inf in both accountants).

  Args:
    sampling_rate: Poisson sampling probability q in (0, 1].
    noise_multiplier: noise std / clip norm, >= 0.
    mechanism: 'gaussian' (L2 clip) or 'laplace' (L1 clip).
    truncated_batch_size: fixed maximum batch size, or None for plain Poisson batches.
    dataset_size: the silo's public record count, required with ``truncated_batch_size``.

  Returns:
    A ``dp_accounting.DpEvent``.
  """
  return step_event(StepSpec(sampling_rate, noise_multiplier, mechanism, truncated_batch_size,
                             dataset_size))


def _check_supported(spec: StepSpec, accountant: str) -> None:
  if (accountant == 'rdp' and spec.mechanism == 'laplace' and spec.sampling_rate < 1.0
      and spec.is_private):
    raise ValueError(
        f'mechanism=laplace with sampling_rate={spec.sampling_rate!r} < 1 is not supported by the '
        'RDP accountant: dp-accounting 0.6.0 has no RDP bound for a Poisson-subsampled '
        'LaplaceDpEvent. Use accountant=pld (or sampling_rate=1).')


# ------------------------------------------------------------------------------------------------
# Caches (pure memoisation of dp-accounting results).
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8192)
def _rdp_vector_cached(spec: StepSpec, orders: tuple[float, ...]) -> np.ndarray:
  accountant = dp_accounting.rdp.RdpAccountant(
      orders=list(orders), neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
  accountant.compose(step_event(spec))
  vector = accountant.rdp
  vector.setflags(write=False)
  return vector


def rdp_vector(spec: StepSpec, orders: Optional[Sequence[float]] = None) -> np.ndarray:
  """RDP of one step at ``orders``, computed by ``dp_accounting.rdp.RdpAccountant`` (cached).

  Truncated specs return the vector of the untruncated Poisson step (the RDP ledger adds the
  truncation probability separately, see the module docstring).

  Args:
    spec: the step.
    orders: RDP orders; defaults to dp-accounting's ``DEFAULT_RDP_ORDERS``.

  Returns:
    A read-only float64 array, one value per order.
  """
  _check_supported(spec, 'rdp')
  orders = DEFAULT_RDP_ORDERS if orders is None else tuple(float(a) for a in orders)
  return _rdp_vector_cached(spec.poisson(), orders)


@functools.lru_cache(maxsize=256)
def _run_pld(spec: StepSpec, count: int, discretization: float) -> pld_lib.PrivacyLossDistribution:
  """PLD of ``count`` self-composed steps, built exactly as ``PLDAccountant`` builds it."""
  z, q = spec.noise_multiplier, spec.sampling_rate
  rel = NeighboringRelation.ADD_OR_REMOVE_ONE
  if spec.is_truncated:
    pld = pld_lib.from_truncated_subsampled_gaussian_mechanism(
        dataset_size=spec.neighbour_size, sampling_probability=q,
        truncated_batch_size=spec.truncated_batch_size, noise_multiplier=z,
        value_discretization_interval=discretization, neighboring_relation=rel)
  elif spec.mechanism == 'gaussian':
    pld = pld_lib.from_gaussian_mechanism(
        standard_deviation=z, value_discretization_interval=discretization, sampling_prob=q,
        neighboring_relation=rel)
  else:
    pld = pld_lib.from_laplace_mechanism(
        parameter=z, value_discretization_interval=discretization, sampling_prob=q)
  return pld.self_compose(count)


@functools.lru_cache(maxsize=16)
def _composed_pld(groups: tuple[Run, ...],
                  discretization: float) -> pld_lib.PrivacyLossDistribution:
  pld = pld_lib.identity(value_discretization_interval=discretization)
  for spec, count in groups:
    pld = pld.compose(_run_pld(spec, count, discretization))
  return pld


def clear_caches() -> None:
  """Empties the module-level RDP-vector and PLD caches (e.g. for benchmarks)."""
  _rdp_vector_cached.cache_clear()
  _run_pld.cache_clear()
  _composed_pld.cache_clear()
  _truncation_probability.cache_clear()


# ------------------------------------------------------------------------------------------------
# ε of a list of runs.
# ------------------------------------------------------------------------------------------------
def _epsilon_with_truncation(epsilon_of_delta: Callable[[float], float], delta: float,
                             eta: float) -> float:
  """Least ε with ε ≥ ε_P(δ - η(1 + e^ε)) (total-variation fallback; see module docstring)."""
  if eta <= 0.0:
    return epsilon_of_delta(delta)

  def f(eps: float) -> float:
    if eps > 700.0:
      return math.inf
    remaining = delta - eta * (1.0 + math.exp(eps))
    return math.inf if remaining <= 0.0 else epsilon_of_delta(remaining)

  eps = 0.0
  for _ in range(200):  # f is increasing, so eps_k increases to the least fixed point.
    new = f(eps)
    if not math.isfinite(new):
      return math.inf
    if new <= eps:
      return eps
    eps = max(new, eps) * (1.0 + 1e-12) + 1e-15
  return eps if f(eps) <= eps else math.inf


def _merge(runs: Iterable[tuple[StepSpec, int]]) -> list[list[Any]]:
  merged: list[list[Any]] = []
  for spec, count in runs:
    if merged and merged[-1][0] == spec:
      merged[-1][1] += count
    else:
      merged.append([spec, count])
  return merged


def _validate_run(spec: Any, count: Any, accountant: str) -> tuple[StepSpec, int]:
  if not isinstance(spec, StepSpec):
    raise TypeError(f'spec must be a StepSpec, got {type(spec).__name__}: {spec!r}')
  count = _as_int(count, 'count', 1)
  _check_supported(spec, accountant)
  return spec, count


def _epsilon_of_runs(runs: Sequence[Sequence[Any]], delta: float, accountant: str,
                     discretization: float, orders: tuple[float, ...]) -> float:
  delta = check_delta(delta)
  if not runs:
    return 0.0
  if any(not spec.is_private for spec, _ in runs):
    return math.inf
  if accountant == 'rdp':
    total = np.zeros(len(orders), dtype=np.float64)
    eta = 0.0
    for spec, count in runs:  # Same sums, in the same order, as RdpAccountant.compose.
      total += count * _rdp_vector_cached(spec.poisson(), orders)
      if spec.is_truncated:
        eta += count * spec.truncation_probability
    return _epsilon_with_truncation(
        lambda d: float(rdp_lib.compute_epsilon(orders, total, d)[0]), delta, eta)
  groups: dict[StepSpec, int] = {}
  for spec, count in runs:
    groups[spec] = groups.get(spec, 0) + count
  pld = _composed_pld(tuple(groups.items()), discretization)
  return float(pld.get_epsilon_for_delta(delta))


# ------------------------------------------------------------------------------------------------
# The ledger.
# ------------------------------------------------------------------------------------------------
class Ledger:
  """Per-silo privacy ledger: the full list of local steps, merged into runs of equal specs.

  Records are ``(StepSpec, count)`` runs (consecutive equal specs merge), so a 1000-round schedule
  with a per-round σ costs one run per change of σ. ``epsilon`` recomputes ε from the runs with
  cached dp-accounting results (module docstring); ``dp_event()`` gives the equivalent
  ``ComposedDpEvent`` for cross-checks or provenance.

  Args:
    accountant: 'rdp' (default) or 'pld'.
    neighboring_relation: must be ADD_OR_REMOVE_ONE.
    pld_discretization: PLD ``value_discretization_interval`` (PLD only).
    rdp_orders: RDP orders (RDP only); defaults to dp-accounting's ``DEFAULT_RDP_ORDERS``.
  """

  def __init__(self, accountant: str = 'rdp',
               neighboring_relation: Union[NeighboringRelation, str] = (
                   NeighboringRelation.ADD_OR_REMOVE_ONE),
               pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
               rdp_orders: Optional[Sequence[float]] = None):
    self._accountant = check_accountant(accountant)
    self._relation = check_neighboring_relation(neighboring_relation)
    disc = _as_float(pld_discretization, 'pld_discretization')
    if not (math.isfinite(disc) and 0.0 < disc <= 1.0):
      raise ValueError(f'pld_discretization must be in (0, 1], got {pld_discretization!r}')
    self._discretization = disc
    if rdp_orders is None:
      self._orders = DEFAULT_RDP_ORDERS
    else:
      self._orders = tuple(_as_float(a, 'rdp_orders') for a in rdp_orders)
      if not self._orders or min(self._orders) <= 1.0:
        raise ValueError(f'rdp_orders must be a non-empty list of orders > 1, got {rdp_orders!r}')
    self._runs: list[list[Any]] = []

  # -- configuration -----------------------------------------------------------------------------
  @property
  def accountant(self) -> str:
    return self._accountant

  @property
  def neighboring_relation(self) -> NeighboringRelation:
    return self._relation

  @property
  def pld_discretization(self) -> float:
    return self._discretization

  @property
  def rdp_orders(self) -> tuple[float, ...]:
    return self._orders

  # -- contents ----------------------------------------------------------------------------------
  @property
  def runs(self) -> tuple[Run, ...]:
    """The recorded runs, in order, as hashable ``(StepSpec, count)`` tuples."""
    return tuple((spec, count) for spec, count in self._runs)

  @property
  def steps(self) -> int:
    """Total number of recorded steps."""
    return sum(count for _, count in self._runs)

  def record(self, spec: StepSpec, count: int = 1) -> None:
    """Appends ``count`` steps of ``spec`` (merged into the last run if the spec is equal)."""
    spec, count = _validate_run(spec, count, self._accountant)
    if self._runs and self._runs[-1][0] == spec:
      self._runs[-1][1] += count
    else:
      self._runs.append([spec, count])

  def extend(self, runs: Iterable[tuple[StepSpec, int]]) -> None:
    """Records every ``(spec, count)`` of ``runs`` in order."""
    for spec, count in runs:
      self.record(spec, count)

  def copy(self) -> 'Ledger':
    other = Ledger(self._accountant, self._relation, self._discretization, self._orders)
    other._runs = [list(run) for run in self._runs]  # pylint: disable=protected-access
    return other

  # -- privacy -----------------------------------------------------------------------------------
  def epsilon(self, delta: float) -> float:
    """ε of everything recorded, at ``delta`` (0 for an empty ledger, inf if any step has z = 0)."""
    return _epsilon_of_runs(self._runs, delta, self._accountant, self._discretization,
                            self._orders)

  def epsilon_if(self, extra: Iterable[tuple[StepSpec, int]], delta: float) -> float:
    """ε after also recording ``extra`` (a list of ``(spec, count)``), without recording it."""
    runs = _merge([tuple(run) for run in self._runs] +
                  [_validate_run(spec, count, self._accountant) for spec, count in extra])
    return _epsilon_of_runs(runs, delta, self._accountant, self._discretization, self._orders)

  def dp_event(self) -> dp_accounting.DpEvent:
    """The equivalent ``ComposedDpEvent([SelfComposedDpEvent(step_event, count), ...])``."""
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(step_event(spec), count) for spec, count in self._runs])

  # -- persistence -------------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    return {
        'format': _LEDGER_FORMAT,
        'accountant': self._accountant,
        'neighboring_relation': self._relation.name,
        'pld_discretization': self._discretization,
        'rdp_orders': None if self._orders == DEFAULT_RDP_ORDERS else list(self._orders),
        'runs': [{'spec': spec.to_dict(), 'count': count} for spec, count in self._runs],
    }

  def to_json(self) -> str:
    """JSON with the configuration and the full list of runs (floats round-trip exactly)."""
    return json.dumps(self.to_dict())

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> 'Ledger':
    if not isinstance(data, Mapping) or data.get('format') != _LEDGER_FORMAT:
      raise ValueError(f'not a serialised Ledger: expected key format={_LEDGER_FORMAT!r}, got '
                       f'{(data.get("format") if isinstance(data, Mapping) else data)!r}')
    missing = {'accountant', 'neighboring_relation', 'pld_discretization', 'runs'} - set(data)
    if missing:
      raise ValueError(f'serialised Ledger is missing keys {sorted(missing)}')
    ledger = cls(data['accountant'], data['neighboring_relation'], data['pld_discretization'],
                 data.get('rdp_orders'))
    for i, run in enumerate(data['runs']):
      if not isinstance(run, Mapping) or set(run) != {'spec', 'count'}:
        raise ValueError(f'serialised Ledger run {i} must have exactly the keys count, spec; got '
                         f'{run!r}')
      ledger.record(StepSpec.from_dict(run['spec']), run['count'])
    return ledger

  @classmethod
  def from_json(cls, text: str) -> 'Ledger':
    return cls.from_dict(json.loads(text))

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Ledger):
      return NotImplemented
    return (self._accountant == other._accountant and self._relation == other._relation
            and self._discretization == other._discretization and self._orders == other._orders
            and self.runs == other.runs)

  __hash__ = None  # Mutable.

  def __repr__(self) -> str:
    return (f'Ledger(accountant={self._accountant!r}, runs={len(self._runs)}, '
            f'steps={self.steps})')


# ------------------------------------------------------------------------------------------------
# Quantisation of noise multipliers.
# ------------------------------------------------------------------------------------------------
def quantize_noise(noise_multiplier: float, grid: Union[float, Sequence[float]]) -> float:
  """Rounds a noise multiplier DOWN onto a grid (the accounted σ never exceeds the actual σ).

  Use it to keep ledgers and calibration cheap: many nearby σ collapse onto few grid values, so
  cached RDP vectors / PLDs are reused and runs merge. Recording ``quantize_noise(z, grid)`` while
  the device adds noise with multiplier ``z`` is conservative: a smaller accounted σ gives a
  larger ε, so the ledger over-reports by at most the grid resolution and never under-reports.
  (Rounding *up* or to nearest could under-report; docs/privacy.md §3.2.) Alternatively run the device
  with the quantised value itself, which makes the ledger exact.

  Args:
    noise_multiplier: z >= 0. z = 0 maps to 0.
    grid: a float g > 0 for the geometric grid {(1 + g)^k : k integer} (relative resolution g),
      or an increasing sequence of allowed positive values.

  Returns:
    The largest grid value <= z.

  Raises:
    ValueError: if z is below the smallest value of an explicit grid, or the grid is invalid.
  """
  z = check_noise_multiplier(noise_multiplier)
  if z == 0.0:
    return 0.0
  if isinstance(grid, (int, float, np.integer, np.floating)) and not isinstance(grid, bool):
    g = float(grid)
    if not (math.isfinite(g) and g > 0.0):
      raise ValueError(f'grid (relative resolution) must be a finite float > 0, got {grid!r}')
    ratio = 1.0 + g
    k = math.floor(math.log(z) / math.log(ratio))
    while ratio ** (k + 1) <= z:
      k += 1
    while ratio ** k > z:
      k -= 1
    return float(ratio ** k)
  values = np.asarray(grid, dtype=np.float64)
  if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)) or np.any(
      values <= 0) or np.any(np.diff(values) <= 0):
    raise ValueError(f'grid must be a float or a strictly increasing list of positive values, '
                     f'got {grid!r}')
  i = int(np.searchsorted(values, z, side='right')) - 1
  if i < 0:
    raise ValueError(f'noise_multiplier={z!r} is below the smallest grid value {values[0]!r}; '
                     'rounding it down would give 0 (no privacy)')
  return float(values[i])


# ------------------------------------------------------------------------------------------------
# Calibration.
# ------------------------------------------------------------------------------------------------
@attr.s(frozen=True, slots=True, auto_attribs=True)
class _PlanDpEvent(dp_accounting.DpEvent):
  """A planned run list, wrapped so ``calibrate_dp_mechanism`` can pass it to our accountant."""

  runs: tuple


class _LedgerAccountant(dp_accounting.PrivacyAccountant):
  """A ``PrivacyAccountant`` backed by ``Ledger`` (cached RDP vectors / PLDs)."""

  def __init__(self, accountant: str, pld_discretization: float,
               rdp_orders: Optional[Sequence[float]]):
    super().__init__(NeighboringRelation.ADD_OR_REMOVE_ONE)
    self._book = Ledger(accountant, pld_discretization=pld_discretization, rdp_orders=rdp_orders)

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


def calibrate_scale(make_runs: Callable[[float], Iterable[tuple[StepSpec, int]]],
                    target_epsilon: float, delta: float, accountant: str = 'rdp', *,
                    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
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
  target_epsilon = check_target_epsilon(target_epsilon)
  delta = check_delta(delta)
  accountant = check_accountant(accountant)
  cache: dict[float, float] = {}

  def make_event(s: float) -> _PlanDpEvent:
    return _PlanDpEvent(tuple(tuple(run) for run in _merge(make_runs(float(s)))))

  def make_accountant() -> _LedgerAccountant:
    return _LedgerAccountant(accountant, pld_discretization, rdp_orders)

  def eps(s: float) -> float:
    if s not in cache:
      cache[s] = make_accountant().compose(make_event(s)).get_epsilon(delta)
    return cache[s]

  if initial_bracket is None:
    hi = _as_float(initial_scale, 'initial_scale')
    lo = hi / 2.0
  else:
    lo, hi = (_as_float(x, 'initial_bracket') for x in initial_bracket)
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


def _shape_runs(schedule: Any, steps: int) -> list[tuple[float, int]]:
  """Run-length encoding of the per-step relative multipliers of ``schedule``."""
  if schedule is None:
    return [(1.0, steps)]
  if callable(schedule):
    values = np.asarray(schedule(np.arange(steps)), dtype=np.float64)
  else:
    values = np.asarray(schedule, dtype=np.float64)
  if values.shape != (steps,):
    raise ValueError(f'schedule must give one multiplier per step, i.e. shape ({steps},); got '
                     f'shape {values.shape}')
  if not np.all(np.isfinite(values)) or np.any(values <= 0):
    raise ValueError('schedule values must be finite and > 0; got min '
                     f'{float(np.min(values))!r}, max {float(np.max(values))!r}')
  runs: list[tuple[float, int]] = []
  for v in values.tolist():
    if runs and runs[-1][0] == v:
      runs[-1] = (v, runs[-1][1] + 1)
    else:
      runs.append((v, 1))
  return runs


def default_noise_grid(accountant: str, distinct_values: int) -> Optional[float]:
  """Default σ grid for schedule calibration: exact for ≤ 1 value, else 1e-3 (RDP) / 1e-2 (PLD)."""
  if distinct_values <= 1:
    return None
  return 1e-3 if check_accountant(accountant) == 'rdp' else 1e-2


def plan_runs(sampling_rate: float, noise_multipliers: Iterable[tuple[float, int]],
              mechanism: str = 'gaussian', truncated_batch_size: Optional[int] = None,
              dataset_size: Optional[int] = None,
              noise_grid: Optional[Union[float, Sequence[float]]] = None) -> list[Run]:
  """Ledger runs of a planned run from ``(noise_multiplier, count)`` pairs.

  With ``noise_grid`` each σ is first rounded down with ``quantize_noise`` (conservative).
  """
  runs = []
  for z, count in noise_multipliers:
    if noise_grid is not None:
      z = quantize_noise(z, noise_grid)
    runs.append((StepSpec(sampling_rate, z, mechanism, truncated_batch_size, dataset_size),
                 _as_int(count, 'count', 1)))
  return [tuple(r) for r in _merge(runs)]


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float,
                               steps: int, accountant: str = 'rdp', mechanism: str = 'gaussian',
                               schedule: Any = None, *,
                               truncated_batch_size: Optional[int] = None,
                               dataset_size: Optional[int] = None,
                               pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                               noise_grid: Union[str, None, float, Sequence[float]] = 'auto',
                               rdp_orders: Optional[Sequence[float]] = None) -> float:
  """Smallest noise multiplier (or schedule scale) with ε ≤ ``target_epsilon`` (never above).

  Without ``schedule`` every step uses the returned σ (no quantisation). With ``schedule`` (a
  callable of the step index array, or a sequence of length ``steps``, of positive relative
  multipliers) step t uses σ_t = s · schedule(t) and the returned value is s. The planned ledger
  then accounts ``quantize_noise(s · schedule(t), noise_grid)`` (rounded down, so recording either
  that value or the exact σ_t keeps ε ≤ target). ``noise_grid='auto'`` picks
  ``default_noise_grid``: 1e-3 for RDP, 1e-2 for PLD, exact for a constant schedule. The grid is
  fixed (independent of s), so successive evaluations of the search reuse cached RDP vectors and
  PLDs; pass ``noise_grid=None`` for exact σ_t (cost: one dp-accounting evaluation per distinct
  σ_t per search step).

  Args:
    target_epsilon: ε budget, > 0.
    delta: δ in (0, 1).
    sampling_rate: Poisson q in (0, 1].
    steps: number of local steps (>= 1).
    accountant: 'rdp' or 'pld'.
    mechanism: 'gaussian' or 'laplace' (Laplace with q < 1 needs 'pld').
    schedule: None, a callable, or a sequence (see above).
    truncated_batch_size: see ``StepSpec``.
    dataset_size: see ``StepSpec``.
    pld_discretization: PLD discretisation interval.
    noise_grid: 'auto', None, a relative resolution or an explicit grid (see ``quantize_noise``).
    rdp_orders: RDP orders.

  Returns:
    σ (no schedule) or the scale s.
  """
  target_epsilon = check_target_epsilon(target_epsilon)
  delta = check_delta(delta)
  accountant = check_accountant(accountant)
  steps = _as_int(steps, 'steps', 1)
  proto = StepSpec(sampling_rate, 1.0, mechanism, truncated_batch_size, dataset_size)
  _check_supported(proto, accountant)
  shape = _shape_runs(schedule, steps)
  if isinstance(noise_grid, str):
    if noise_grid != 'auto':
      raise ValueError(f"noise_grid must be 'auto', None, a float or a list, got {noise_grid!r}")
    noise_grid = default_noise_grid(accountant, len({v for v, _ in shape}))

  def make_runs(s: float) -> list[Run]:
    return plan_runs(proto.sampling_rate, [(s * v, c) for v, c in shape], proto.mechanism,
                     proto.truncated_batch_size, proto.dataset_size, noise_grid)

  values = [v for v, _ in shape]
  bracket = None
  if len(set(values)) > 1:
    # Every σ_t lies between s·min(v) and s·max(v), so the constant-σ solution σ_c brackets s:
    # ε(σ_c / max v) ≥ target ≥ ε(σ_c / min v) (up to the grid; calibrate_scale re-checks).
    sigma_c = calibrate_noise_multiplier(
        target_epsilon, delta, sampling_rate, steps, accountant, mechanism,
        truncated_batch_size=truncated_batch_size, dataset_size=dataset_size,
        pld_discretization=pld_discretization, rdp_orders=rdp_orders)
    bracket = (sigma_c / max(values), sigma_c / min(values) * 1.02)
  return calibrate_scale(make_runs, target_epsilon, delta, accountant,
                         pld_discretization=pld_discretization, rdp_orders=rdp_orders,
                         initial_scale=1.0 / max(values), initial_bracket=bracket)


def calibrate_noise_multipliers(target_epsilon: Union[float, Sequence[float]], delta: float,
                                sampling_rates: Sequence[float], steps: Sequence[int],
                                accountant: str = 'rdp', mechanism: str = 'gaussian',
                                **kwargs: Any) -> list[float]:
  """Per-silo ``calibrate_noise_multiplier``: one σ_k for each (q_k, steps_k).

  Args:
    target_epsilon: one ε for all silos, or one per silo.
    delta: δ in (0, 1).
    sampling_rates: q_k per silo.
    steps: local steps per silo.
    accountant: 'rdp' or 'pld'.
    mechanism: 'gaussian' or 'laplace'.
    **kwargs: passed to ``calibrate_noise_multiplier`` (``schedule``, truncation, grids, ...).

  Returns:
    The list of σ_k (or scales), in silo order.
  """
  rates, counts = list(sampling_rates), list(steps)
  if len(rates) != len(counts):
    raise ValueError(f'sampling_rates and steps must have the same length, got {len(rates)} and '
                     f'{len(counts)}')
  targets = ([target_epsilon] * len(rates) if np.ndim(target_epsilon) == 0
             else list(target_epsilon))
  if len(targets) != len(rates):
    raise ValueError(f'target_epsilon must be a scalar or one value per silo ({len(rates)}), '
                     f'got {len(targets)} values')
  return [calibrate_noise_multiplier(e, delta, q, n, accountant, mechanism, **kwargs)
          for e, q, n in zip(targets, rates, counts)]


# ------------------------------------------------------------------------------------------------
# Rényi filter.
# ------------------------------------------------------------------------------------------------
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
    self._target = check_target_epsilon(target_epsilon)
    self._delta = check_delta(delta)
    seq = [orders] if np.ndim(orders) == 0 else list(orders)
    if not seq:
      raise ValueError('orders must contain at least one RDP order')
    self._orders = tuple(_as_float(a, 'orders') for a in seq)
    for a in self._orders:
      if not (math.isfinite(a) and a > 1.01):
        raise ValueError(f'orders must be finite and > 1.01, got {a!r}')
    self._budget = np.array([self._budget_at(a) for a in self._orders])
    bad = [a for a, b in zip(self._orders, self._budget) if b <= 0.0]
    if bad:
      raise ValueError(f'orders {bad} leave no RDP budget for target_epsilon={self._target!r} at '
                       f'delta={self._delta!r}; choose larger orders')
    self._spent = np.zeros(len(self._orders))
    self._ledger = Ledger('rdp')

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
               planned_runs: Iterable[tuple[StepSpec, int]]) -> 'RdpFilter':
    """Single-order filter at the ε-optimal RDP order of a planned (non-adaptive) run.

    If the plan itself meets the target (by RDP), the filter admits at least the planned steps.
    """
    delta = check_delta(delta)
    total = np.zeros(len(DEFAULT_RDP_ORDERS))
    for spec, count in planned_runs:
      spec, count = _validate_run(spec, count, 'rdp')
      total += count * rdp_vector(spec)
    eps, order = rdp_lib.compute_epsilon(DEFAULT_RDP_ORDERS, total, delta)
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
  def ledger(self) -> Ledger:
    """A copy of the RDP ledger of admitted steps (provenance)."""
    return self._ledger.copy()

  def _cost(self, spec: StepSpec, count: int) -> np.ndarray:
    spec, count = _validate_run(spec, count, 'rdp')
    if spec.truncation_probability > 0.0:
      raise ValueError(
          f'RdpFilter cannot admit truncated Poisson steps (truncated_batch_size='
          f'{spec.truncated_batch_size}, dataset_size={spec.dataset_size}): they have no RDP '
          'bound in dp-accounting. Use a batch size that cannot truncate.')
    return count * rdp_vector(spec, self._orders)

  def admit(self, spec: StepSpec, count: int = 1) -> bool:
    """True iff ``count`` more steps of ``spec`` keep every order within its budget."""
    after = self._spent + self._cost(spec, count)
    return bool(np.all(after <= self._budget))

  def spend(self, spec: StepSpec, count: int = 1) -> None:
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
    d = self._delta if delta is None else check_delta(delta)
    return min(float(rdp_lib.compute_epsilon([a], [b], d)[0])
               for a, b in zip(self._orders, self._budget))

  def spent_epsilon(self, delta: Optional[float] = None) -> float:
    """ε converted from the realised spend (≤ ``epsilon_bound``; informative for adaptive runs)."""
    d = self._delta if delta is None else check_delta(delta)
    return min(float(rdp_lib.compute_epsilon([a], [r], d)[0])
               for a, r in zip(self._orders, self._spent))
