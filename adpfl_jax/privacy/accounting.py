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

Calibration of planned runs lives in ``calibration.py``; the Rényi filter for data-dependent σ in
``filters.py``. ``merge_runs`` is the one run-length encoding of ledgers and plans.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

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
def as_float(value: Any, name: str) -> float:
  if isinstance(value, bool):
    raise ValueError(f'{name} must be a number, got {value!r}')
  try:
    out = float(value)
  except (TypeError, ValueError) as err:
    raise ValueError(f'{name} must be a number, got {value!r}') from err
  if math.isnan(out):
    raise ValueError(f'{name} must not be NaN, got {value!r}')
  return out


def as_int(value: Any, name: str, minimum: int) -> int:
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
  q = as_float(sampling_rate, name)
  if not 0.0 < q <= 1.0:
    raise ValueError(f'{name} must be in (0, 1], got {sampling_rate!r}')
  return q


def check_noise_multiplier(noise_multiplier: Any, name: str = 'noise_multiplier') -> float:
  """Returns ``noise_multiplier`` as a float after checking it is finite and >= 0."""
  z = as_float(noise_multiplier, name)
  if not math.isfinite(z) or z < 0.0:
    raise ValueError(f'{name} must be finite and >= 0 (0 means no noise: ε = inf), got '
                     f'{noise_multiplier!r}')
  return z + 0.0  # Normalises -0.0.


def check_delta(delta: Any, name: str = 'delta') -> float:
  """Returns ``delta`` as a float after checking it lies in (0, 1)."""
  d = as_float(delta, name)
  if not 0.0 < d < 1.0:
    raise ValueError(f'{name} must be in (0, 1), got {delta!r}')
  return d


def check_target_epsilon(target_epsilon: Any, name: str = 'target_epsilon') -> float:
  """Returns ``target_epsilon`` as a float after checking it is finite and > 0."""
  e = as_float(target_epsilon, name)
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
      setattr_('truncated_batch_size', as_int(b, 'truncated_batch_size', 1))
      setattr_('dataset_size', as_int(n, 'dataset_size', 1))
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


def merge_runs(runs: Iterable[tuple[StepSpec, int]]) -> tuple[Run, ...]:
  """Run-length encoding: consecutive equal specs merge into one ``(spec, count)`` run."""
  merged: list[list[Any]] = []
  for spec, count in runs:
    if merged and merged[-1][0] == spec:
      merged[-1][1] += count
    else:
      merged.append([spec, count])
  return tuple((spec, count) for spec, count in merged)


def validate_run(spec: Any, count: Any, accountant: str) -> tuple[StepSpec, int]:
  if not isinstance(spec, StepSpec):
    raise TypeError(f'spec must be a StepSpec, got {type(spec).__name__}: {spec!r}')
  count = as_int(count, 'count', 1)
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
    disc = as_float(pld_discretization, 'pld_discretization')
    if not (math.isfinite(disc) and 0.0 < disc <= 1.0):
      raise ValueError(f'pld_discretization must be in (0, 1], got {pld_discretization!r}')
    self._discretization = disc
    if rdp_orders is None:
      self._orders = DEFAULT_RDP_ORDERS
    else:
      self._orders = tuple(as_float(a, 'rdp_orders') for a in rdp_orders)
      if not self._orders or min(self._orders) <= 1.0:
        raise ValueError(f'rdp_orders must be a non-empty list of orders > 1, got {rdp_orders!r}')
    self._runs: tuple[Run, ...] = ()

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
    return self._runs

  @property
  def steps(self) -> int:
    """Total number of recorded steps."""
    return sum(count for _, count in self._runs)

  def record(self, spec: StepSpec, count: int = 1) -> None:
    """Appends ``count`` steps of ``spec`` (merged into the last run if the spec is equal)."""
    spec, count = validate_run(spec, count, self._accountant)
    self._runs = merge_runs(self._runs + ((spec, count),))

  def extend(self, runs: Iterable[tuple[StepSpec, int]]) -> None:
    """Records every ``(spec, count)`` of ``runs`` in order."""
    for spec, count in runs:
      self.record(spec, count)

  def copy(self) -> 'Ledger':
    other = Ledger(self._accountant, self._relation, self._discretization, self._orders)
    other.extend(self._runs)
    return other

  # -- privacy -----------------------------------------------------------------------------------
  def epsilon(self, delta: float) -> float:
    """ε of everything recorded, at ``delta`` (0 for an empty ledger, inf if any step has z = 0)."""
    return _epsilon_of_runs(self._runs, delta, self._accountant, self._discretization,
                            self._orders)

  def epsilon_if(self, extra: Iterable[tuple[StepSpec, int]], delta: float) -> float:
    """ε after also recording ``extra`` (a list of ``(spec, count)``), without recording it."""
    runs = merge_runs(list(self._runs) +
                      [validate_run(spec, count, self._accountant) for spec, count in extra])
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
