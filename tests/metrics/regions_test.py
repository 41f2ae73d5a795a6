"""Tests for adpfl_jax.metrics.regions and adpfl_jax.metrics.lesionwise.

Region definitions and tolerances come from docs/datasets.md §2.4, §2.5, §3.4; lesion-wise rules from
§3.5. Expected values are worked out by hand in the comments.
"""

import math

import numpy as np
import pytest

from adpfl_jax.metrics import lesionwise
from adpfl_jax.metrics import regions
from adpfl_jax.metrics import surface

# ------------------------------------------------------------------------------------------------
# Region definitions.
# ------------------------------------------------------------------------------------------------


def test_region_tables_match_docs():
  assert regions.REGIONS['kits23'] == {'kidney_and_mass': (1, 2, 3), 'mass': (2, 3),
                                       'tumor': (2,)}
  assert regions.REGIONS['brats2024'] == {'WT': (1, 2, 3), 'TC': (1, 3), 'ET': (3,),
                                          'NETC': (1,), 'SNFH': (2,), 'RC': (4,)}
  assert regions.REGIONS['brats2021'] == {'WT': (1, 2, 4), 'TC': (1, 4), 'ET': (4,)}
  assert regions.NSD_TOLERANCES_MM['kits23'] == {
      'kidney_and_mass': 1.0330772532390826, 'mass': 1.1328796488598762,
      'tumor': 1.1498198361434828}


def _one_voxel_per_label(values):
  """A 1 x 1 x len(values) volume holding each value once."""
  return np.asarray(values, dtype=np.int16).reshape(1, 1, -1)


def test_kits23_region_masks():
  vol = _one_voxel_per_label([0, 1, 2, 3])  # background, kidney, tumor, cyst
  masks = regions.region_masks(vol, 'kits23')
  assert list(masks) == ['kidney_and_mass', 'mass', 'tumor']
  np.testing.assert_array_equal(masks['kidney_and_mass'].ravel(), [0, 1, 1, 1])
  np.testing.assert_array_equal(masks['mass'].ravel(), [0, 0, 1, 1])
  np.testing.assert_array_equal(masks['tumor'].ravel(), [0, 0, 1, 0])
  assert all(m.dtype == np.bool_ for m in masks.values())


def test_brats2024_region_masks():
  vol = _one_voxel_per_label([0, 1, 2, 3, 4])  # bg, NETC, SNFH, ET, RC
  masks = regions.region_masks(vol, 'brats2024')
  expected = {'WT': [0, 1, 1, 1, 0], 'TC': [0, 1, 0, 1, 0], 'ET': [0, 0, 0, 1, 0],
              'NETC': [0, 1, 0, 0, 0], 'SNFH': [0, 0, 1, 0, 0], 'RC': [0, 0, 0, 0, 1]}
  for name, values in expected.items():
    np.testing.assert_array_equal(masks[name].ravel(), values, err_msg=name)


def test_brats2021_region_masks_and_float_labels():
  vol = _one_voxel_per_label([0, 1, 2, 4]).astype(np.float64)  # as read by nibabel get_fdata
  masks = regions.region_masks(vol, 'brats2021')
  np.testing.assert_array_equal(masks['WT'].ravel(), [0, 1, 1, 1])
  np.testing.assert_array_equal(masks['TC'].ravel(), [0, 1, 0, 1])
  np.testing.assert_array_equal(masks['ET'].ravel(), [0, 0, 0, 1])


def test_invalid_labels_and_tasks_raise():
  with pytest.raises(ValueError, match=r"\[3\] not valid for task 'brats2021'"):
    regions.region_masks(_one_voxel_per_label([0, 3]), 'brats2021')
  with pytest.raises(ValueError, match=r"\[255\] not valid for task 'skin'"):
    regions.region_masks(np.array([[0, 255]]), 'skin')
  with pytest.raises(ValueError, match='non-integral'):
    regions.region_masks(np.array([[0.0, 0.5]]), 'skin')
  with pytest.raises(ValueError, match='Unknown task'):
    regions.region_masks(np.zeros((2, 2)), 'kits21')


# ------------------------------------------------------------------------------------------------
# evaluate_case.
# ------------------------------------------------------------------------------------------------


def _kits_volume():
  vol = np.zeros((10, 10, 10), np.uint8)
  vol[2:8, 2:8, 2:8] = 1  # kidney
  vol[3:5, 3:5, 3:5] = 2  # tumor
  return vol


