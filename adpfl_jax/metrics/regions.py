"""Evaluation regions from label maps and per-case / aggregate scoring (host-side NumPy).

Tasks and regions (`docs/datasets.md` §1.5, §2.4, §3.4):

| task          | label values                            | regions (labels)                |
|---------------|-----------------------------------------|---------------------------------|
| `'kits23'`    | 0 bg, 1 kidney, 2 tumor, 3 cyst         | kidney_and_mass (1, 2, 3),      |
|               |                                         | mass (2, 3), tumor (2)          |
| `'kits19'`    | 0 bg, 1 kidney, 2 tumor                 | kidney_and_tumor (1, 2),        |
|               |                                         | tumor (2)                       |
| `'brats2024'` | 0, 1 NETC, 2 SNFH, 3 ET, 4 RC           | WT (1, 2, 3), TC (1, 3), ET (3),|
|               |                                         | NETC (1), SNFH (2), RC (4)      |
| `'brats2023'` | 0, 1 NETC, 2 SNFH, 3 ET                 | WT (1, 2, 3), TC (1, 3), ET (3) |
| `'brats2021'` | 0, 1 NCR/NET, 2 ED, 4 ET (no 3)         | WT (1, 2, 4), TC (1, 4), ET (4) |
| `'skin'`      | 0 bg, 1 lesion (loader maps PNG 255->1) | lesion (1)                      |

Label maps are checked: a value outside the task's label set raises ValueError (this catches,
e.g., BraTS 2021 maps scored as BraTS 2024, or skin masks still in 0/255).

Defaults per task (`DEFAULT_CONVENTION`, `NSD_TOLERANCES_MM`):

* KiTS23: convention `'kits'` (Dice / NSD: both empty 1, one empty 0) and the official
  HEC-specific surface-Dice tolerances. KiTS19 uses `'kits'` and 1.0 mm (no official NSD).
* BraTS 2024: `'brats2024'` (Dice both empty 1, HD95 both empty 0, one empty 337); BraTS
  2023 and 2021 (240 x 240 x 155): `'brats2023'` (penalty 374). NSD tolerance 1.0 mm (the BraTS
  scorer also reports 0.5 mm: ask for `'nsd@0.5'`).
  Deviation: the BraTS scorer computes its legacy NSD on medpy-style border voxels; here every
  NSD uses DeepMind surfels.
* Skin: `'deepmind'` (the ISIC ground truth is never empty) and tolerance 1.0 in spacing units
  (pass spacing (1, 1) for pixels).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from adpfl_jax.metrics import surface

REGIONS: dict[str, dict[str, tuple[int, ...]]] = {
    'kits23': {'kidney_and_mass': (1, 2, 3), 'mass': (2, 3), 'tumor': (2,)},
    'kits19': {'kidney_and_tumor': (1, 2), 'tumor': (2,)},
    'brats2024': {'WT': (1, 2, 3), 'TC': (1, 3), 'ET': (3,), 'NETC': (1,), 'SNFH': (2,),
                  'RC': (4,)},
    'brats2023': {'WT': (1, 2, 3), 'TC': (1, 3), 'ET': (3,)},
    'brats2021': {'WT': (1, 2, 4), 'TC': (1, 4), 'ET': (4,)},
    'skin': {'lesion': (1,)},
}

LABEL_VALUES: dict[str, tuple[int, ...]] = {
    'kits23': (0, 1, 2, 3),
    'kits19': (0, 1, 2),
    'brats2024': (0, 1, 2, 3, 4),
    'brats2023': (0, 1, 2, 3),
    'brats2021': (0, 1, 2, 4),
    'skin': (0, 1),
}

# KiTS23 official surface-Dice tolerances per HEC [kits23 `kits23/configuration/labels.py`].
KITS23_NSD_TOLERANCES_MM = {
    'kidney_and_mass': 1.0330772532390826,
    'mass': 1.1328796488598762,
    'tumor': 1.1498198361434828,
}

NSD_TOLERANCES_MM: dict[str, dict[str, float]] = {
    'kits23': dict(KITS23_NSD_TOLERANCES_MM),
    'kits19': {'kidney_and_tumor': 1.0, 'tumor': 1.0},
    'brats2024': {r: 1.0 for r in REGIONS['brats2024']},
    'brats2023': {r: 1.0 for r in REGIONS['brats2023']},
    'brats2021': {r: 1.0 for r in REGIONS['brats2021']},
    'skin': {'lesion': 1.0},
}

DEFAULT_CONVENTION: dict[str, str] = {
    'kits23': 'kits',
    'kits19': 'kits',
    'brats2024': 'brats2024',
    'brats2023': 'brats2023',
    'brats2021': 'brats2023',
    'skin': 'deepmind',
}

DEFAULT_METRICS = ('dice', 'iou', 'hd95', 'assd', 'nsd')


def _check_task(task: str) -> None:
  if task not in REGIONS:
    raise ValueError(f'Unknown task {task!r}; expected one of {sorted(REGIONS)}.')


def _as_labels(label_volume: np.ndarray, task: str, name: str) -> np.ndarray:
  """Validates a label map (integral values inside the task's label set)."""
  labels = np.asarray(label_volume)
  if labels.ndim not in (2, 3):
    raise ValueError(f'{name} must be a 2D or 3D label map, got shape {labels.shape}.')
  if labels.dtype == np.bool_:
    labels = labels.astype(np.uint8)
  elif np.issubdtype(labels.dtype, np.floating):
    if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
      raise ValueError(f'{name} must hold integer labels, found non-integral values.')
  elif not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{name} must be an integer or float label map, got dtype {labels.dtype}.')
  present = np.unique(labels)
  bad = sorted(set(present.tolist()) - set(LABEL_VALUES[task]))
  if bad:
    raise ValueError(f'{name} has label values {bad} not valid for task {task!r} '
                     f'(allowed {list(LABEL_VALUES[task])}).')
  return labels


def region_masks(label_volume: np.ndarray, task: str) -> dict[str, np.ndarray]:
  """Binary evaluation-region masks of a label map.

  Args:
    label_volume: integer (or integral float, as read from NIfTI) label map, 2D or 3D.
    task: a key of `REGIONS`.

  Returns:
    dict region name -> bool mask, in `REGIONS[task]` order.
  """
  _check_task(task)
  labels = _as_labels(label_volume, task, 'label_volume')
  return {name: np.isin(labels, values) for name, values in REGIONS[task].items()}


def evaluate_case(pred_labels: np.ndarray, true_labels: np.ndarray, spacing: Sequence[float],
                  task: str, metrics: Sequence[str] = DEFAULT_METRICS, *,
                  convention: surface.Convention | None = None,
                  nsd_tolerances_mm: Mapping[str, float] | None = None,
                  ) -> dict[str, dict[str, float]]:
  """Scores one case on every evaluation region of a task.

  Args:
    pred_labels: predicted label map, same shape as `true_labels`.
    true_labels: ground-truth label map.
    spacing: voxel spacing in mm per array axis.
    task: a key of `REGIONS`.
    metrics: metric names, see `surface.METRIC_NAMES_HELP`; 'nsd' uses the per-region tolerance.
    convention: empty-mask convention; default `DEFAULT_CONVENTION[task]`.
    nsd_tolerances_mm: per-region tolerance overrides for 'nsd'; default `NSD_TOLERANCES_MM[task]`.

  Returns:
    dict region -> dict metric -> value.
  """
  _check_task(task)
  surface.check_metric_names(metrics)
  pred = _as_labels(pred_labels, task, 'pred_labels')
  truth = _as_labels(true_labels, task, 'true_labels')
  if pred.shape != truth.shape:
    raise ValueError(f'pred_labels and true_labels shapes differ: {pred.shape} vs {truth.shape}.')
  convention = DEFAULT_CONVENTION[task] if convention is None else convention
  tolerances = dict(NSD_TOLERANCES_MM[task])
  if nsd_tolerances_mm is not None:
    unknown = sorted(set(nsd_tolerances_mm) - set(REGIONS[task]))
    if unknown:
      raise ValueError(f'nsd_tolerances_mm has regions {unknown} not in task {task!r}.')
    tolerances.update(nsd_tolerances_mm)
  results = {}
  for region, values in REGIONS[task].items():
    results[region] = surface.compute_metrics(
        np.isin(pred, values), np.isin(truth, values), spacing, metrics,
        convention=convention, nsd_tolerance_mm=tolerances[region])
  return results


def aggregate(case_results: Sequence[Mapping[str, Mapping[str, float]]],
              nan_policy: str = 'omit') -> dict[str, dict[str, float]]:
  """Mean of every region/metric over cases.

  NaN handling. With the challenge conventions (`'kits'`, `'brats2024'`, `'brats2023'`) no
  per-case value is NaN: a miss scores Dice 0 and a finite penalty or inf distance, so it always
  counts. NaN only comes from the `'deepmind'` convention when *both* masks are empty (nothing to
  score); `nan_policy='omit'` (default) leaves such cases out, like MONAI's reduction, except that
  an all-NaN column gives NaN rather than MONAI's 0. inf is never dropped (the mean is inf).
  `'propagate'` keeps NaN, `'raise'` raises on the first NaN.

  Args:
    case_results: per-case outputs of `evaluate_case` (or `lesionwise.lesionwise_case`), all with
      the same regions and metrics.
    nan_policy: 'omit', 'propagate' or 'raise'.

  Returns:
    dict region -> dict metric -> mean.
  """
  if nan_policy not in ('omit', 'propagate', 'raise'):
    raise ValueError(f"nan_policy must be 'omit', 'propagate' or 'raise', got {nan_policy!r}.")
  if not case_results:
    raise ValueError('aggregate needs at least one case result.')
  layout = {r: tuple(m) for r, m in case_results[0].items()}
  columns: dict[tuple[str, str], list[float]] = {(r, m): [] for r, ms in layout.items() for m in ms}
  for i, case in enumerate(case_results):
    case_layout = {r: tuple(m) for r, m in case.items()}
    if case_layout != layout:
      raise ValueError(f'case_results[{i}] has regions/metrics {case_layout}, '
                       f'but case_results[0] has {layout}.')
    for region, values in case.items():
      for metric, value in values.items():
        value = float(value)
        if math.isnan(value) and nan_policy == 'raise':
          raise ValueError(f'NaN for case {i}, region {region!r}, metric {metric!r}.')
        columns[(region, metric)].append(value)
  out: dict[str, dict[str, float]] = {r: {} for r in layout}
  for (region, metric), values in columns.items():
    arr = np.asarray(values, dtype=np.float64)
    if nan_policy == 'omit':
      arr = arr[~np.isnan(arr)]
    out[region][metric] = float(np.mean(arr)) if arr.size else math.nan
  return out
