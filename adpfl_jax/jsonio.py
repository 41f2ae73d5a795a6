"""Strict JSON for every file and line the project writes.

Python's ``json`` writes ``Infinity`` and ``NaN`` for non-finite floats, which is not JSON (RFC 8259)
and breaks other readers (``jq``, JavaScript, pandas with ``lines=True`` in strict mode). Here a
non-finite float becomes ``null``, and ``allow_nan=False`` makes a missed case an error instead of
a silent ``Infinity``. Where a non-finite value carries meaning (ε = ∞ of a non-private run), the
writer states it next to the value (e.g. ``privacy_mode: "none"``, ``epsilon_is_finite: false``).
NumPy scalars and arrays are converted to plain numbers and lists.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def sanitize(obj: Any) -> Any:
  """A copy of ``obj`` with plain Python types and ``None`` for every non-finite float."""
  if isinstance(obj, dict):
    return {str(k): sanitize(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [sanitize(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return sanitize(obj.tolist())
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    value = float(obj)
    return value if math.isfinite(value) else None
  return obj


def unbounded(value) -> float:
  """Reads back a value written by ``sanitize`` whose ``null`` means +∞ (ε of a non-private run,
  HD95 of a missed structure)."""
  return math.inf if value is None else float(value)


def dumps(obj: Any, **kwargs) -> str:
  """``json.dumps`` of ``sanitize(obj)``; never writes ``Infinity`` or ``NaN``."""
  return json.dumps(sanitize(obj), allow_nan=False, **kwargs)


def dump(obj: Any, fp, **kwargs) -> None:
  fp.write(dumps(obj, **kwargs))


def write(path: str, obj: Any, **kwargs) -> None:
  """Writes ``obj`` to ``path`` atomically (a temporary file renamed over the target)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    dump(obj, f, **kwargs)
    f.write('\n')
  os.replace(tmp, path)