def test_evaluate_case_kits_perfect_and_empty_rules():
  truth = _kits_volume()
  result = regions.evaluate_case(truth, truth, (1.0, 0.8, 0.8), 'kits23')
  assert set(result) == {'kidney_and_mass', 'mass', 'tumor'}
  for region, values in result.items():
    assert values == {'dice': 1.0, 'iou': 1.0, 'hd95': 0.0, 'assd': 0.0, 'nsd': 1.0}, region

  # No cyst anywhere, and the prediction misses the tumor: KiTS23 rules (docs/datasets.md §2.5).
  pred = truth.copy()
  pred[pred == 2] = 1
  result = regions.evaluate_case(pred, truth, (1.0, 0.8, 0.8), 'kits23', ['dice', 'nsd'])
  assert result['tumor'] == {'dice': 0.0, 'nsd': 0.0}
  assert result['mass'] == {'dice': 0.0, 'nsd': 0.0}
  assert result['kidney_and_mass'] == {'dice': 1.0, 'nsd': 1.0}
  # Neither has a tumor: both-empty rule gives 1.
  result = regions.evaluate_case(pred, pred, (1.0, 0.8, 0.8), 'kits23', ['dice', 'nsd'])
  assert result['tumor'] == {'dice': 1.0, 'nsd': 1.0}


def test_evaluate_case_uses_region_tolerances():
  rng = np.random.default_rng(0)
  truth = _kits_volume()
  pred = truth.copy()
  pred[rng.random(pred.shape) < 0.1] = 2
  spacing = (1.0, 0.8, 0.8)
  result = regions.evaluate_case(pred, truth, spacing, 'kits23', ['nsd', 'hd95'])
  for region, labels in regions.REGIONS['kits23'].items():
    p, t = np.isin(pred, labels), np.isin(truth, labels)
    tol = regions.KITS23_NSD_TOLERANCES_MM[region]
    assert result[region]['nsd'] == surface.normalized_surface_dice(p, t, spacing, tol)
    assert result[region]['hd95'] == surface.hd95(p, t, spacing)
  override = regions.evaluate_case(pred, truth, spacing, 'kits23', ['nsd'],
                                   nsd_tolerances_mm={'tumor': 5.0})
  p, t = pred == 2, truth == 2
  assert override['tumor']['nsd'] == surface.normalized_surface_dice(p, t, spacing, 5.0)


def test_evaluate_case_brats_penalties():
  truth = np.zeros((8, 8, 8), np.uint8)
  truth[2:6, 2:6, 2:6] = 2  # SNFH
  truth[3:5, 3:5, 3:5] = 3  # ET
  pred = np.where(truth == 3, 1, truth).astype(np.uint8)  # ET predicted as NETC
  result = regions.evaluate_case(pred, truth, (1.0, 1.0, 1.0), 'brats2024', ['dice', 'hd95'])
  assert result['ET'] == {'dice': 0.0, 'hd95': 337.0}  # missed: penalty
  assert result['NETC'] == {'dice': 0.0, 'hd95': 337.0}  # false positive: penalty
  assert result['RC'] == {'dice': 1.0, 'hd95': 0.0}  # both empty
  assert result['WT'] == {'dice': 1.0, 'hd95': 0.0}
  assert result['TC'] == {'dice': 1.0, 'hd95': 0.0}
  result = regions.evaluate_case(np.where(truth == 3, 1, truth), np.where(truth == 3, 4, truth),
                                 (1.0, 1.0, 1.0), 'brats2021', ['hd95'])
  assert result['ET'] == {'hd95': 374.0}


def test_evaluate_case_skin_2d():
  truth = np.zeros((12, 12), np.uint8)
  truth[3:9, 3:9] = 1
  pred = np.zeros_like(truth)
  pred[3:9, 4:10] = 1
  result = regions.evaluate_case(pred, truth, (1.0, 1.0), 'skin', ['dice', 'iou', 'hd'])
  assert result['lesion']['dice'] == pytest.approx(2 * 30 / 72)
  assert result['lesion']['iou'] == pytest.approx(30 / 42)
  assert result['lesion']['hd'] == 1.0


