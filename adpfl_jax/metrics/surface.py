"""Overlap and surface-distance metrics for binary masks (host-side NumPy/SciPy).

This module re-implements the DeepMind `surface-distance` metrics
(github.com/google-deepmind/surface-distance) and adds explicit, named conventions for empty
masks, as documented in `docs/datasets.md` §4.

Surface representation (the DeepMind one, not border voxels):

* Both masks are cropped to the bounding box of their union, padded by one empty voxel, and each
  voxel *corner* gets a neighbourhood code from the 2 x 2 (x 2) voxels around it. The voxel at
  offset (0, ..., 0) is the most significant bit (DeepMind's kernels `[[8, 4], [2, 1]]` and
  `[[[128, 64], [32, 16]], [[8, 4], [2, 1]]]`). Corners whose code is neither 0 nor all-ones are
  *surface elements* ("surfels"); they sit half a voxel off the voxel centres.
* Each surfel carries a size: a contour length in 2D (mm) or a surface area in 3D (mm²), the
  length/area of the marching-squares/marching-cubes surface inside that 2 x 2 (x 2) cell, scaled
  by the voxel spacing. The lookup tables are derived here from geometry (see
  `surface_element_sizes`) and reproduce DeepMind's hand-written tables.
* Distances are `scipy.ndimage.distance_transform_edt` of the complement of the other mask's
  surfels, sampled with the spacing, read at this mask's surfels.
* Percentile Hausdorff distances are *area-weighted* and take no interpolation; ASSD and surface
  Dice are area-weighted too.

Argument order: every public function takes `(pred, truth, ...)`; the `SurfaceDistances` fields
keep DeepMind's names (`distances_gt_to_pred`, ...).

Empty masks. DeepMind returns NaN / inf for empty masks; the challenges substitute fixed values.
Every metric takes `convention`, either a name from `CONVENTIONS` or an `EmptyPolicy`:

| convention   | overlap (Dice, IoU, NSD) both empty | distance both empty | distance one empty |
|--------------|------|---------------------------------------|-----|
| `'deepmind'` | NaN  | raw DeepMind: HD = inf, ASSD = NaN     | inf |
| `'kits'`     | 1.0  | raw DeepMind (KiTS23 scores no distance) | inf |
| `'brats2024'`| 1.0  | 0.0                                    | 337 |
| `'brats2023'`| 1.0  | 0.0                                    | 374 |

With exactly one mask empty, Dice, IoU and NSD are always 0. `'brats'` is an alias of
`'brats2024'` (BraTS 2024 GLI, volumes 182 x 218 x 182, penalty 337), and `'kits23'` of `'kits'`.
The 374 penalty of the BraTS 2023 scorer is the diagonal of a 240 x 240 x 155 volume (373.13)
rounded up; use it for BraTS 2021 / FeTS data. BraTS scores no ASSD; the BraTS conventions apply
the same 0 / penalty rule to it. The default everywhere in this module is `'deepmind'`;
`adpfl_jax.metrics.regions` picks the challenge convention per task.

References:
  Nikolov et al., "Deep learning to achieve clinically applicable segmentation of head and neck
  anatomy for radiotherapy", arXiv 1809.04430 (surface Dice).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

Spacing = Sequence[float]

# ------------------------------------------------------------------------------------------------
# Empty-mask conventions.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EmptyPolicy:
  """What a metric returns when one or both masks are empty.

  Attributes:
    overlap_both_empty: Dice, IoU and normalised surface Dice when both masks are empty.
    distance_both_empty: Hausdorff distances and ASSD when both masks are empty; `None` keeps the
      raw DeepMind result (inf for Hausdorff distances, NaN for ASSD).
    distance_one_empty: Hausdorff distances and ASSD when exactly one mask is empty (DeepMind:
      inf; BraTS: a fixed penalty).
  """

  overlap_both_empty: float
  distance_both_empty: float | None
  distance_one_empty: float


BRATS2024_HD95_PENALTY = 337.0
BRATS2023_HD95_PENALTY = 374.0

CONVENTIONS: dict[str, EmptyPolicy] = {
    'deepmind': EmptyPolicy(math.nan, None, math.inf),
    'kits': EmptyPolicy(1.0, None, math.inf),
    'brats2024': EmptyPolicy(1.0, 0.0, BRATS2024_HD95_PENALTY),
    'brats2023': EmptyPolicy(1.0, 0.0, BRATS2023_HD95_PENALTY),
}
_CONVENTION_ALIASES = {'brats': 'brats2024', 'kits23': 'kits'}

Convention = str | EmptyPolicy


def get_policy(convention: Convention) -> EmptyPolicy:
  """Returns the `EmptyPolicy` for a convention name (or passes a policy through)."""
  if isinstance(convention, EmptyPolicy):
    return convention
  name = _CONVENTION_ALIASES.get(convention, convention)
  if name not in CONVENTIONS:
    known = sorted(CONVENTIONS) + sorted(_CONVENTION_ALIASES)
    raise ValueError(f'Unknown empty-mask convention {convention!r}; expected one of {known} '
                     'or an EmptyPolicy.')
  return CONVENTIONS[name]


# ------------------------------------------------------------------------------------------------
# Surface-element lookup tables, derived from marching squares / marching cubes.
# ------------------------------------------------------------------------------------------------


def _corner_bit(corner: tuple[int, ...]) -> int:
  """Bit index of a cell corner in the neighbourhood code (offset 0...0 is the top bit)."""
  ndim = len(corner)
  flat = sum(c << (ndim - 1 - i) for i, c in enumerate(corner))
  return (1 << ndim) - 1 - flat


def _cell_faces(ndim: int) -> list[list[tuple[int, ...]]]:
  """The square faces of the unit cell, each as its 4 corners in cyclic order."""
  cyclic = ((0, 0), (1, 0), (1, 1), (0, 1))
  if ndim == 2:
    return [list(cyclic)]
  faces = []
  for axis in range(3):
    others = [a for a in range(3) if a != axis]
    for value in (0, 1):
      face = []
      for u, w in cyclic:
        corner = [0, 0, 0]
        corner[axis], corner[others[0]], corner[others[1]] = value, u, w
        face.append(tuple(corner))
      faces.append(face)
  return faces


def _face_segments(face, inside) -> list[tuple[frozenset, frozenset]]:
  """Iso-contour segments on one square face; nodes are the crossed cell edges.

  On an ambiguous face (inside corners on a diagonal) each inside corner is cut off on its own,
  i.e. the inside corners are separated: the classic marching-cubes choice.
  """
  flags = [inside[c] for c in face]
  edge = lambda i: frozenset((face[i], face[(i + 1) % 4]))
  crossed = [i for i in range(4) if flags[i] != flags[(i + 1) % 4]]
  if len(crossed) == 2:
    return [(edge(crossed[0]), edge(crossed[1]))]
  if len(crossed) == 4:
    return [(edge((i - 1) % 4), edge(i)) for i in range(4) if flags[i]]
  return []


def _loops(segments) -> list[list[frozenset]]:
  """Chains face segments into closed polygons (every node has exactly two neighbours)."""
  neighbours: dict[frozenset, list[frozenset]] = {}
  for a, b in segments:
    neighbours.setdefault(a, []).append(b)
    neighbours.setdefault(b, []).append(a)
  order = sorted(neighbours, key=lambda e: sorted(e))
  unvisited = set(order)
  loops = []
  for start in order:
    if start not in unvisited:
      continue
    loop, prev, cur = [start], None, start
    unvisited.discard(start)
    while True:
      a, b = neighbours[cur]
      nxt = b if a == prev else a
      if nxt == start:
        break
      loop.append(nxt)
      unvisited.discard(nxt)
      prev, cur = cur, nxt
    loops.append(loop)
  return loops


def _triangulations(idx: tuple[int, ...]) -> list[list[tuple[int, int, int]]]:
  """All triangulations of a polygon given by its cyclic vertex indices."""
  if len(idx) < 3:
    return [[]]
  first, last = idx[0], idx[-1]
  out = []
  for k in range(1, len(idx) - 1):
    for left in _triangulations(idx[:k + 1]):
      for right in _triangulations(idx[k:]):
        out.append(left + right + [(first, idx[k], last)])
  return out


def _triangle_vector(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """Area vector of a triangle (its norm is the area)."""
  return 0.5 * np.cross(b - a, c - a)


@functools.lru_cache(maxsize=None)
def _unit_surface_elements(ndim: int) -> np.ndarray:
  """Per neighbourhood code, the surface pieces inside the cell, in voxel units.

  In 2D each piece is a contour segment, stored as its direction vector; in 3D each piece is a
  triangle, stored as its area vector. Both are zero-padded to a fixed count per code.

  Derivation: vertices at the midpoints of cell edges whose corners differ; polygons traced face
  by face (ambiguous faces separate the inside corners); codes with more than half the corners
  inside use their complement, so a code and its complement share the surface. A non-planar
  marching-cubes polygon (the pentagons and skew hexagons) has several triangulations of different
  area; the triangulation of largest area (at unit spacing) is used. With these rules the
  per-code sizes equal DeepMind's `lookup_tables.py` (checked for all 256 codes at random
  anisotropic spacings during development).

  Args:
    ndim: 2 or 3.

  Returns:
    float array of shape (2 ** 2 ** ndim, max_pieces, ndim).
  """
  corners = list(itertools.product((0, 1), repeat=ndim))
  faces = _cell_faces(ndim)
  per_code = []
  for code in range(1 << len(corners)):
    inside = {c: bool((code >> _corner_bit(c)) & 1) for c in corners}
    if sum(inside.values()) * 2 > len(corners):
      inside = {c: not v for c, v in inside.items()}
    segments = [s for f in faces for s in _face_segments(f, inside)]
    midpoint = lambda e: np.mean([np.asarray(c, float) for c in e], axis=0)
    pieces = []
    if ndim == 2:
      pieces = [midpoint(b) - midpoint(a) for a, b in segments]
    else:
      for loop in _loops(segments):
        points = [midpoint(e) for e in loop]
        best, best_area = None, -1.0
        for tris in _triangulations(tuple(range(len(points)))):
          vecs = [_triangle_vector(points[i], points[j], points[k]) for i, j, k in tris]
          area = float(sum(np.linalg.norm(v) for v in vecs))
          if area > best_area + 1e-12:
            best, best_area = vecs, area
        pieces.extend(best)
    per_code.append(pieces)
  width = max(len(p) for p in per_code)
  table = np.zeros((len(per_code), width, ndim))
  for code, pieces in enumerate(per_code):
    if pieces:
      table[code, :len(pieces)] = pieces
  return table


def surface_element_sizes(spacing: Spacing) -> np.ndarray:
  """Size of the surface element for every neighbourhood code at the given spacing.

  Args:
    spacing: voxel spacing in mm, one entry per array axis (2 or 3 entries).

  Returns:
    float64 array of 16 contour lengths in mm (2D) or 256 surface areas in mm² (3D), indexed by
    neighbourhood code. Codes 0 and all-ones are 0.
  """
  s = np.asarray(spacing, dtype=np.float64)
  if s.ndim != 1 or s.size not in (2, 3):
    raise ValueError(f'spacing must have 2 or 3 entries, got {tuple(np.ravel(s))}.')
  if s.size == 2:
    scale = s  # a segment direction scales with the spacing along each axis
  else:
    scale = np.array([s[1] * s[2], s[0] * s[2], s[0] * s[1]])  # area vectors scale by cofactors
  return np.linalg.norm(_unit_surface_elements(s.size) * scale, axis=-1).sum(axis=-1)


# ------------------------------------------------------------------------------------------------
# Validation.
# ------------------------------------------------------------------------------------------------


def check_masks(pred: np.ndarray, truth: np.ndarray) -> None:
  """Raises ValueError unless pred and truth are bool 2D/3D arrays of one shape."""
  for name, mask in (('pred', pred), ('truth', truth)):
    if not isinstance(mask, np.ndarray):
      raise ValueError(f'{name} must be a NumPy array, got {type(mask).__name__}.')
    if mask.dtype != np.bool_:
      raise ValueError(f'{name} must be a bool array (use `mask > 0`), got dtype {mask.dtype}.')
    if mask.ndim not in (2, 3):
      raise ValueError(f'{name} must be 2D or 3D, got shape {mask.shape}.')
  if pred.shape != truth.shape:
    raise ValueError(f'pred and truth shapes differ: {pred.shape} vs {truth.shape}.')


def check_spacing(spacing: Spacing, ndim: int) -> tuple[float, ...]:
  """Returns spacing as a tuple of floats; raises ValueError unless `ndim` finite values > 0."""
  try:
    values = tuple(float(v) for v in spacing)
  except TypeError as e:
    raise ValueError(f'spacing must be a sequence of {ndim} floats, got {spacing!r}.') from e
  if len(values) != ndim:
    raise ValueError(f'spacing {values} has {len(values)} entries but the masks are {ndim}D.')
  if not all(math.isfinite(v) and v > 0 for v in values):
    raise ValueError(f'spacing entries must be finite and > 0, got {values}.')
  return values


# ------------------------------------------------------------------------------------------------
# Surface distances (DeepMind `compute_surface_distances`).
# ------------------------------------------------------------------------------------------------


class SurfaceDistances(NamedTuple):
  """Distances from each surfel of one mask to the other mask's surface, sorted by distance.

  Attributes:
    distances_gt_to_pred: (n_gt,) mm, for each truth surfel; inf where pred has no surface.
    distances_pred_to_gt: (n_pred,) mm, for each pred surfel; inf where truth has no surface.
    surfel_areas_gt: (n_gt,) surfel sizes (mm² in 3D, mm in 2D), aligned with the distances.
    surfel_areas_pred: (n_pred,) idem for pred.
  """

  distances_gt_to_pred: np.ndarray
  distances_pred_to_gt: np.ndarray
  surfel_areas_gt: np.ndarray
  surfel_areas_pred: np.ndarray


def _neighbour_codes(crop: np.ndarray) -> np.ndarray:
  """Neighbourhood code of every voxel corner of `crop` (shape + 1 per axis)."""
  padded = np.pad(crop, 1)
  codes = np.zeros(tuple(n + 1 for n in crop.shape), np.uint8)
  for corner in itertools.product((0, 1), repeat=crop.ndim):
    window = tuple(slice(c, c + n + 1) for c, n in zip(corner, crop.shape))
    codes |= padded[window].astype(np.uint8) << _corner_bit(corner)
  return codes


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
  box = []
  for axis in range(mask.ndim):
    hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
    box.append(slice(hit[0], hit[-1] + 1))
  return tuple(box)


def _sorted(distances: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  order = np.lexsort((areas, distances))  # by distance, ties by area (as DeepMind sorts tuples)
  return distances[order], areas[order]


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Spacing) -> SurfaceDistances:
  """Surfel-to-surface distances in both directions (DeepMind `compute_surface_distances`).

  Args:
    pred: bool mask, 2D or 3D.
    truth: bool mask of the same shape.
    spacing: voxel spacing in mm, one entry per array axis.

  Returns:
    `SurfaceDistances`. Both masks empty: four empty arrays. One mask empty: its lists are empty
    and the distances from the other mask's surfels are inf.
  """
  check_masks(pred, truth)
  spacing = check_spacing(spacing, pred.ndim)
  union = pred | truth
  if not union.any():
    empty = np.zeros(0)
    return SurfaceDistances(empty, empty.copy(), empty.copy(), empty.copy())
  box = _bounding_box(union)
  full = (1 << (1 << pred.ndim)) - 1
  sizes = surface_element_sizes(spacing)

  def borders_and_distance_map(mask):
    codes = _neighbour_codes(mask[box])
    borders = (codes != 0) & (codes != full)
    if borders.any():
      distance_map = ndimage.distance_transform_edt(~borders, sampling=spacing)
    else:
      distance_map = np.full(borders.shape, np.inf)
    return codes, borders, distance_map

  codes_gt, borders_gt, dmap_gt = borders_and_distance_map(truth)
  codes_pred, borders_pred, dmap_pred = borders_and_distance_map(pred)
  d_gt, a_gt = _sorted(dmap_pred[borders_gt], sizes[codes_gt[borders_gt]])
  d_pred, a_pred = _sorted(dmap_gt[borders_pred], sizes[codes_pred[borders_pred]])
  return SurfaceDistances(d_gt, d_pred, a_gt, a_pred)


# ------------------------------------------------------------------------------------------------
# Raw DeepMind reductions of `SurfaceDistances` (no empty-mask substitution).
# ------------------------------------------------------------------------------------------------


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
  if values.size == 0:
    return math.nan
  return float(np.sum(values * weights) / np.sum(weights))


def average_surface_distance(sd: SurfaceDistances) -> tuple[float, float]:
  """Area-weighted mean distance (truth -> pred, pred -> truth); NaN for an empty list."""
  return (_weighted_mean(sd.distances_gt_to_pred, sd.surfel_areas_gt),
          _weighted_mean(sd.distances_pred_to_gt, sd.surfel_areas_pred))


def _check_percentile(percentile: float) -> float:
  percentile = float(percentile)
  if not 0.0 <= percentile <= 100.0:
    raise ValueError(f'percentile must be in [0, 100], got {percentile}.')
  return percentile


def _directed_percentile(distances: np.ndarray, areas: np.ndarray, percentile: float) -> float:
  if distances.size == 0:
    return math.inf
  cumulative = np.cumsum(areas) / np.sum(areas)
  idx = int(np.searchsorted(cumulative, percentile / 100.0))
  return float(distances[min(idx, distances.size - 1)])


def robust_hausdorff(sd: SurfaceDistances, percentile: float) -> float:
  """Area-weighted percentile Hausdorff distance, max of both directions; inf if a list is empty.

  Per direction, the distance of the first surfel (sorted by distance) whose cumulative area
  fraction reaches `percentile / 100`; no interpolation (DeepMind `compute_robust_hausdorff`).
  """
  percentile = _check_percentile(percentile)
  return max(_directed_percentile(sd.distances_gt_to_pred, sd.surfel_areas_gt, percentile),
             _directed_percentile(sd.distances_pred_to_gt, sd.surfel_areas_pred, percentile))


def _check_tolerance(tolerance_mm: float) -> float:
  tolerance_mm = float(tolerance_mm)
  if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
    raise ValueError(f'tolerance_mm must be finite and >= 0, got {tolerance_mm}.')
  return tolerance_mm


def surface_overlap(sd: SurfaceDistances, tolerance_mm: float) -> tuple[float, float]:
  """Fraction of surface area within tolerance (truth side, pred side); NaN for an empty list."""
  tol = _check_tolerance(tolerance_mm)
  out = []
  for d, a in ((sd.distances_gt_to_pred, sd.surfel_areas_gt),
               (sd.distances_pred_to_gt, sd.surfel_areas_pred)):
    out.append(math.nan if d.size == 0 else float(np.sum(a[d <= tol]) / np.sum(a)))
  return out[0], out[1]


def surface_dice(sd: SurfaceDistances, tolerance_mm: float) -> float:
  """Surface Dice at a tolerance (DeepMind `compute_surface_dice_at_tolerance`).

  NaN when neither mask has a surface.
  """
  tol = _check_tolerance(tolerance_mm)
  total = np.sum(sd.surfel_areas_gt) + np.sum(sd.surfel_areas_pred)
  if sd.surfel_areas_gt.size + sd.surfel_areas_pred.size == 0:
    return math.nan
  overlap = (np.sum(sd.surfel_areas_gt[sd.distances_gt_to_pred <= tol]) +
             np.sum(sd.surfel_areas_pred[sd.distances_pred_to_gt <= tol]))
  return float(overlap / total)


# ------------------------------------------------------------------------------------------------
# Public metrics with empty-mask conventions.
# ------------------------------------------------------------------------------------------------


def _emptiness(pred: np.ndarray, truth: np.ndarray) -> int:
  """Number of empty masks among (pred, truth): 0, 1 or 2."""
  return int(not pred.any()) + int(not truth.any())


def _overlap_both_empty(convention: Convention, empty_value: float | None) -> float:
  if empty_value is not None:
    return float(empty_value)
  return get_policy(convention).overlap_both_empty


def dice(pred: np.ndarray, truth: np.ndarray, empty_value: float | None = None, *,
         convention: Convention = 'deepmind') -> float:
  """Volumetric Dice 2|P ∩ T| / (|P| + |T|).

  Args:
    pred: bool mask, 2D or 3D.
    truth: bool mask of the same shape.
    empty_value: value when both masks are empty; overrides the convention when given.
    convention: empty-mask convention (`CONVENTIONS` name or `EmptyPolicy`); default DeepMind
      (NaN when both are empty).

  Returns:
    Dice in [0, 1]; 0 when exactly one mask is empty.
  """
  check_masks(pred, truth)
  denominator = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
  if denominator == 0:
    return _overlap_both_empty(convention, empty_value)
  return 2.0 * int(np.count_nonzero(pred & truth)) / denominator


def iou(pred: np.ndarray, truth: np.ndarray, empty_value: float | None = None, *,
        convention: Convention = 'deepmind') -> float:
  """Jaccard index |P ∩ T| / |P ∪ T|; same empty-mask handling as `dice`."""
  check_masks(pred, truth)
  union = int(np.count_nonzero(pred | truth))
  if union == 0:
    return _overlap_both_empty(convention, empty_value)
  return int(np.count_nonzero(pred & truth)) / union


ISIC_JACCARD_THRESHOLD = 0.65


def thresholded_iou(pred: np.ndarray, truth: np.ndarray, threshold: float = ISIC_JACCARD_THRESHOLD,
                    *, convention: Convention = 'deepmind') -> float:
  """ISIC 2018 Task 1 thresholded Jaccard: IoU, set to 0 when below `threshold` (0.65)."""
  value = iou(pred, truth, convention=convention)
  return 0.0 if value < threshold else value


def _distance_for_empty(n_empty: int, policy: EmptyPolicy, raw: float) -> float:
  if n_empty == 2 and policy.distance_both_empty is not None:
    return float(policy.distance_both_empty)
  if n_empty == 1:
    return float(policy.distance_one_empty)
  return raw


def _assd_from(sd: SurfaceDistances) -> float:
  """Symmetric ASSD pooled over the surfels of both masks, area-weighted."""
  distances = np.concatenate([sd.distances_gt_to_pred, sd.distances_pred_to_gt])
  areas = np.concatenate([sd.surfel_areas_gt, sd.surfel_areas_pred])
  return _weighted_mean(distances, areas)


def hausdorff(pred: np.ndarray, truth: np.ndarray, spacing: Spacing, percentile: float = 100.0,
              *, convention: Convention = 'deepmind') -> float:
  """(Percentile) Hausdorff distance in mm between the mask surfaces.

  Args:
    pred: bool mask, 2D or 3D.
    truth: bool mask of the same shape.
    spacing: voxel spacing in mm per array axis.
    percentile: 100 for the classic Hausdorff distance, 95 for HD95; area-weighted, see
      `robust_hausdorff`.
    convention: empty-mask convention; default DeepMind (inf whenever a mask is empty).

  Returns:
    Distance in mm.
  """
  percentile = _check_percentile(percentile)
  sd = surface_distances(pred, truth, spacing)
  return _distance_for_empty(_emptiness(pred, truth), get_policy(convention),
                             robust_hausdorff(sd, percentile))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Spacing, *,
         convention: Convention = 'deepmind') -> float:
  """95th-percentile Hausdorff distance in mm (`hausdorff` with percentile 95)."""
  return hausdorff(pred, truth, spacing, 95.0, convention=convention)


def assd(pred: np.ndarray, truth: np.ndarray, spacing: Spacing, *,
         convention: Convention = 'deepmind') -> float:
  """Average symmetric surface distance in mm.

  ASSD = (Σ_truth d·a + Σ_pred d·a) / (Σ_truth a + Σ_pred a): the area-weighted mean over the
  surfels of both masks (Heimann et al. 2009, with DeepMind surfels). This equals the mean of
  DeepMind's two directed averages only when both surfaces have the same area; use
  `average_surface_distance` for the directed pair.

  Args:
    pred: bool mask, 2D or 3D.
    truth: bool mask of the same shape.
    spacing: voxel spacing in mm per array axis.
    convention: empty-mask convention; default DeepMind (NaN when both are empty, inf when one is).

  Returns:
    Distance in mm.
  """
  sd = surface_distances(pred, truth, spacing)
  return _distance_for_empty(_emptiness(pred, truth), get_policy(convention), _assd_from(sd))


def normalized_surface_dice(pred: np.ndarray, truth: np.ndarray, spacing: Spacing,
                            tolerance_mm: float, *, convention: Convention = 'deepmind') -> float:
  """Normalised surface Dice at `tolerance_mm` (DeepMind surface Dice, area-weighted surfels).

  Args:
    pred: bool mask, 2D or 3D.
    truth: bool mask of the same shape.
    spacing: voxel spacing in mm per array axis.
    tolerance_mm: surfels within this distance of the other surface count as overlapping.
    convention: empty-mask convention; default DeepMind (NaN when both are empty).

  Returns:
    Value in [0, 1]; 0 when exactly one mask is empty.
  """
  tol = _check_tolerance(tolerance_mm)
  sd = surface_distances(pred, truth, spacing)
  if _emptiness(pred, truth) == 2:
    return get_policy(convention).overlap_both_empty
  return surface_dice(sd, tol)


# ------------------------------------------------------------------------------------------------
# Several metrics from one surface-distance computation.
# ------------------------------------------------------------------------------------------------

_HD_RE = re.compile(r'^hd(\d+(?:\.\d+)?)?$')
_NSD_RE = re.compile(r'^nsd(?:@(\d+(?:\.\d+)?))?$')
METRIC_NAMES_HELP = ("'dice', 'iou', 'thresholded_iou', 'hd' (= hd100), 'hd<p>' (e.g. 'hd95'), "
                     "'assd', 'nsd' (default tolerance), 'nsd@<mm>' (e.g. 'nsd@1.0')")


def check_metric_names(metrics: Sequence[str]) -> None:
  """Raises ValueError for a metric name `compute_metrics` does not know."""
  if isinstance(metrics, str):
    raise ValueError(f'metrics must be a sequence of names, got the string {metrics!r}.')
  for name in metrics:
    if name in ('dice', 'iou', 'thresholded_iou', 'assd'):
      continue
    m = _HD_RE.match(name)
    if m:
      if m.group(1) is not None:
        _check_percentile(float(m.group(1)))
      continue
    if _NSD_RE.match(name):
      continue
    raise ValueError(f'Unknown metric {name!r}; expected one of {METRIC_NAMES_HELP}.')


def compute_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Spacing,
                    metrics: Sequence[str] = ('dice', 'iou', 'hd95', 'assd', 'nsd'), *,
                    convention: Convention = 'deepmind',
                    nsd_tolerance_mm: float | None = None) -> dict[str, float]:
  """Several metrics for one pair of masks, computing the surface distances once.

  Args:
    pred: bool mask, 2D or 3D.
    truth: bool mask of the same shape.
    spacing: voxel spacing in mm per array axis.
    metrics: names, see `METRIC_NAMES_HELP`.
    convention: empty-mask convention for every metric.
    nsd_tolerance_mm: tolerance for the plain 'nsd' metric (required if 'nsd' is requested).

  Returns:
    dict metric name -> value.
  """
  check_metric_names(metrics)
  check_masks(pred, truth)
  policy = get_policy(convention)
  n_empty = _emptiness(pred, truth)
  sd = None
  if any(name not in ('dice', 'iou', 'thresholded_iou') for name in metrics):
    sd = surface_distances(pred, truth, spacing)
  else:
    check_spacing(spacing, pred.ndim)
  out = {}
  for name in metrics:
    if name == 'dice':
      out[name] = dice(pred, truth, convention=policy)
    elif name == 'iou':
      out[name] = iou(pred, truth, convention=policy)
    elif name == 'thresholded_iou':
      out[name] = thresholded_iou(pred, truth, convention=policy)
    elif name == 'assd':
      out[name] = _distance_for_empty(n_empty, policy, _assd_from(sd))
    elif (m := _HD_RE.match(name)):
      percentile = 100.0 if m.group(1) is None else float(m.group(1))
      out[name] = _distance_for_empty(n_empty, policy, robust_hausdorff(sd, percentile))
    else:
      m = _NSD_RE.match(name)
      tol = m.group(1)
      if tol is None:
        if nsd_tolerance_mm is None:
          raise ValueError("Metric 'nsd' needs nsd_tolerance_mm (or ask for 'nsd@<mm>').")
        tol = nsd_tolerance_mm
      tol = _check_tolerance(float(tol))
      out[name] = policy.overlap_both_empty if n_empty == 2 else surface_dice(sd, tol)
  return out
