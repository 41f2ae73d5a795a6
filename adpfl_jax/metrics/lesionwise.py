"""BraTS lesion-wise Dice and HD95 (host-side NumPy/SciPy), after `docs/datasets.md` §3.5.

Per region (WT, TC, ET, NETC, SNFH, RC for BraTS 2024 GLI):

1. Lesions are 26-connected components (full 3 x 3 x 3 structure; `scipy.ndimage.label` in place
   of `cc3d`). Components of the ground truth that fall in one connected component of the mask
   dilated `dilation_iterations` times with `generate_binary_structure(3, 2)` (18-connectivity)
   are merged into one lesion.
2. The prediction gets the same merging (BraTS 2024; BraTS 2023 does not merge), then predicted
   lesions with at most `pred_min_voxels` voxels are removed (BraTS 2024: 10 for ET, 20 otherwise;
   BraTS 2023: none).
3. For each ground-truth lesion g, the predicted lesions intersecting g dilated by
   `dilation_iterations` are its matches; lesion Dice = Dice(union of matches, g), lesion HD95 =
   DeepMind HD95 between g and that union. A lesion without a match scores Dice 0 and HD95
   `hd95_penalty`.
4. Ground-truth lesions with volume (voxels x voxel volume in mm³) <= `gt_min_volume_mm3` are
   dropped from the scores and from the TP/FN counts; predicted lesions matched only to such a
   lesion are still not false positives (as in the official code).
5. Predicted lesions matched to no ground-truth lesion are false positives (FP):
   LesionWise_Dice = Σ dice_l / (L + FP), LesionWise_HD95 = (Σ hd95_l + penalty · FP) / (L + FP)
   over the L retained lesions; with L + FP = 0, Dice 1 and HD95 0.

Legacy whole-region Dice / HD95 are returned too, computed like the official scorer on the
prediction *after* step 2 (BraTS 2024): Dice both empty 1; HD95 both empty 0, one empty penalty.

Presets: `BRATS2024_GLI` (dilation 3, but 5 for NETC and RC: the official code's test of the
misspelt `"SFNH"` leaves SNFH at 3; GT and prediction thresholds 10 for ET and 20 otherwise;
penalty 337) and `BRATS2023_GLI` (WT/TC/ET, dilation 3, GT threshold 50 mm³, no prediction
merging or removal, penalty 374; use it for the BraTS 2021 label convention too).

Deviations from the official BraTS 2024 scorer:
* The cross-tissue relabelling (`combine_lesions_tissues`, which gives one physical lesion one id
  across NETC/ET/RC/SNFH and can merge same-tissue lesions that touch a common lesion of another
  tissue) is not implemented: each region uses its own connected components only.
* Lesion ids follow `scipy.ndimage.label` numbering rather than `cc3d`'s; scores do not depend
  on ids.
* 2D masks are accepted (full 8-connectivity for lesions and for the dilation); the official
  scorer is 3D only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from adpfl_jax.metrics import regions
from adpfl_jax.metrics import surface


@dataclasses.dataclass(frozen=True)
class LesionwiseConfig:
  """Parameters of lesion-wise scoring for one region.

  Attributes:
    dilation_iterations: iterations of 18-connected dilation, for merging and matching.
    gt_min_volume_mm3: ground-truth lesions with volume <= this (mm³) are not scored.
    pred_min_voxels: predicted lesions with <= this many voxels are removed (0 keeps all).
    merge_pred_by_dilation: merge predicted components by dilation, like the ground truth.
    hd95_penalty: HD95 of a missed lesion and of each false positive.
  """

  dilation_iterations: int = 3
  gt_min_volume_mm3: float = 20.0
  pred_min_voxels: int = 20
  merge_pred_by_dilation: bool = True
  hd95_penalty: float = surface.BRATS2024_HD95_PENALTY


BRATS2024_GLI: dict[str, LesionwiseConfig] = {
    'WT': LesionwiseConfig(3, 20.0, 20),
    'TC': LesionwiseConfig(3, 20.0, 20),
    'NETC': LesionwiseConfig(5, 20.0, 20),
    'SNFH': LesionwiseConfig(3, 20.0, 20),
    'ET': LesionwiseConfig(3, 10.0, 10),
    'RC': LesionwiseConfig(5, 20.0, 20),
}

_BRATS2023 = LesionwiseConfig(3, 50.0, 0, merge_pred_by_dilation=False,
                              hd95_penalty=surface.BRATS2023_HD95_PENALTY)
BRATS2023_GLI: dict[str, LesionwiseConfig] = {'WT': _BRATS2023, 'TC': _BRATS2023,
                                              'ET': _BRATS2023}

PRESETS: dict[str, dict[str, LesionwiseConfig]] = {
    'brats2024': BRATS2024_GLI,
    'brats2023': BRATS2023_GLI,
    'brats2021': BRATS2023_GLI,
}


@dataclasses.dataclass(frozen=True)
class LesionScore:
  """Score of one ground-truth lesion.

  Attributes:
    gt_id: lesion id in the merged ground-truth labelling.
    volume_mm3: lesion volume.
    matched_pred_ids: ids of the matched predicted lesions.
    dice: lesion Dice.
    hd95: lesion HD95 in mm (penalty when unmatched).
    counted: False when the lesion is at or below the volume threshold and not scored.
  """

  gt_id: int
  volume_mm3: float
  matched_pred_ids: tuple[int, ...]
  dice: float
  hd95: float
  counted: bool


@dataclasses.dataclass(frozen=True)
class LesionwiseResult:
  """Lesion-wise scores of one region of one case."""

  lesionwise_dice: float
  lesionwise_hd95: float
  num_tp: int
  num_fp: int
  num_fn: int
  legacy_dice: float
  legacy_hd95: float
  lesions: tuple[LesionScore, ...]

  def scalars(self) -> dict[str, float]:
    """The scalar fields as floats (the shape `regions.aggregate` takes)."""
    return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)
            if f.name != 'lesions'}


def _structures(ndim: int) -> tuple[np.ndarray, np.ndarray]:
  """(full-connectivity labelling structure, dilation structure of connectivity 2)."""
  return (ndimage.generate_binary_structure(ndim, ndim),
          ndimage.generate_binary_structure(ndim, 2))


def _lesions(mask: np.ndarray, iterations: int, merge: bool) -> np.ndarray:
  """Connected components of `mask`, merged when they share a component of the dilated mask."""
  connect, dilate = _structures(mask.ndim)
  if not merge or iterations == 0:
    return ndimage.label(mask, structure=connect)[0]
  dilated = ndimage.binary_dilation(mask, structure=dilate, iterations=iterations)
  return np.where(mask, ndimage.label(dilated, structure=connect)[0], 0)


def _grown_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
  """Bounding box of `mask` grown by `margin` voxels, clipped to the array."""
  box = []
  for axis in range(mask.ndim):
    hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
    box.append(slice(max(hit[0] - margin, 0), min(hit[-1] + 1 + margin, mask.shape[axis])))
  return tuple(box)


def lesionwise_region(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                      config: LesionwiseConfig = LesionwiseConfig()) -> LesionwiseResult:
  """Lesion-wise Dice / HD95 of one binary region.

  Args:
    pred: bool mask of the predicted region, 2D or 3D.
    truth: bool mask of the ground-truth region, same shape.
    spacing: voxel spacing in mm per array axis.
    config: scoring parameters.

  Returns:
    `LesionwiseResult` with the per-lesion details.
  """
  surface.check_masks(pred, truth)
  spacing = surface.check_spacing(spacing, pred.ndim)
  if config.dilation_iterations < 0 or config.pred_min_voxels < 0:
    raise ValueError(f'dilation_iterations and pred_min_voxels must be >= 0, got {config}.')
  voxel_mm3 = float(np.prod(spacing))
  _, dilate = _structures(pred.ndim)
  union = pred | truth
  if union.any():
    # Every step only looks `dilation_iterations` voxels beyond the masks: crop for speed.
    box = _grown_box(union, config.dilation_iterations)
    pred, truth = pred[box], truth[box]

  gt_ids = _lesions(truth, config.dilation_iterations, merge=True)
  pred_ids = _lesions(pred, config.dilation_iterations, config.merge_pred_by_dilation)
  if config.pred_min_voxels > 0 and pred_ids.any():
    counts = np.bincount(pred_ids.ravel())
    small = np.flatnonzero(counts <= config.pred_min_voxels)
    small = small[small != 0]
    if small.size:
      pred_ids = np.where(np.isin(pred_ids, small), 0, pred_ids)
  kept_pred = pred_ids > 0

  lesions = []
  matched_any: set[int] = set()
  for gt_id in range(1, int(gt_ids.max(initial=0)) + 1):
    lesion = gt_ids == gt_id
    if not lesion.any():
      continue
    box = _grown_box(lesion, config.dilation_iterations)
    grown = ndimage.binary_dilation(lesion[box], structure=dilate,
                                    iterations=config.dilation_iterations)
    hits = np.unique(pred_ids[box][grown])
    hits = tuple(int(h) for h in hits[hits != 0])
    matched_any.update(hits)
    volume = int(np.count_nonzero(lesion)) * voxel_mm3
    if hits:
      matched = np.isin(pred_ids, hits)
      dice = surface.dice(matched, lesion)
      hd95 = surface.hd95(matched, lesion, spacing)
    else:
      dice, hd95 = 0.0, math.inf
    if math.isinf(hd95):
      hd95 = config.hd95_penalty
    lesions.append(LesionScore(gt_id, volume, hits, dice, hd95,
                               counted=volume > config.gt_min_volume_mm3))

  all_pred = set(int(i) for i in np.unique(pred_ids[kept_pred]))
  num_fp = len(all_pred - matched_any)
  counted = [s for s in lesions if s.counted]
  num_tp = sum(1 for s in counted if s.matched_pred_ids)
  num_fn = len(counted) - num_tp
  denominator = len(counted) + num_fp
  if denominator == 0:
    lw_dice, lw_hd95 = 1.0, 0.0
  else:
    lw_dice = sum(s.dice for s in counted) / denominator
    lw_hd95 = (sum(s.hd95 for s in counted) + config.hd95_penalty * num_fp) / denominator

  policy = surface.EmptyPolicy(overlap_both_empty=1.0, distance_both_empty=0.0,
                               distance_one_empty=config.hd95_penalty)
  legacy_dice = surface.dice(kept_pred, truth, convention=policy)
  legacy_hd95 = surface.hd95(kept_pred, truth, spacing, convention=policy)
  return LesionwiseResult(lw_dice, lw_hd95, num_tp, num_fp, num_fn, legacy_dice, legacy_hd95,
                          tuple(lesions))


def lesionwise_case(pred_labels: np.ndarray, true_labels: np.ndarray, spacing: Sequence[float],
                    task: str = 'brats2024',
                    configs: Mapping[str, LesionwiseConfig] | None = None,
                    ) -> dict[str, dict[str, float]]:
  """Lesion-wise scores for every region of a BraTS case.

  Args:
    pred_labels: predicted label map.
    true_labels: ground-truth label map, same shape.
    spacing: voxel spacing in mm per array axis.
    task: 'brats2024', 'brats2023' or 'brats2021' (regions from `regions.REGIONS`).
    configs: per-region parameters; default `PRESETS[task]`. Regions missing from it are skipped.

  Returns:
    dict region -> `LesionwiseResult.scalars()` (lesionwise_dice, lesionwise_hd95, num_tp,
    num_fp, num_fn, legacy_dice, legacy_hd95), ready for `regions.aggregate`.
  """
  if configs is None:
    if task not in PRESETS:
      raise ValueError(f'No lesion-wise preset for task {task!r}; expected one of '
                       f'{sorted(PRESETS)} or pass configs.')
    configs = PRESETS[task]
  if np.shape(pred_labels) != np.shape(true_labels):
    raise ValueError(f'pred_labels and true_labels shapes differ: '
                     f'{np.shape(pred_labels)} vs {np.shape(true_labels)}.')
  pred_regions = regions.region_masks(pred_labels, task)
  true_regions = regions.region_masks(true_labels, task)
  unknown = sorted(set(configs) - set(pred_regions))
  if unknown:
    raise ValueError(f'configs has regions {unknown} not in task {task!r}.')
  return {region: lesionwise_region(pred_regions[region], true_regions[region], spacing,
                                    configs[region]).scalars()
          for region in pred_regions if region in configs}
