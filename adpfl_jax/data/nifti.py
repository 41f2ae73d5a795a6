"""NIfTI-1 reading and writing in (z, y, x) order with spacing in mm.

Host-side NumPy code (no JAX). Geometry follows `docs/datasets.md` §2.3:

* KiTS23 files store the array as (slices, rows, cols) = (z, y, x) with
  `qform_code 0`, `sform_code 2` and `srow = [[0, 0, -px, 0], [0, -px, 0, 0],
  [-thick, 0, 0, 0]]` (nibabel axis codes ('I', 'P', 'L')). nibabel's array and
  `header.get_zooms()` are then already in (z, y, x) order and are returned
  unchanged.
* Other files (BraTS, written by ITK-based tools with a diagonal affine) store
  (x, y, z). `read_nifti` permutes the array axes, never flips them, so that
  axis 0 is the one the affine maps closest to the superior-inferior world
  axis, axis 1 to anterior-posterior and axis 2 to left-right. For KiTS23 this
  permutation is the identity, so the rule reproduces §2.3 exactly.

`NiftiVolume.file_axes` records the permutation, so predictions can be written
back in the original file order with `to_file_order`.

Example:

  >>> array, spacing = read_nifti('case_00000/segmentation.nii.gz')  # doctest: +SKIP
  >>> array.shape, spacing  # doctest: +SKIP
  ((611, 512, 512), (0.5, 0.919922, 0.919922))
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Literal, Sequence

import nibabel as nib
import numpy as np

PathLike = str | os.PathLike

#: Supported on-disk conventions for `write_nifti`.
Layout = Literal['kits23', 'ras']


class NiftiError(ValueError):
  """A NIfTI file is missing, unreadable or holds invalid data."""


@dataclasses.dataclass(frozen=True)
class NiftiVolume:
  """A volume read from a NIfTI file.

  Attributes:
    array: voxel data in (z, y, x) order, C-contiguous.
    spacing: voxel size in mm, in the same order as `array`'s axes.
    affine: the file's 4x4 voxel-to-world affine (for the file's axis order).
    file_axes: `array = file_array.transpose(file_axes)`.
    axcodes: nibabel axis codes of `array`'s axes (e.g. ('I', 'P', 'L')).
    path: the file read.
  """

  array: np.ndarray
  spacing: tuple[float, float, float]
  affine: np.ndarray
  file_axes: tuple[int, int, int]
  axcodes: tuple[str, str, str]
  path: pathlib.Path

  def to_file_order(self, array_zyx: np.ndarray) -> np.ndarray:
    """Transposes a (z, y, x[, ...]) array back to this file's axis order."""
    inverse = tuple(int(i) for i in np.argsort(self.file_axes))
    rest = tuple(range(3, array_zyx.ndim))
    return np.transpose(array_zyx, inverse + rest)


def _zyx_axes(affine: np.ndarray, path: pathlib.Path) -> tuple[int, int, int]:
  """Array axes mapped closest to world z, y and x, in that order."""
  ornt = nib.orientations.io_orientation(affine)
  world = ornt[:, 0]
  if np.isnan(world).any() or sorted(world.astype(int).tolist()) != [0, 1, 2]:
    raise NiftiError(
        f'{path}: cannot tell the axis order from the affine {affine.tolist()} '
        '(degenerate or oblique beyond recognition).'
    )
  where = {int(w): i for i, w in enumerate(world)}
  return (where[2], where[1], where[0])