def test_evaluate_case_errors():
  vol = _kits_volume()
  with pytest.raises(ValueError, match='shapes differ'):
    regions.evaluate_case(vol, vol[:-1], (1, 1, 1), 'kits23')
  with pytest.raises(ValueError, match='Unknown metric'):
    regions.evaluate_case(vol, vol, (1, 1, 1), 'kits23', ['dcie'])
  with pytest.raises(ValueError, match='not in task'):
    regions.evaluate_case(vol, vol, (1, 1, 1), 'kits23', nsd_tolerances_mm={'kidney': 1.0})


# ------------------------------------------------------------------------------------------------
# aggregate.
# ------------------------------------------------------------------------------------------------


def test_aggregate_nan_policies():
  cases = [{'WT': {'dice': 1.0, 'hd95': 2.0}},
           {'WT': {'dice': math.nan, 'hd95': 4.0}},
           {'WT': {'dice': 0.5, 'hd95': math.inf}}]
  out = regions.aggregate(cases)
  assert out['WT']['dice'] == 0.75  # the NaN (both empty) case is left out
  assert out['WT']['hd95'] == math.inf  # inf is never dropped
  assert math.isnan(regions.aggregate(cases, nan_policy='propagate')['WT']['dice'])
  with pytest.raises(ValueError, match="case 1, region 'WT', metric 'dice'"):
    regions.aggregate(cases, nan_policy='raise')
  assert math.isnan(regions.aggregate([{'ET': {'dice': math.nan}}])['ET']['dice'])
  with pytest.raises(ValueError, match=r'case_results\[1\]'):
    regions.aggregate([{'WT': {'dice': 1.0}}, {'TC': {'dice': 1.0}}])
  with pytest.raises(ValueError, match='nan_policy'):
    regions.aggregate(cases, nan_policy='skip')


def test_aggregate_of_evaluate_case():
  truth = _kits_volume()
  pred = truth.copy()
  pred[pred == 2] = 1
  per_case = [regions.evaluate_case(p, truth, (1, 1, 1), 'kits23', ['dice'])
              for p in (truth, pred)]
  out = regions.aggregate(per_case)
  assert out['tumor']['dice'] == 0.5  # (1 + 0) / 2
  assert out['kidney_and_mass']['dice'] == 1.0


# ------------------------------------------------------------------------------------------------
# Lesion-wise BraTS metrics.
# ------------------------------------------------------------------------------------------------

_CONFIG = lesionwise.LesionwiseConfig(dilation_iterations=3, gt_min_volume_mm3=20.0,
                                      pred_min_voxels=20, hd95_penalty=337.0)


def _two_lesions_one_fp():
  """Two 4^3 ground-truth lesions; A predicted exactly, B shifted by one voxel; one FP cube."""
  truth = np.zeros((40, 40, 40), bool)
  pred = np.zeros((40, 40, 40), bool)
  truth[5:9, 5:9, 5:9] = True  # lesion A, 64 voxels
  truth[25:29, 25:29, 25:29] = True  # lesion B, 64 voxels
  pred[5:9, 5:9, 5:9] = True  # A exactly: Dice 1, HD95 0
  pred[26:30, 25:29, 25:29] = True  # B shifted along axis 0: overlap 48 -> Dice 96/128 = 0.75
  pred[5:9, 25:29, 5:9] = True  # false positive, far from both
  return pred, truth


def test_lesionwise_two_lesions_one_false_positive():
  pred, truth = _two_lesions_one_fp()
  result = lesionwise.lesionwise_region(pred, truth, (1.0, 1.0, 1.0), _CONFIG)
  assert (result.num_tp, result.num_fp, result.num_fn) == (2, 1, 0)
  dice_by_volume = sorted(s.dice for s in result.lesions)
  assert dice_by_volume == pytest.approx([0.75, 1.0])
  # Shifting a cube by one voxel: every surfel is 0 or 1 mm from the other surface, and the
  # 1 mm ones (a whole face layer) hold more than 5% of the area, so HD95 = 1.
  assert sorted(s.hd95 for s in result.lesions) == [0.0, 1.0]
  # L = 2 lesions, FP = 1: Dice (1 + 0.75) / 3, HD95 (0 + 1 + 337) / 3.
  assert result.lesionwise_dice == pytest.approx(1.75 / 3)
  assert result.lesionwise_hd95 == pytest.approx(338 / 3)
  # Legacy Dice over the whole region: 2 * (64 + 48) / (128 + 192).
  assert result.legacy_dice == pytest.approx(0.7)


