"""Tests for adpfl_jax.metrics.surface.

Oracles: the golden values of docs/datasets.md §4.4 (DeepMind `surface-distance` tests), the empty-mask
tables of docs/datasets.md §4.1 / §4.3, closed-form surface areas of boxes, and a brute-force
all-pairs implementation written here.
"""

import itertools
import math

import numpy as np
import pytest

from adpfl_jax.metrics import surface


# ------------------------------------------------------------------------------------------------
# Golden values, docs/datasets.md §4.4.
# ------------------------------------------------------------------------------------------------


def _two_points(ndim):
  if ndim == 2:
    shape, gt_at, pred_at, spacing = (128, 128), (50, 70), (50, 72), (2.0, 1.0)
  else:
    shape, gt_at, pred_at, spacing = (100, 100, 100), (50, 60, 70), (50, 60, 72), (3.0, 2.0, 1.0)
  gt, pred = np.zeros(shape, bool), np.zeros(shape, bool)
  gt[gt_at] = True
  pred[pred_at] = True
  return pred, gt, spacing


@pytest.mark.parametrize('ndim', [2, 3])
def test_two_points_golden_values(ndim):
  pred, gt, spacing = _two_points(ndim)
  sd = surface.surface_distances(pred, gt, spacing)
  n_surfels = 2 ** ndim
  expected_d = np.repeat([1.0, 2.0], n_surfels // 2)
  np.testing.assert_allclose(sd.distances_gt_to_pred, expected_d)
  np.testing.assert_allclose(sd.distances_pred_to_gt, expected_d)
  if ndim == 2:
    # Every contour element is a half diagonal of a 2 x 1 mm cell (docs/datasets.md §4.4).
    size = 0.5 * math.sqrt(2.0**2 + 1.0**2)
  else:
    # One-corner triangle with area vector (1, 1, 1) / 8 in voxel units, scaled by cofactors.
    s0, s1, s2 = spacing
    size = math.sqrt((s1 * s2)**2 + (s0 * s2)**2 + (s0 * s1)**2) / 8
  np.testing.assert_allclose(sd.surfel_areas_gt, size)
  np.testing.assert_allclose(sd.surfel_areas_pred, size)

  assert surface.average_surface_distance(sd) == pytest.approx((1.5, 1.5))
  assert surface.robust_hausdorff(sd, 100) == 2.0
  assert surface.robust_hausdorff(sd, 95) == 2.0
  assert surface.surface_overlap(sd, 1.0) == pytest.approx((0.5, 0.5))
  assert surface.surface_dice(sd, 1.0) == pytest.approx(0.5)
  assert surface.dice(pred, gt) == 0.0
  assert surface.hausdorff(pred, gt, spacing) == 2.0
  assert surface.hd95(pred, gt, spacing) == 2.0
  assert surface.assd(pred, gt, spacing) == pytest.approx(1.5)
  assert surface.normalized_surface_dice(pred, gt, spacing, 1.0) == pytest.approx(0.5)


def test_slab_golden_values():
  gt = np.zeros((100, 100, 100), bool)
  pred = np.zeros((100, 100, 100), bool)
  gt[0:50] = True
  pred[0:51] = True
  spacing = (2.0, 1.0, 1.0)
  sd = surface.surface_distances(pred, gt, spacing)
  asd_gt, asd_pred = surface.average_surface_distance(sd)
  assert asd_gt == pytest.approx(0.322, abs=5e-4)
  assert asd_pred == pytest.approx(0.339, abs=5e-4)
  assert surface.robust_hausdorff(sd, 100) == 2.0
  assert surface.robust_hausdorff(sd, 95) == 2.0
  overlap_gt, overlap_pred = surface.surface_overlap(sd, 1.0)
  assert overlap_gt == pytest.approx(0.842, abs=5e-4)
  assert overlap_pred == pytest.approx(0.830, abs=5e-4)
  assert surface.surface_dice(sd, 1.0) == pytest.approx(0.836, abs=5e-4)
  assert surface.dice(pred, gt) == pytest.approx(0.990, abs=5e-4)
  assert surface.dice(pred, gt) == pytest.approx(100 / 101)


# ------------------------------------------------------------------------------------------------
# Empty masks.
# ------------------------------------------------------------------------------------------------


def _blob(ndim):
  mask = np.zeros((6,) * ndim, bool)
  mask[(slice(1, 4),) * ndim] = True
  return mask


@pytest.mark.parametrize('ndim', [2, 3])
def test_deepmind_empty_cases_match_official_table(ndim):
  """docs/datasets.md §4.1: raw DeepMind reductions with empty masks."""
  blob, empty = _blob(ndim), np.zeros((6,) * ndim, bool)
  spacing = (1.0,) * ndim
  nan = math.nan

  def close(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b

  cases = {  # (pred, truth): (ASD pair, HD100, HD95, overlap pair, surface Dice, Dice)
      'empty_pred': ((empty, blob), ((math.inf, nan), math.inf, math.inf, (0.0, nan), 0.0, 0.0)),
      'empty_gt': ((blob, empty), ((nan, math.inf), math.inf, math.inf, (nan, 0.0), 0.0, 0.0)),
      'both': ((empty, empty), ((nan, nan), math.inf, math.inf, (nan, nan), nan, nan)),
  }
  for name, ((pred, gt), (asd, hd, hd95, overlap, sdice, vdice)) in cases.items():
    sd = surface.surface_distances(pred, gt, spacing)
    got = surface.average_surface_distance(sd)
    assert close(got[0], asd[0]) and close(got[1], asd[1]), (name, got)
    assert surface.robust_hausdorff(sd, 100) == hd, name
    assert surface.robust_hausdorff(sd, 95) == hd95, name
    got = surface.surface_overlap(sd, 1.0)
    assert close(got[0], overlap[0]) and close(got[1], overlap[1]), (name, got)
    assert close(surface.surface_dice(sd, 1.0), sdice), name
    assert close(surface.dice(pred, gt), vdice), name
    # Public metrics under the default 'deepmind' convention.
    assert close(surface.normalized_surface_dice(pred, gt, spacing, 1.0), sdice), name
    assert surface.hausdorff(pred, gt, spacing) == hd, name
    assert surface.hd95(pred, gt, spacing) == hd95, name


# Expected (both empty, one empty) per convention and metric, from docs/datasets.md §2.5, §3.5, §4.3.
_CONVENTION_TABLE = {
    'deepmind': {'dice': (math.nan, 0.0), 'iou': (math.nan, 0.0), 'nsd': (math.nan, 0.0),
                 'hd95': (math.inf, math.inf), 'hd': (math.inf, math.inf),
                 'assd': (math.nan, math.inf)},
    'kits': {'dice': (1.0, 0.0), 'iou': (1.0, 0.0), 'nsd': (1.0, 0.0),
             'hd95': (math.inf, math.inf), 'hd': (math.inf, math.inf),
             'assd': (math.nan, math.inf)},
    'brats2024': {'dice': (1.0, 0.0), 'iou': (1.0, 0.0), 'nsd': (1.0, 0.0), 'hd95': (0.0, 337.0),
                  'hd': (0.0, 337.0), 'assd': (0.0, 337.0)},
    'brats2023': {'dice': (1.0, 0.0), 'iou': (1.0, 0.0), 'nsd': (1.0, 0.0), 'hd95': (0.0, 374.0),
                  'hd': (0.0, 374.0), 'assd': (0.0, 374.0)},
}


def _metric(name, pred, gt, spacing, convention):
  if name == 'dice':
    return surface.dice(pred, gt, convention=convention)
  if name == 'iou':
    return surface.iou(pred, gt, convention=convention)
  if name == 'nsd':
    return surface.normalized_surface_dice(pred, gt, spacing, 1.0, convention=convention)
  if name == 'hd95':
    return surface.hd95(pred, gt, spacing, convention=convention)
  if name == 'hd':
    return surface.hausdorff(pred, gt, spacing, convention=convention)
  return surface.assd(pred, gt, spacing, convention=convention)


@pytest.mark.parametrize('convention', sorted(_CONVENTION_TABLE))
@pytest.mark.parametrize('ndim', [2, 3])
def test_empty_conventions(convention, ndim):
  blob, empty = _blob(ndim), np.zeros((6,) * ndim, bool)
  spacing = (1.5,) * ndim
  for metric, (both, one) in _CONVENTION_TABLE[convention].items():
    got_both = _metric(metric, empty, empty, spacing, convention)
    assert got_both == both or (math.isnan(both) and math.isnan(got_both)), (metric, got_both)
    for pred, gt in ((empty, blob), (blob, empty)):
      assert _metric(metric, pred, gt, spacing, convention) == one, metric
    # compute_metrics applies the same convention.
    name = 'nsd@1.0' if metric == 'nsd' else metric
    got = surface.compute_metrics(empty, blob, spacing, [name], convention=convention)[name]
    assert got == one, metric


def test_convention_aliases_and_custom_policy():
  blob, empty = _blob(3), np.zeros((6,) * 3, bool)
  assert surface.hd95(empty, blob, (1, 1, 1), convention='brats') == 337.0
  assert surface.dice(empty, empty, convention='kits23') == 1.0
  policy = surface.EmptyPolicy(overlap_both_empty=0.5, distance_both_empty=7.0,
                               distance_one_empty=99.0)
  assert surface.dice(empty, empty, convention=policy) == 0.5
  assert surface.assd(empty, empty, (1, 1, 1), convention=policy) == 7.0
  assert surface.hd95(blob, empty, (1, 1, 1), convention=policy) == 99.0
  # empty_value overrides the convention.
  assert surface.dice(empty, empty, empty_value=0.0, convention='kits') == 0.0
  assert surface.iou(empty, empty, empty_value=1.0) == 1.0
  with pytest.raises(ValueError, match='convention'):
    surface.dice(empty, empty, convention='nope')


# ------------------------------------------------------------------------------------------------
# Surface-element sizes: closed forms.
# ------------------------------------------------------------------------------------------------


def _box_surface_area_3d(n, s):
  """Area of the marching-cubes surface of an n0 x n1 x n2 voxel box at spacing s.

  Flat faces span the voxel centres' extent, edges are chamfers of width half the face-diagonal,
  corners are one-corner triangles.
  """
  (n0, n1, n2), (s0, s1, s2) = n, s
  faces = 2 * ((n1 - 1) * s1 * (n2 - 1) * s2 + (n0 - 1) * s0 * (n2 - 1) * s2 +
               (n0 - 1) * s0 * (n1 - 1) * s1)
  edges = 4 * ((n2 - 1) * s2 * 0.5 * math.hypot(s0, s1) + (n1 - 1) * s1 * 0.5 * math.hypot(s0, s2)
               + (n0 - 1) * s0 * 0.5 * math.hypot(s1, s2))
  corners = 8 * math.sqrt((s1 * s2)**2 + (s0 * s2)**2 + (s0 * s1)**2) / 8
  return faces + edges + corners


def _box_perimeter_2d(n, s):
  (n0, n1), (s0, s1) = n, s
  return 2 * ((n0 - 1) * s0 + (n1 - 1) * s1) + 4 * 0.5 * math.hypot(s0, s1)


@pytest.mark.parametrize('ndim', [2, 3])
def test_box_surface_area_closed_form(ndim):
  rng = np.random.default_rng(ndim)
  for _ in range(5):
    n = tuple(int(v) for v in rng.integers(1, 6, ndim))
    spacing = tuple(float(v) for v in rng.uniform(0.3, 3.0, ndim))
    mask = np.zeros(tuple(v + 4 for v in n), bool)
    mask[tuple(slice(2, 2 + v) for v in n)] = True
    sd = surface.surface_distances(mask, mask, spacing)
    expected = (_box_surface_area_3d(n, spacing) if ndim == 3 else _box_perimeter_2d(n, spacing))
    assert sd.surfel_areas_gt.sum() == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(sd.distances_gt_to_pred, 0.0)


def test_surface_element_sizes_properties():
  rng = np.random.default_rng(0)
  spacing = tuple(rng.uniform(0.3, 3.0, 3))
  sizes = surface.surface_element_sizes(spacing)
  assert sizes.shape == (256,)
  assert sizes[0] == 0.0 and sizes[255] == 0.0
  assert np.all(sizes[1:255] > 0)
  # A code and its complement (inside <-> outside) share the surface.
  np.testing.assert_allclose(sizes, sizes[::-1], rtol=1e-12)
  # Three inside corners on one face: a non-planar pentagon. At unit spacing its triangulation
  # with the triangle of the three edge midpoints perpendicular to the face has area
  # 1/2 + sqrt(3)/4 + sqrt(3)/8 (DeepMind's choice: the largest of the five triangulations).
  unit = surface.surface_element_sizes((1.0, 1.0, 1.0))
  code = 1 | 2 | 4  # voxels (1,1,1), (1,1,0), (1,0,1): three corners of the face x0 = 1
  assert unit[code] == pytest.approx(0.5 + 3 * math.sqrt(3) / 8, rel=1e-12)
  sizes_2d = surface.surface_element_sizes((2.0, 1.0))
  assert sizes_2d[0b0011] == 1.0  # two voxels along axis 1: a segment along axis 1
  assert sizes_2d[0b0101] == 2.0  # two voxels along axis 0
  assert sizes_2d[0b0110] == pytest.approx(math.sqrt(5.0))  # saddle: two half diagonals


# ------------------------------------------------------------------------------------------------
# Brute force: all-pairs distances between surfels defined the same way.
# ------------------------------------------------------------------------------------------------


def _brute_surfels(mask, spacing):
  """Positions (mm) and sizes of the surfels of `mask`, by explicit loops over voxel corners.

  Corner c (c_i in 0..n_i) sits between voxels c - 1 and c along each axis; its code sets bit
  2^(2^d - 1 - flat(o)) for each inside voxel c - 1 + o, o in {0,1}^d, with flat(o) the binary
  number o_0 o_1 ... .
  """
  ndim = mask.ndim
  sizes = surface.surface_element_sizes(spacing)
  top = 2**ndim - 1
  positions, areas = [], []
  for c in itertools.product(*[range(n + 1) for n in mask.shape]):
    code = 0
    for o in itertools.product((0, 1), repeat=ndim):
      v = tuple(ci - 1 + oi for ci, oi in zip(c, o))
      if all(0 <= vi < n for vi, n in zip(v, mask.shape)) and mask[v]:
        flat = int(''.join(str(x) for x in o), 2)
        code |= 1 << (top - flat)
    if code not in (0, 2**(2**ndim) - 1):
      positions.append([(ci - 0.5) * si for ci, si in zip(c, spacing)])
      areas.append(sizes[code])
  return np.asarray(positions), np.asarray(areas)


def _brute_metrics(pred, gt, spacing, tolerance):
  p_pos, p_area = _brute_surfels(pred, spacing)
  g_pos, g_area = _brute_surfels(gt, spacing)
  pair = np.sqrt(((g_pos[:, None, :] - p_pos[None, :, :])**2).sum(-1))
  d_gp, d_pg = pair.min(axis=1), pair.min(axis=0)

  def percentile(d, a, p):
    order = np.argsort(d, kind='stable')
    d, a = d[order], a[order]
    fraction = np.cumsum(a) / a.sum()
    return d[np.nonzero(fraction >= p / 100 - 1e-12)[0][0]]

  return {
      'hd': max(d_gp.max(), d_pg.max()),
      'hd95': max(percentile(d_gp, g_area, 95), percentile(d_pg, p_area, 95)),
      'assd': (np.sum(d_gp * g_area) + np.sum(d_pg * p_area)) / (g_area.sum() + p_area.sum()),
      f'nsd@{tolerance}': ((g_area[d_gp <= tolerance].sum() + p_area[d_pg <= tolerance].sum()) /
                           (g_area.sum() + p_area.sum())),
  }


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_3d_masks_match_brute_force(seed):
  rng = np.random.default_rng(seed)
  shape = (12, 12, 12)
  # Thresholded noise: many small, irregular components and holes.
  noise = rng.random(shape)
  pred = noise > 0.55
  gt = np.roll(noise, 1, axis=2) > 0.5
  gt[:, :, :2] = False
  spacing = (2.5, 0.8, 1.3)
  tolerance = 1.5
  expected = _brute_metrics(pred, gt, spacing, tolerance)
  got = surface.compute_metrics(pred, gt, spacing, ['hd', 'hd95', 'assd', f'nsd@{tolerance}'])
  for name, value in expected.items():
    assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_random_2d_masks_match_brute_force():
  rng = np.random.default_rng(7)
  pred = rng.random((15, 11)) > 0.6
  gt = rng.random((15, 11)) > 0.4
  spacing = (0.7, 1.9)
  expected = _brute_metrics(pred, gt, spacing, 1.0)
  got = surface.compute_metrics(pred, gt, spacing, ['hd', 'hd95', 'assd', 'nsd@1.0'])
  for name, value in expected.items():
    assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


# ------------------------------------------------------------------------------------------------
# Overlap metrics, compute_metrics, validation.
# ------------------------------------------------------------------------------------------------


def test_dice_iou_counts_and_isic_threshold():
  pred = np.zeros((10, 10), bool)
  gt = np.zeros((10, 10), bool)
  pred[0:4, 0:5] = True  # 20 pixels
  gt[2:6, 0:5] = True  # 20 pixels, 10 shared
  assert surface.dice(pred, gt) == pytest.approx(0.5)
  j = surface.iou(pred, gt)
  assert j == pytest.approx(10 / 30)
  assert surface.dice(pred, gt) == pytest.approx(2 * j / (1 + j))
  assert surface.thresholded_iou(pred, gt) == 0.0  # J = 0.33 < 0.65
  assert surface.thresholded_iou(gt, gt) == 1.0


def test_compute_metrics_matches_single_functions():
  rng = np.random.default_rng(3)
  pred = rng.random((8, 9, 7)) > 0.5
  gt = rng.random((8, 9, 7)) > 0.5
  spacing = (1.0, 2.0, 0.5)
  got = surface.compute_metrics(pred, gt, spacing, ['dice', 'iou', 'hd', 'hd95', 'hd50', 'assd',
                                                    'nsd', 'nsd@2'], nsd_tolerance_mm=0.7)
  assert got['dice'] == surface.dice(pred, gt)
  assert got['iou'] == surface.iou(pred, gt)
  assert got['hd'] == surface.hausdorff(pred, gt, spacing)
  assert got['hd95'] == surface.hd95(pred, gt, spacing)
  assert got['hd50'] == surface.hausdorff(pred, gt, spacing, 50)
  assert got['assd'] == surface.assd(pred, gt, spacing)
  assert got['nsd'] == surface.normalized_surface_dice(pred, gt, spacing, 0.7)
  assert got['nsd@2'] == surface.normalized_surface_dice(pred, gt, spacing, 2.0)


def test_validation_errors():
  mask = np.zeros((4, 4, 4), bool)
  with pytest.raises(ValueError, match='pred must be a bool array'):
    surface.dice(mask.astype(np.uint8), mask)
  with pytest.raises(ValueError, match='shapes differ'):
    surface.dice(mask, mask[:3])
  with pytest.raises(ValueError, match='2D or 3D'):
    surface.dice(np.zeros(4, bool), np.zeros(4, bool))
  with pytest.raises(ValueError, match='has 2 entries but the masks are 3D'):
    surface.hd95(mask, mask, (1.0, 1.0))
  with pytest.raises(ValueError, match='finite and > 0'):
    surface.hd95(mask, mask, (1.0, -1.0, 1.0))
  with pytest.raises(ValueError, match='percentile'):
    surface.hausdorff(mask, mask, (1, 1, 1), percentile=101)
  with pytest.raises(ValueError, match='tolerance_mm'):
    surface.normalized_surface_dice(mask, mask, (1, 1, 1), -1.0)
  with pytest.raises(ValueError, match='Unknown metric'):
    surface.compute_metrics(mask, mask, (1, 1, 1), ['hausdorff'])
  with pytest.raises(ValueError, match='nsd_tolerance_mm'):
    surface.compute_metrics(mask, mask, (1, 1, 1), ['nsd'])
