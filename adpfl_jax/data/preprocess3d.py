"""3D preprocessing for CT (KiTS23) and MRI (BraTS) volumes, host-side NumPy.

All arrays are (z, y, x) or channels-last (z, y, x, c); spacings in mm in the
same order.

CT (docs/datasets.md §2.6): clip to a HU window and z-score with fixed constants
(default: the widely reused KiTS19 nnU-Net fingerprint, window [-79, 304] HU,
mean 100.93, std 76.9), resample to a target spacing, crop or pad around the
kidneys, and foreground-biased patch sampling for training.

MRI (docs/datasets.md §3.7): per-modality z-score over the brain (non-zero) voxels,
0 outside; crop to the brain bounding box; 4-channel stacking.

Randomness only through a NumPy `np.random.Generator` passed in.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import ndimage

#: KiTS19 nnU-Net fingerprint constants (docs/datasets.md §2.6).
KITS19_HU_WINDOW = (-79.0, 304.0)
KITS19_MEAN = 100.93
KITS19_STD = 76.9
#: KiTS23 nnU-Net plan constants from one third-party catalogue (unconfirmed).
KITS23_HU_WINDOW = (-54.0, 258.0)
KITS23_MEAN = 100.0
KITS23_STD = 57.4


# ----------------------------------------------------------------------------- CT


def normalize_ct(
    image: np.ndarray,
    window: Sequence[float] = KITS19_HU_WINDOW,
    mean: float = KITS19_MEAN,
    std: float = KITS19_STD,
) -> np.ndarray:
  """Clips HU to `window` then z-scores with fixed constants: float32.

  nnU-Net `CTNormalization`: `(clip(img, lo, hi) - mean) / max(std, 1e-8)`.
  """
  lo, hi = float(window[0]), float(window[1])
  if not lo < hi:
    raise ValueError(f'HU window must have low < high, got {tuple(window)}.')
  out = np.clip(np.asarray(image, np.float32), lo, hi)
  out -= np.float32(mean)
  out /= np.float32(max(float(std), 1e-8))
  return out


# ------------------------------------------------------------------ resampling


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, ...]:
  """Shape covering the same extent at `target_spacing` (at least 1 voxel/axis)."""
  return tuple(
      max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing)
  )


def resample(
    volume: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    *,
    order: int,
) -> tuple[np.ndarray, tuple[float, float, float]]:
  """Resamples the 3 spatial axes with `scipy.ndimage.zoom`.

  Args:
    volume: (z, y, x) or (z, y, x, c); channels are resampled one by one.
    spacing: current spacing (mm).
    target_spacing: wanted spacing (mm).
    order: spline order: 1 for images, 0 (nearest) for labels.

  Returns:
    `(resampled, actual_spacing)`; the actual spacing is `spacing * old / new`
    per axis, which differs from `target_spacing` by rounding of the shape.
  """
  if volume.ndim not in (3, 4):
    raise ValueError(f'resample expects (z, y, x[, c]), got shape {volume.shape}.')
  in_shape = volume.shape[:3]
  out_shape = resampled_shape(in_shape, spacing, target_spacing)
  actual = tuple(float(s) * n / m for s, n, m in zip(spacing, in_shape, out_shape))
  if out_shape == tuple(in_shape):
    return volume, actual
  factors = [m / n for n, m in zip(in_shape, out_shape)]

  def zoom3(v: np.ndarray) -> np.ndarray:
    out = ndimage.zoom(v, factors, order=order, mode='nearest', grid_mode=False)
    if out.shape != out_shape:  # Guard against rounding in scipy's shape rule.
      out = crop_or_pad(out, out_shape, pad_value=0)
    return out

  if volume.ndim == 3:
    return zoom3(volume), actual
  return np.stack([zoom3(volume[..., c]) for c in range(volume.shape[-1])], -1), actual


def resample_case(
    image: np.ndarray,
    labels: np.ndarray | None,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
  """Resamples image (linear) and labels (nearest) onto the same grid."""
  image_r, actual = resample(image, spacing, target_spacing, order=1)
  labels_r = None if labels is None else resample(labels, spacing, target_spacing, order=0)[0]
  return image_r, labels_r, actual


# --------------------------------------------------------- cropping and padding


def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
  """Bounding box of a boolean (z, y, x) mask plus `margin` voxels, or None if empty."""
  mask = np.asarray(mask, bool)
  if not mask.any():
    return None
  margins = np.broadcast_to(np.asarray(margin, int), (mask.ndim,))
  box = []
  for ax in range(mask.ndim):
    other = tuple(a for a in range(mask.ndim) if a != ax)
    idx = np.flatnonzero(mask.any(axis=other))
    lo = max(0, int(idx[0]) - int(margins[ax]))
    hi = min(mask.shape[ax], int(idx[-1]) + 1 + int(margins[ax]))
    box.append(slice(lo, hi))
  return tuple(box)


def crop_or_pad(
    volume: np.ndarray,
    shape: Sequence[int],
    center: Sequence[float] | None = None,
    pad_value: float = 0.0,
) -> np.ndarray:
  """Extracts a window of `shape` centred on `center`, padding outside the volume.

  Args:
    volume: (z, y, x) or (z, y, x, c).
    shape: spatial output shape (3 ints).
    center: voxel coordinates of the window centre (default: volume centre).
      The window is not shifted to stay inside the volume; what falls outside
      is filled with `pad_value`.
    pad_value: fill value.

  Returns:
    Array of shape `shape + volume.shape[3:]`, same dtype.
  """
  spatial = volume.shape[:3]
  if center is None:
    center = [(n - 1) / 2.0 for n in spatial]
  starts = [int(np.floor(c - (s - 1) / 2.0 + 1e-6)) for c, s in zip(center, shape)]
  out = np.full(tuple(shape) + volume.shape[3:], pad_value, dtype=volume.dtype)
  src, dst = [], []
  for st, s, n in zip(starts, shape, spatial):
    lo, hi = max(st, 0), min(st + s, n)
    if lo >= hi:  # Window entirely outside along this axis.
      return out
    src.append(slice(lo, hi))
    dst.append(slice(lo - st, hi - st))
  out[tuple(dst)] = volume[tuple(src)]
  return out


def sample_patch(
    image: np.ndarray,
    labels: np.ndarray,
    patch_shape: Sequence[int],
    rng: np.random.Generator,
    *,
    foreground_prob: float = 0.33,
    pad_value: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
  """Samples one training patch, biased towards foreground (nnU-Net style).

  With probability `foreground_prob` (and if the case has foreground) the
  patch is centred on a random voxel of a uniformly chosen present foreground
  class, so small classes (tumour, cyst) are seen often; otherwise the centre
  is uniform over the volume. Patches extending outside are padded.

  Args:
    image: (z, y, x[, c]).
    labels: (z, y, x) integer labels, 0 = background.
    patch_shape: 3 ints.
    rng: NumPy generator (the only source of randomness).
    foreground_prob: probability of a foreground-centred patch.
    pad_value: image fill value outside the volume (labels are padded with 0).

  Returns:
    `(image_patch, label_patch)`.
  """
  if image.shape[:3] != labels.shape:
    raise ValueError(f'image {image.shape} and labels {labels.shape} differ spatially.')
  classes = [int(c) for c in np.unique(labels) if c != 0]
  if classes and rng.random() < foreground_prob:
    cls = classes[int(rng.integers(len(classes)))]
    coords = np.argwhere(labels == cls)
    center = coords[int(rng.integers(len(coords)))]
  else:
    center = [int(rng.integers(n)) for n in labels.shape]
  return (crop_or_pad(image, patch_shape, center, pad_value),
          crop_or_pad(labels, patch_shape, center, 0))


# ---------------------------------------------------------------------------- MRI


def brain_mask(image: np.ndarray) -> np.ndarray:
  """Non-zero voxels of any channel of a (z, y, x, c) image (skull-stripped MRI)."""
  return np.any(image != 0, axis=-1) if image.ndim == 4 else image != 0


def zscore_in_mask(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """Per-channel z-score over `mask` voxels (default: non-zero voxels); 0 outside.

  nnU-Net `ZScoreNormalization` with `use_mask_for_norm`. Works on (z, y, x)
  or (z, y, x, c); a channel that is constant in the mask becomes 0 there.
  """
  image = np.asarray(image, np.float32)
  squeeze = image.ndim == 3
  img = image[..., None] if squeeze else image
  mask = brain_mask(img) if mask is None else np.asarray(mask, bool)
  out = np.zeros_like(img)
  if mask.any():
    for c in range(img.shape[-1]):
      vals = img[..., c][mask]
      mean, std = float(vals.mean()), float(vals.std())
      out[..., c][mask] = (vals - mean) / max(std, 1e-8)
  return out[..., 0] if squeeze else out


def stack_modalities(channels: Sequence[np.ndarray]) -> np.ndarray:
  """Stacks same-shape (z, y, x) modalities into channels-last (z, y, x, c)."""
  shapes = {c.shape for c in channels}
  if len(shapes) != 1:
    raise ValueError(f'modalities differ in shape: {[c.shape for c in channels]}.')
  return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)


def crop_to_brain(
    image: np.ndarray, labels: np.ndarray | None = None, margin: int = 0
) -> tuple[np.ndarray, np.ndarray | None, tuple[slice, ...]]:
  """Crops image (and labels) to the bounding box of the brain mask.

  Returns:
    `(image, labels, box)`; an all-zero image is returned unchanged.
  """
  box = bounding_box(brain_mask(image), margin)
  if box is None:
    box = tuple(slice(0, n) for n in image.shape[:3])
  return image[box], (None if labels is None else labels[box]), box


# ------------------------------------------------------------- whole-case recipes


@dataclasses.dataclass(frozen=True)
class Preprocessed:
  """A preprocessed case: fixed-shape image (z, y, x, c), labels, spacing."""

  image: np.ndarray
  labels: np.ndarray
  spacing: tuple[float, float, float]


def preprocess_ct_case(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    *,
    target_spacing: Sequence[float],
    shape: Sequence[int],
    window: Sequence[float] = KITS19_HU_WINDOW,
    mean: float = KITS19_MEAN,
    std: float = KITS19_STD,
) -> Preprocessed:
  """CT recipe: resample, clip + z-score, crop/pad `shape` around the foreground.

  The window is centred on the centre of the foreground (label > 0) bounding
  box, or on the volume centre if there is no foreground; outside the volume
  the image is padded with the normalised value of the window's low end (air).

  Returns:
    `Preprocessed` with image (z, y, x, 1) float32, labels uint8.
  """
  img, lbl, actual = resample_case(image, labels, spacing, target_spacing)
  img = normalize_ct(img, window, mean, std)
  box = bounding_box(lbl > 0)
  center = None if box is None else [(b.start + b.stop - 1) / 2.0 for b in box]
  pad = (float(window[0]) - mean) / max(std, 1e-8)
  img = crop_or_pad(img, shape, center, pad)[..., None]
  lbl = crop_or_pad(lbl.astype(np.uint8), shape, center, 0)
  return Preprocessed(img, lbl, actual)


def preprocess_mri_case(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    *,
    target_spacing: Sequence[float],
    shape: Sequence[int],
) -> Preprocessed:
  """MRI recipe: crop to brain, resample, z-score in the brain, crop/pad `shape`.

  The brain mask (non-zero in any channel) is computed before resampling and
  resampled with nearest neighbour, so interpolation does not grow it; voxels
  outside it are 0 after normalisation. The fixed-shape window is centred on
  the brain box.

  Args:
    image: (z, y, x, c) raw intensities.
    labels: (z, y, x).
    spacing: mm.
    target_spacing: mm, e.g. (2, 2, 2) for the CPU recipe.
    shape: output spatial shape.

  Returns:
    `Preprocessed` with image (z, y, x, c) float32, labels uint8.
  """
  if image.ndim != 4:
    raise ValueError(f'MRI image must be (z, y, x, c), got {image.shape}.')
  image, labels, _ = crop_to_brain(image, labels)
  mask = brain_mask(image).astype(np.uint8)
  img, actual = resample(image.astype(np.float32), spacing, target_spacing, order=1)
  lbl, _ = resample(labels, spacing, target_spacing, order=0)
  mask, _ = resample(mask, spacing, target_spacing, order=0)
  img = zscore_in_mask(img, mask.astype(bool))
  return Preprocessed(crop_or_pad(img, shape, None, 0.0),
                      crop_or_pad(lbl.astype(np.uint8), shape, None, 0), actual)
