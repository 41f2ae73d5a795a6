"""BraTS 2024 adult glioma (BraTS-GLI) and BraTS 2021 readers (docs/datasets.md §3).

BraTS 2024 layout (one or more of the three release folders under `data_dir`)::

  training_data1_v2/          1350 cases with -seg
  training_data_additional/   271 cases with -seg
  validation_data/            188 cases without -seg
    BraTS-GLI-PPPPP-TTT/BraTS-GLI-PPPPP-TTT-{t1n,t1c,t2w,t2f,seg}.nii.gz
  BraTS-PTG supplementary demographic information and metadata.{csv,xlsx}  (optional)

`PPPPP` is the patient and `TTT` the time point: the patient id (`case_id[:-4]`)
is the grouping key for every split. Labels: 1 NETC, 2 SNFH, 3 ET, 4 RC.

BraTS 2021 / FeTS layout: `BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`
with labels {0, 1 NCR/NET, 2 ED, 4 ET}. `load_case` maps them into the 2024 label
space (4 -> 3; 1 and 2 keep their meaning: NETC and SNFH), so the regions
WT {1,2,3}, TC {1,3}, ET {3} are the 2021 regions WT {1,2,4}, TC {1,4}, ET {4}.
(nnU-Net's Dataset137 remap 4->3, 2->1, 1->2 is its own internal convention and
is deliberately not used here.)

Images come back channels-last, (z, y, x, 4), channel order t1n, t1c, t2w, t2f
(the DKFZ nnU-Net order; for 2021: t1, t1ce, t2, flair).

Host-side NumPy code.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import numpy as np

from adpfl_jax.data import nifti

PathLike = str | os.PathLike

RELEASE_FOLDERS = ('training_data1_v2', 'training_data_additional', 'validation_data')
#: `Train/Test/Validation ` values per release folder (docs/datasets.md §3.3).
RELEASE_SPLIT_VALUES = {
    'training_data1_v2': 'Train',
    'training_data_additional': 'Train-additional',
    'validation_data': 'Validation',
}
MODALITIES_2024 = ('t1n', 't1c', 't2w', 't2f')
MODALITIES_2021 = ('t1', 't1ce', 't2', 'flair')
LABELS_2024 = {0: 'background', 1: 'NETC', 2: 'SNFH', 3: 'ET', 4: 'RC'}
LABELS_2021 = {0: 'background', 1: 'NCR/NET', 2: 'ED', 4: 'ET'}
#: BraTS 2021 label -> BraTS 2024 label.
BRATS2021_TO_2024 = {0: 0, 1: 1, 2: 2, 4: 3}
#: Evaluation regions in the 2024 label space (docs/datasets.md §3.4).
REGIONS = {
    'WT': (1, 2, 3), 'TC': (1, 3), 'ET': (3,), 'NETC': (1,), 'SNFH': (2,), 'RC': (4,)
}
SITES_2024 = ('Duke', 'Indiana', 'Missouri', 'UCSD', 'UCSF')
#: Default metadata sheet name (seen as .xlsx and .csv).
METADATA_STEM = 'BraTS-PTG supplementary demographic information and metadata'
GLI_POSTOP_SHAPE = (182, 218, 182)

_CASE_2024_RE = re.compile(r'^BraTS-GLI-(\d{5})-(\d{3})$')
_CASE_2021_RE = re.compile(r'^BraTS2021_(\d{5})$')



class BratsError(ValueError):
  """Invalid BraTS data; the message names the case, modality or file."""


@dataclasses.dataclass(frozen=True)
class BratsCase:
  """One BraTS case (one patient at one time point).

  Attributes:
    case_id: folder name, e.g. 'BraTS-GLI-00005-101' or 'BraTS2021_00000'.
    patient_id: grouping key ('BraTS-GLI-00005'; the case id for BraTS 2021).
    timepoint: 'TTT' for BraTS 2024 names, '' for BraTS 2021.
    naming: 'brats2024' or 'brats2021'.
    release: release folder name ('' when cases sit directly in `data_dir`).
    image_paths: modality files in channel order.
    label_path: `-seg` file, or None (validation cases).
    site: natural client id ('unassigned' when the metadata has none).
    metadata: the case's metadata row (stripped column names), may be empty.
  """

  case_id: str
  patient_id: str
  timepoint: str
  naming: str
  release: str
  image_paths: tuple[pathlib.Path, ...]
  label_path: pathlib.Path | None
  site: str
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  @property
  def modalities(self) -> tuple[str, ...]:
    return MODALITIES_2024 if self.naming == 'brats2024' else MODALITIES_2021


def patient_id(case_id: str) -> str:
  """Patient prefix: 'BraTS-GLI-00005-101' -> 'BraTS-GLI-00005' (docs/datasets.md §3.1)."""
  if _CASE_2024_RE.match(case_id):
    return case_id[:-4]
  return case_id


def read_metadata(path: PathLike) -> dict[str, dict[str, str]]:
  """Reads the BraTS-PTG metadata sheet (.csv, or .xlsx with openpyxl).

  Column names are stripped of surrounding whitespace (the raw sheet has
  'Train/Test/Validation ' and 'Glioma type ' with a trailing space).

  Returns:
    Mapping `BraTS Subject ID` -> row dict (stripped keys and values).

  Raises:
    BratsError: no `BraTS Subject ID` column, duplicated subject, or an
      .xlsx file without openpyxl installed; names the file.
  """
  path = pathlib.Path(path)
  if path.suffix.lower() in ('.xlsx', '.xls'):
    try:
      import openpyxl  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise BratsError(
          f'{path}: reading .xlsx needs openpyxl (pip install openpyxl), or save the sheet '
          'as CSV.'
      ) from e
    wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    rows = [['' if v is None else str(v) for v in r] for r in wb.worksheets[0].iter_rows(
        values_only=True)]
  else:
    with open(path, newline='', encoding='utf-8-sig') as f:
      rows = list(csv.reader(f))
  if not rows:
    raise BratsError(f'{path}: empty metadata sheet.')
  header = [h.strip() for h in rows[0]]
  if 'BraTS Subject ID' not in header:
    raise BratsError(f'{path}: no "BraTS Subject ID" column; found {header}.')
  table: dict[str, dict[str, str]] = {}
  for line, values in enumerate(rows[1:], start=2):
    if not any(v.strip() for v in values):
      continue
    row = {h: v.strip() for h, v in zip(header, values)}
    sid = row['BraTS Subject ID']
    if sid in table:
      raise BratsError(f'{path}, line {line}: subject {sid} listed twice.')
    table[sid] = row
  return table


def read_fets_partitions(path: PathLike) -> dict[str, str]:
  """Reads FeTS `partitioning_{1,2}.csv` (`Partition_ID,Subject_ID`).

  Returns:
    Mapping 5-digit subject number -> partition id, e.g. {'00000': '1'}; the
    number is what `FeTS2022_XXXXX` and `BraTS2021_XXXXX` names share.
  """
  path = pathlib.Path(path)
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    fields = [c.strip() for c in (reader.fieldnames or [])]
    if 'Partition_ID' not in fields or 'Subject_ID' not in fields:
      raise BratsError(f'{path}: expected columns "Partition_ID,Subject_ID", found {fields}.')
    out = {}
    for line, row in enumerate(reader, start=2):
      row = {(k or '').strip(): (v or '').strip() for k, v in row.items()}
      m = re.search(r'(\d{5})$', row['Subject_ID'])
      if m is None:
        raise BratsError(f'{path}, line {line}: bad Subject_ID {row["Subject_ID"]!r}.')
      out[m.group(1)] = row['Partition_ID']
  return out


def _case_dirs(root: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
  """(release, case folder) pairs under root, its release folders, one level down."""
  bases = [('', root)]
  for sub in sorted(p for p in root.iterdir() if p.is_dir()):
    if sub.name in RELEASE_FOLDERS:
      bases.append((sub.name, sub))
    else:
      bases += [(r, sub / r) for r in RELEASE_FOLDERS if (sub / r).is_dir()]
  found = []
  for release, base in bases:
    for d in sorted(base.iterdir()):
      if d.is_dir() and (_CASE_2024_RE.match(d.name) or _CASE_2021_RE.match(d.name)):
        found.append((release, d))
  return found


def _find_metadata(root: pathlib.Path) -> pathlib.Path | None:
  for suffix in ('.csv', '.xlsx'):
    p = root / (METADATA_STEM + suffix)
    if p.is_file():
      return p
  return None


def scan(
    data_dir: PathLike,
    *,
    releases: Sequence[str] | None = None,
    metadata_path: PathLike | None = None,
    site_column: str = 'Site',
    partition_csv: PathLike | None = None,
    default_site: str = 'unassigned',
    require_labels: bool = True,
) -> list[BratsCase]:
  """Lists BraTS cases under `data_dir`, sorted by case id.

  Args:
    data_dir: folder holding the release folders, or the case folders.
    releases: keep only these release folders (e.g. `('training_data1_v2',)`).
    metadata_path: metadata sheet; default: `METADATA_STEM` + .csv/.xlsx in
      `data_dir` if present.
    site_column: metadata column giving the natural client ('Site';
      alternatives: 'Manufacturer', 'Magnetic Field Strength').
    partition_csv: FeTS `partitioning_*.csv` giving sites for BraTS 2021 names.
    default_site: site of cases that no source covers.
    require_labels: skip (with a logged notice) cases without a `-seg` file.

  Returns:
    The cases.

  Raises:
    FileNotFoundError: `data_dir` does not exist.
    BratsError: no case found, a modality file missing (names the case and
      modality), a case id found twice, or an unknown `site_column`.
  """
  root = pathlib.Path(data_dir)
  if not root.is_dir():
    raise FileNotFoundError(f'BraTS data directory not found: {root}')
  meta_path = pathlib.Path(metadata_path) if metadata_path else _find_metadata(root)
  meta = read_metadata(meta_path) if meta_path else {}
  if meta and site_column not in next(iter(meta.values())):
    raise BratsError(f'{meta_path}: no column {site_column!r} for sites.')
  partitions = read_fets_partitions(partition_csv) if partition_csv else {}

  cases: dict[str, BratsCase] = {}
  unlabeled = []
  for release, folder in _case_dirs(root):
    if releases is not None and release not in releases:
      continue
    name = folder.name
    m24 = _CASE_2024_RE.match(name)
    if m24:
      naming, mods, sep, tp = 'brats2024', MODALITIES_2024, '-', m24.group(2)
    else:
      naming, mods, sep, tp = 'brats2021', MODALITIES_2021, '_', ''
    paths = []
    for mod in mods:
      p = folder / f'{name}{sep}{mod}.nii.gz'
      if not p.is_file():
        raise BratsError(f'{name}: missing modality {mod!r} (expected {p}).')
      paths.append(p)
    seg = folder / f'{name}{sep}seg.nii.gz'
    if not seg.is_file():
      if require_labels:
        unlabeled.append(name)
        continue
      seg = None
    if name in cases:
      raise BratsError(f'{name}: found twice ({cases[name].image_paths[0].parent} and {folder}).')
    row = meta.get(name, {})
    if row.get(site_column):
      site = row[site_column]
    elif naming == 'brats2021' and name[-5:] in partitions:
      site = partitions[name[-5:]]
    else:
      site = default_site
    cases[name] = BratsCase(
        case_id=name,
        patient_id=patient_id(name),
        timepoint=tp,
        naming=naming,
        release=release,
        image_paths=tuple(paths),
        label_path=seg,
        site=site,
        metadata=row,
    )
  if unlabeled:
    print(f'note: BraTS: skipped {len(unlabeled)} case(s) without a -seg file: '
          + ', '.join(unlabeled[:20]) + (' …' if len(unlabeled) > 20 else ''), flush=True)
  if not cases:
    raise BratsError(
        f'No labelled BraTS case folders (BraTS-GLI-PPPPP-TTT/ or BraTS2021_XXXXX/) found in '
        f'{root} or its release folders {RELEASE_FOLDERS} ({len(unlabeled)} unlabelled).'
    )
  return [cases[k] for k in sorted(cases)]


def load_case(
    case: BratsCase,
    *,
    expected_shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
  """Loads one case.

  Args:
    case: from `scan`.
    expected_shape: optional (z, y, x) shape to assert, e.g. `GLI_POSTOP_SHAPE`
      on real BraTS 2024 data.

  Returns:
    `(image, labels, spacing)`: image float32 (z, y, x, 4) in
    `case.modalities` order; labels uint8 (z, y, x) in the 2024 label space
    (BraTS 2021 labels mapped with `BRATS2021_TO_2024`), or None without a
    `-seg` file; spacing (z, y, x) mm from the first modality's header.

  Raises:
    BratsError: shape/spacing mismatch among modalities and segmentation,
      unexpected shape, or labels outside the label map; names the case.
    nifti.NiftiError: unreadable file or NaN intensities (names the file).
  """
  channels, spacing = [], None
  for mod, path in zip(case.modalities, case.image_paths):
    if not path.is_file():
      raise BratsError(f'{case.case_id}: missing modality {mod!r} (expected {path}).')
    arr, sp = nifti.read_nifti(path, dtype=np.float32)
    if channels and arr.shape != channels[0].shape:
      raise BratsError(
          f'{case.case_id}: modality {mod!r} has shape {arr.shape} but '
          f'{case.modalities[0]!r} has {channels[0].shape} ({path}).'
      )
    if spacing is not None and not np.allclose(sp, spacing, rtol=1e-4, atol=1e-5):
      raise BratsError(
          f'{case.case_id}: modality {mod!r} spacing {sp} != {case.modalities[0]!r} spacing '
          f'{spacing} ({path}).'
      )
    spacing = spacing or sp
    channels.append(arr)
  shape = channels[0].shape
  if expected_shape is not None and tuple(shape) != tuple(expected_shape):
    raise BratsError(f'{case.case_id}: shape {shape}, expected {tuple(expected_shape)}.')
  image = np.stack(channels, axis=-1)
  del channels
  if case.label_path is None:
    return image, None, spacing
  labels, _ = nifti.read_nifti(case.label_path)
  if labels.shape != shape:
    raise BratsError(
        f'{case.case_id}: segmentation shape {labels.shape} != image shape {shape} '
        f'({case.label_path}).'
    )
  return image, map_labels(labels, case), spacing


def map_labels(labels: np.ndarray, case: BratsCase) -> np.ndarray:
  """Checks a case's labels against its label map; returns 2024 labels as uint8."""
  allowed = LABELS_2024 if case.naming == 'brats2024' else LABELS_2021
  values = np.unique(labels)
  if np.issubdtype(values.dtype, np.floating) and not np.all(values == np.round(values)):
    raise BratsError(
        f'{case.case_id}: non-integer label values {values[:10].tolist()} in {case.label_path}.')
  bad = sorted(set(values.astype(np.int64).tolist()) - set(allowed))
  if bad:
    raise BratsError(
        f'{case.case_id}: labels {bad} outside the {case.naming} label map {sorted(allowed)} '
        f'in {case.label_path}.'
    )
  labels = labels.astype(np.uint8)
  if case.naming == 'brats2021':
    lut = np.zeros(256, np.uint8)
    for src, dst in BRATS2021_TO_2024.items():
      lut[src] = dst
    labels = lut[labels]
  return labels
