"""Public noise schedules: σ_t = s · shape(t), pure functions of the round t.

A schedule is a *shape* (relative multiplier, fixed before training, so ordinary composition
applies: docs/privacy.md §5.1) times a *scale* s, which ``calibration.calibrate`` fits to an
(ε, δ) budget. Each shape exists as a NumPy host function (float64) and a ``jax.numpy`` function usable
inside ``jit`` with the round as an integer array (float32 unless x64 is enabled).

* 'constant' (no params): 1;
* 'exponential' (rate r > 0): r^t;
* 'step' (factor f > 0, every k ≥ 1): f^⌊t / k⌋;
* 'linear' (start a > 0, end b > 0, rounds R ≥ 1): a + (b − a) · min(t, R − 1) / (R − 1), or a
  if R = 1;
* 'cosine' (start a, end b, rounds R as for linear):
  b + (a − b) · (1 + cos(π · min(t, R − 1) / (R − 1))) / 2.

Negative t is treated as 0. Linear and cosine hold ``end`` after round R − 1. ``rounds`` may be
omitted from ``params`` where the caller knows the horizon (``params_from_config``); the shape
functions require it. The scale s is calibrated by ``calibration.calibrate``.

Device vs host: the device computes σ_t in float32, which can be a few ulps below the float64
host value. Record what the device used (``float(np.float32(...))``), or record the host value
rounded down with ``accounting.quantize_noise``; never a value above the noise actually added.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Union

import jax.numpy as jnp
import numpy as np

from adpfl_jax.privacy import accounting

KINDS = ('constant', 'exponential', 'step', 'linear', 'cosine')
_PARAMS = {
    'constant': (),
    'exponential': ('rate',),
    'step': ('factor', 'every'),
    'linear': ('start', 'end', 'rounds'),
    'cosine': ('start', 'end', 'rounds'),
}


def _number(params: Mapping[str, Any], key: str, kind: str, count: bool) -> float | int:
  """A positive finite number, or (``count``) an integer >= 1; errors name the kind and key."""
  value = params[key]
  what = 'an integer' if count else 'a number'
  try:
    out = float(value)
  except (TypeError, ValueError) as err:
    raise ValueError(f'schedule {kind!r}: param {key}={value!r} must be {what}') from err
  if count:
    if not out.is_integer() or out < 1:
      raise ValueError(f'schedule {kind!r}: param {key}={value!r} must be an integer >= 1')
    return int(out)
  if not (math.isfinite(out) and out > 0):
    raise ValueError(f'schedule {kind!r}: param {key}={value!r} must be finite and > 0')
  return out


def validate_params(kind: str, params: Optional[Mapping[str, Any]] = None,
                    rounds: Optional[int] = None) -> dict[str, Any]:
  """Checks ``params`` for ``kind`` and returns them with canonical types.

  Args:
    kind: one of ``KINDS``.
    params: the shape parameters (see the module table).
    rounds: horizon used for linear/cosine when ``params`` has no 'rounds'.

  Returns:
    A new dict of floats/ints.

  Raises:
    ValueError: naming the kind and the bad or missing key.
  """
  if kind not in _PARAMS:
    raise ValueError(f'schedule kind {kind!r} is not one of {KINDS}')
  params = dict(params or {})
  if kind in ('linear', 'cosine') and 'rounds' not in params and rounds is not None:
    params['rounds'] = rounds
  expected = _PARAMS[kind]
  unknown = sorted(set(params) - set(expected))
  if unknown:
    raise ValueError(f'schedule {kind!r}: unknown params {unknown}; expected {list(expected)}')
  missing = [k for k in expected if k not in params]
  if missing:
    raise ValueError(f'schedule {kind!r}: missing params {missing}; expected {list(expected)}')
  out: dict[str, Any] = {}
  for key in expected:
    out[key] = _number(params, key, kind, count=key in ('every', 'rounds'))
  return out


def _shape(kind: str, params: Mapping[str, Any], t: Any, xp: Any, dtype: Any) -> Any:
  t = xp.maximum(xp.asarray(t), 0)
  if kind == 'constant':
    return xp.ones(xp.shape(t), dtype)
  if kind == 'exponential':
    return xp.power(xp.asarray(params['rate'], dtype), t.astype(dtype))
  if kind == 'step':
    return xp.power(xp.asarray(params['factor'], dtype),
                    xp.floor_divide(t, params['every']).astype(dtype))
  start, end, rounds = params['start'], params['end'], params['rounds']
  if rounds == 1:
    return xp.full(xp.shape(t), start, dtype)
  frac = xp.minimum(t, rounds - 1).astype(dtype) / (rounds - 1)
  if kind == 'linear':
    return start + (end - start) * frac
  return end + (start - end) * (1 + xp.cos(math.pi * frac)) / 2


def shape(kind: str, params: Optional[Mapping[str, Any]], t: Any) -> np.ndarray:
  """Relative multiplier shape(t) on the host (float64), for an int or int array ``t``."""
  p = validate_params(kind, params)
  return _shape(kind, p, np.asarray(t, np.int64), np, np.float64)


def np_schedule(kind: str, params: Optional[Mapping[str, Any]] = None,
                scale: float = 1.0) -> Callable[[Any], np.ndarray]:
  """Host schedule ``t -> scale · shape(t)`` (NumPy float64)."""
  p = validate_params(kind, params)
  s = accounting.check_noise_multiplier(scale, 'scale')

  def fn(t: Any) -> np.ndarray:
    return s * _shape(kind, p, np.asarray(t, np.int64), np, np.float64)

  return fn


def jnp_schedule(kind: str, params: Optional[Mapping[str, Any]] = None,
                 scale: Union[float, Any] = 1.0) -> Callable[[Any], Any]:
  """Device schedule ``t -> scale · shape(t)`` in ``jax.numpy`` (jit-safe; t an int array).

  ``scale`` may be a Python float or a traced array (e.g. the per-silo scale in the controller
  state), so changing it never retraces.
  """
  p = validate_params(kind, params)
  dtype = jnp.result_type(float)

  def fn(t: Any) -> Any:
    return scale * _shape(kind, p, jnp.asarray(t).astype(jnp.int32), jnp, dtype)

  return fn


def noise_multipliers(kind: str, params: Optional[Mapping[str, Any]], scale: float,
                      rounds: int) -> np.ndarray:
  """σ_t = scale · shape(t) for t = 0 .. rounds − 1 (host, float64)."""
  rounds = _number({'rounds': rounds}, 'rounds', kind, count=True)
  return np_schedule(kind, validate_params(kind, params, rounds), scale)(np.arange(rounds))


def params_from_config(kind: str, section: Mapping[str, Any], rounds: int) -> dict[str, Any]:
  """The parameters of schedule ``kind`` from a config section that holds every kind's keys.

  ``rounds`` = 0 (or absent) in the section means the run's ``rounds``.
  """
  if kind not in _PARAMS:
    raise ValueError(f'schedule kind {kind!r} is not one of {KINDS}')
  out = {k: section[k] for k in _PARAMS[kind] if k in section}
  if 'rounds' in _PARAMS[kind] and not out.get('rounds'):
    out['rounds'] = rounds
  return validate_params(kind, out, rounds)