def test_lesionwise_missed_lesion_small_lesions_and_merging():
  truth = np.zeros((30, 30, 30), bool)
  pred = np.zeros((30, 30, 30), bool)
  # GT lesion made of two 3^3 blobs 2 voxels apart: merged into one lesion by dilation.
  truth[3:6, 3:6, 3:6] = True
  truth[3:6, 3:6, 8:11] = True
  # A small GT lesion (8 mm³ <= 20) that is missed: not counted as FN.
  truth[20:22, 20:22, 20:22] = True
  # A small predicted blob (8 voxels <= 20) far away: removed, so not a FP.
  pred[20:22, 3:5, 3:5] = True
  result = lesionwise.lesionwise_region(pred, truth, (1.0, 1.0, 1.0), _CONFIG)
  assert len(result.lesions) == 2
  assert sorted(s.volume_mm3 for s in result.lesions) == [8.0, 54.0]
  assert (result.num_tp, result.num_fp, result.num_fn) == (0, 0, 1)
  # One counted lesion, missed: Dice 0, HD95 penalty.
  assert result.lesionwise_dice == 0.0
  assert result.lesionwise_hd95 == 337.0
  assert result.legacy_dice == 0.0 and result.legacy_hd95 == 337.0  # prediction filtered away
  # Without prediction filtering the small blob is a FP: Dice 0 / 2, HD95 (337 + 337) / 2.
  keep_all = lesionwise.LesionwiseConfig(3, 20.0, 0)
  result = lesionwise.lesionwise_region(pred, truth, (1.0, 1.0, 1.0), keep_all)
  assert (result.num_tp, result.num_fp, result.num_fn) == (0, 1, 1)
  assert result.lesionwise_hd95 == 337.0


def test_lesionwise_empty_and_fp_only():
  empty = np.zeros((10, 10, 10), bool)
  result = lesionwise.lesionwise_region(empty, empty, (1.0, 1.0, 1.0), _CONFIG)
  assert (result.lesionwise_dice, result.lesionwise_hd95) == (1.0, 0.0)
  assert (result.legacy_dice, result.legacy_hd95) == (1.0, 0.0)
  fp = empty.copy()
  fp[2:7, 2:7, 2:7] = True  # 125 voxels, kept
  result = lesionwise.lesionwise_region(fp, empty, (1.0, 1.0, 1.0), _CONFIG)
  assert (result.num_tp, result.num_fp, result.num_fn) == (0, 1, 0)
  assert (result.lesionwise_dice, result.lesionwise_hd95) == (0.0, 337.0)


def test_lesionwise_case_brats2024():
  pred_mask, true_mask = _two_lesions_one_fp()
  # Encode the region as SNFH (label 2): WT = {1, 2, 3} contains it, TC / ET / NETC / RC are empty.
  pred = np.where(pred_mask, 2, 0).astype(np.uint8)
  truth = np.where(true_mask, 2, 0).astype(np.uint8)
  out = lesionwise.lesionwise_case(pred, truth, (1.0, 1.0, 1.0), 'brats2024')
  assert list(out) == ['WT', 'TC', 'ET', 'NETC', 'SNFH', 'RC']
  assert out['WT']['lesionwise_dice'] == pytest.approx(1.75 / 3)
  assert out['SNFH']['lesionwise_hd95'] == pytest.approx(338 / 3)
  assert out['ET'] == {'lesionwise_dice': 1.0, 'lesionwise_hd95': 0.0, 'num_tp': 0.0,
                       'num_fp': 0.0, 'num_fn': 0.0, 'legacy_dice': 1.0, 'legacy_hd95': 0.0}
  agg = regions.aggregate([out, out])
  assert agg['WT']['num_fp'] == 1.0


def test_brats2024_presets_match_docs():
  cfg = lesionwise.BRATS2024_GLI
  assert {r: c.dilation_iterations for r, c in cfg.items()} == {
      'WT': 3, 'TC': 3, 'NETC': 5, 'SNFH': 3, 'ET': 3, 'RC': 5}
  assert {r: c.pred_min_voxels for r, c in cfg.items()} == {
      'WT': 20, 'TC': 20, 'NETC': 20, 'SNFH': 20, 'ET': 10, 'RC': 20}
  assert all(c.hd95_penalty == 337.0 for c in cfg.values())
  assert all(c.hd95_penalty == 374.0 and c.gt_min_volume_mm3 == 50.0
             for c in lesionwise.BRATS2023_GLI.values())