def load_nifti(
    path: PathLike,
    *,
    reorient: bool = True,
    allow_nan: bool = False,
) -> NiftiVolume:
  """Reads a 3D NIfTI file into a (z, y, x) array plus spacing in mm.

  Args:
    path: a `.nii` or `.nii.gz` file.
    reorient: permute axes to (z, y, x) using the affine (see the module
      docstring); if False, keep nibabel's array order.
    allow_nan: if False, NaN or infinite intensities raise `NiftiError`.

  Returns:
    A `NiftiVolume`; the array keeps the stored dtype (after nibabel applies
    `scl_slope`/`scl_inter`), callers cast (e.g. images to float32).

  Raises:
    FileNotFoundError: the file does not exist.
    NiftiError: the file is truncated or corrupt (including bad gzip), is not
      3D, has a degenerate affine, or holds NaN/inf values. The message names
      the file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'NIfTI file not found: {path}')
  try:
    img = nib.load(str(path))
    # Reading the data here (not lazily) surfaces truncated gzip streams now.
    data = np.asanyarray(img.dataobj)
    zooms = tuple(float(z) for z in img.header.get_zooms())
    affine = np.asarray(img.affine, dtype=np.float64)
  except MemoryError:
    raise
  except Exception as e:  # nibabel/gzip/zlib raise many different types.
    raise NiftiError(
        f'{path}: cannot read NIfTI data (truncated or corrupt file?): '
        f'{type(e).__name__}: {e}'
    ) from e

  # Some writers add trailing singleton dimensions, e.g. (x, y, z, 1).
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise NiftiError(f'{path}: expected 3D data, got shape {data.shape}.')
  if not allow_nan and np.issubdtype(data.dtype, np.floating):
    bad = ~np.isfinite(data)
    if bad.any():
      raise NiftiError(
          f'{path}: {int(bad.sum())} NaN/inf intensities (first at voxel '
          f'{tuple(int(i) for i in np.argwhere(bad)[0])} in file order).'
      )
  spacing = zooms[:3]
  if any(not np.isfinite(s) or s <= 0 for s in spacing):
    raise NiftiError(f'{path}: invalid voxel spacing {spacing} in the header.')

  axes = _zyx_axes(affine, path) if reorient else (0, 1, 2)
  array = np.ascontiguousarray(np.transpose(data, axes))
  axcodes = nib.aff2axcodes(affine)
  return NiftiVolume(
      array=array,
      spacing=tuple(spacing[a] for a in axes),
      affine=affine,
      file_axes=axes,
      axcodes=tuple(axcodes[a] for a in axes),
      path=path,
  )


def read_nifti(
    path: PathLike, *, dtype: np.dtype | type | None = None, allow_nan: bool = False
) -> tuple[np.ndarray, tuple[float, float, float]]:
  """Reads a NIfTI file as `(array_zyx, spacing_zyx_mm)`; see `load_nifti`.

  Args:
    path: a `.nii` or `.nii.gz` file.
    dtype: optional dtype to cast the array to (after the NaN check).
    allow_nan: if False, NaN or infinite intensities raise `NiftiError`.

  Returns:
    The (z, y, x) array and the spacing in mm in the same order.
  """
  vol = load_nifti(path, allow_nan=allow_nan)
  array = vol.array if dtype is None else vol.array.astype(dtype, copy=False)
  return array, vol.spacing


def layout_affine(spacing_zyx: Sequence[float], layout: Layout) -> np.ndarray:
  """The 4x4 affine `write_nifti` stores for `layout` (file axis order).

  Args:
    spacing_zyx: (thick, px_y, px_x) in mm.
    layout: 'kits23' (array stored as (z, y, x), srow of §2.3) or 'ras' (array
      stored as (x, y, z), diagonal affine `diag(-x, -y, z)` as ITK-based
      tools such as the BraTS pipeline write it).

  Returns:
    The affine as float64.
  """
  sz, sy, sx = (float(s) for s in spacing_zyx)
  if layout == 'kits23':
    return np.array(
        [[0.0, 0.0, -sx, 0.0], [0.0, -sy, 0.0, 0.0], [-sz, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
  if layout == 'ras':
    return np.diag([-sx, -sy, sz, 1.0])
  raise ValueError(f"Unknown NIfTI layout {layout!r}; expected 'kits23' or 'ras'.")


def write_nifti(
    path: PathLike,
    array_zyx: np.ndarray,
    spacing_zyx: Sequence[float],
    *,
    layout: Layout = 'kits23',
    dtype: np.dtype | type | None = None,
) -> pathlib.Path:
  """Writes a (z, y, x) array as a single-file NIfTI-1 (`n+1`, vox_offset 352).

  Headers imitate the real releases:

  * `layout='kits23'`: array stored as (z, y, x); `qform_code 0`,
    `sform_code 2`, srow `[[0, 0, -px, 0], [0, -px, 0, 0], [-thick, 0, 0, 0]]`,
    pixdim (thick, px, px), `scl_slope 1`, `scl_inter 0` (docs/datasets.md §2.3).
  * `layout='ras'`: array stored as (x, y, z) with affine `diag(-x, -y, z)`,
    `qform_code = sform_code = 1` (BraTS-style, 1 mm diagonal for 1 mm data).

  `load_nifti` reads either back to the same (z, y, x) array and spacing.

  Args:
    path: output path (`.nii.gz` compresses); parent folders are created.
    array_zyx: 3D array in (z, y, x) order.
    spacing_zyx: voxel size in mm in the same order.
    layout: 'kits23' or 'ras'.
    dtype: on-disk dtype (default: the array's dtype).

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  array_zyx = np.asarray(array_zyx)
  if array_zyx.ndim != 3:
    raise ValueError(f'{path}: write_nifti expects a 3D (z, y, x) array, got {array_zyx.shape}.')
  if len(spacing_zyx) != 3 or any(float(s) <= 0 for s in spacing_zyx):
    raise ValueError(f'{path}: spacing must be 3 positive numbers, got {spacing_zyx}.')
  dtype = np.dtype(array_zyx.dtype if dtype is None else dtype)
  affine = layout_affine(spacing_zyx, layout)
  data = array_zyx if layout == 'kits23' else np.transpose(array_zyx, (2, 1, 0))
  img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
  img.set_data_dtype(dtype)
  if layout == 'kits23':
    img.set_sform(affine, code=2)
    img.set_qform(None, code=0)
  else:
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
  img.header['scl_slope'] = 1.0
  img.header['scl_inter'] = 0.0
  img.header.set_xyzt_units('mm', 'sec')
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(img, str(path))
  return path
