"""KiTS23 reader for the official on-disk layout (docs/datasets.md §2).

Layout::

  <data_dir>/dataset/            (or <data_dir> itself, or <data_dir>/kits23/dataset)
    kits23.json                  optional clinical metadata (list of dicts, key "case_id")
    case_00000/imaging.nii.gz    HU intensities
    case_00000/segmentation.nii.gz  uint8 labels 0 background, 1 kidney, 2 tumor, 3 cyst
    case_00000/instances/...     per-instance masks, ignored

Natural clients (sites) come from a user-supplied CSV with columns `case,site_id`
(FLamby's `anony_sites.csv` format, cases 0-299) and/or case-number ranges
(e.g. `PHASE_SITE_RANGES`: arterial 0-499 vs nephrogenic 500-588); `site_source`
is the rule the pipeline and `tfds_3d.prepare` share: the given CSV, else
`<data_dir>/anony_sites.csv` if present, else the contrast phase.

Host-side NumPy code.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import numpy as np

from adpfl_jax.data import nifti

PathLike = str | os.PathLike

LABELS = {0: 'background', 1: 'kidney', 2: 'tumor', 3: 'cyst'}
#: Hierarchical evaluation classes (docs/datasets.md §2.4).
HECS = {'kidney_and_mass': (1, 2, 3), 'mass': (2, 3), 'tumor': (2,)}
#: Rasterisation order: later labels overwrite earlier ones (tumor wins).
LABEL_AGGREGATION_ORDER = (1, 3, 2)
TRAINING_CASE_NUMBERS = tuple(range(0, 300)) + tuple(range(400, 589))
TESTING_CASE_NUMBERS = tuple(range(589, 699))
#: Contrast-phase split by case number [neheller/kits23 issue #19], inclusive ranges.
PHASE_SITE_RANGES = ((0, 499, 'arterial'), (500, 588, 'nephrogenic'))
#: File name of the `case,site_id` table (FLamby's) looked for in the data folder.
SITE_CSV = 'anony_sites.csv'

_CASE_RE = re.compile(r'^case_(\d{5})$')



class Kits23Error(ValueError):
  """Invalid KiTS23 data; the message names the case or file."""


@dataclasses.dataclass(frozen=True)
class Kits23Case:
  """One KiTS23 case found on disk.

  Attributes:
    case_id: folder name, e.g. 'case_00000'.
    case_number: integer case number.
    image_path: `imaging.nii.gz`.
    label_path: `segmentation.nii.gz`.
    site: natural client id ('unassigned' when no site source covers it).
    patient_id: grouping key for splits (= case_id: one case per patient).
    metadata: the case's `kits23.json` entry (empty if absent).
  """

  case_id: str
  case_number: int
  image_path: pathlib.Path
  label_path: pathlib.Path
  site: str
  patient_id: str
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def case_id(number: int) -> str:
  """Folder name of a case number: 7 -> 'case_00007'."""
  return f'case_{int(number):05d}'


def case_number(name: str) -> int:
  """Case number of a folder name: 'case_00007' -> 7."""
  m = _CASE_RE.match(name)
  if m is None:
    raise Kits23Error(f'{name!r} is not a KiTS23 case name (case_XXXXX).')
  return int(m.group(1))


def find_dataset_dir(data_dir: PathLike) -> pathlib.Path:
  """Returns the folder holding the `case_XXXXX/` folders.

  Accepts the repository root (`kits23/`), its `dataset/` folder, or a folder
  with `kits23/dataset/` inside.

  Raises:
    FileNotFoundError: `data_dir` does not exist.
    Kits23Error: no `case_XXXXX` folder found; the message names `data_dir`.
  """
  root = pathlib.Path(data_dir)
  if not root.is_dir():
    raise FileNotFoundError(f'KiTS23 data directory not found: {root}')
  for cand in (root, root / 'dataset', root / 'kits23' / 'dataset'):
    if cand.is_dir() and any(_CASE_RE.match(p.name) for p in cand.iterdir() if p.is_dir()):
      return cand
  raise Kits23Error(
      f'No KiTS23 case folders (case_XXXXX/) found in {root}, {root / "dataset"} or '
      f'{root / "kits23" / "dataset"}.'
  )


def read_site_csv(path: PathLike) -> dict[int, str]:
  """Reads a case -> site table with columns `case,site_id`.

  The `case` column may hold 'case_00012', '00012' or '12'.

  Returns:
    Mapping from case number to site id (a string).

  Raises:
    Kits23Error: missing columns, unparsable case or duplicate case; names the
      file and row.
  """
  path = pathlib.Path(path)
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    fields = [c.strip() for c in (reader.fieldnames or [])]
    if 'case' not in fields or 'site_id' not in fields:
      raise Kits23Error(f'{path}: expected columns "case,site_id", found {fields}.')
    sites: dict[int, str] = {}
    for row_num, row in enumerate(reader, start=2):
      row = {(k or '').strip(): (v or '').strip() for k, v in row.items()}
      m = re.fullmatch(r'(?:case_)?(\d+)', row['case'])
      if m is None or not row['site_id']:
        raise Kits23Error(f'{path}, line {row_num}: bad case/site_id {row["case"]!r}, '
                          f'{row["site_id"]!r}.')
      num = int(m.group(1))
      if num in sites:
        raise Kits23Error(f'{path}, line {row_num}: case {case_id(num)} listed twice.')
      sites[num] = row['site_id']
  return sites


def _read_metadata(dataset_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
  path = dataset_dir / 'kits23.json'
  if not path.is_file():
    return {}
  try:
    entries = json.loads(path.read_text(encoding='utf-8'))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise Kits23Error(f'{path}: not valid JSON ({e}).') from e
  if not isinstance(entries, list) or not all(
      isinstance(e, dict) and 'case_id' in e for e in entries
  ):
    raise Kits23Error(f'{path}: expected a list of objects with a "case_id" key.')
  return {str(e['case_id']): e for e in entries}


def site_of(
    number: int,
    site_table: Mapping[int, str] | None,
    site_ranges: Sequence[tuple[int, int, str]] | None,
    default_site: str = 'unassigned',
) -> str:
  """Site of a case: the CSV table first, then the first matching range."""
  if site_table and number in site_table:
    return str(site_table[number])
  for lo, hi, name in site_ranges or ():
    if lo <= number <= hi:
      return str(name)
  return default_site


def site_source(
    data_dir: PathLike, site_csv: PathLike | None = None
) -> tuple[str | None, tuple[tuple[int, int, str], ...] | None, str]:
  """Where the natural sites of the cases under `data_dir` come from.

  Args:
    data_dir: the KiTS23 folder.
    site_csv: a `case,site_id` CSV; None or '' looks for `<data_dir>/anony_sites.csv`.

  Returns:
    `(site_csv, site_ranges, description)` for `scan`: the CSV (cases it does not list get
    the default site), or else `PHASE_SITE_RANGES` (the contrast phase by case number).
  """
  if not site_csv and (pathlib.Path(data_dir) / SITE_CSV).is_file():
    site_csv = pathlib.Path(data_dir) / SITE_CSV
  if site_csv:
    return str(site_csv), None, f'case,site_id table {site_csv}'
  return None, PHASE_SITE_RANGES, 'contrast phase by case number (no case,site_id CSV)'


def _some(names, limit: int = 20) -> str:
  return ', '.join(names[:limit]) + (' …' if len(names) > limit else '')


def scan(
    data_dir: PathLike,
    *,
    site_csv: PathLike | None = None,
    site_ranges: Sequence[tuple[int, int, str]] | None = None,
    default_site: str = 'unassigned',
) -> list[Kits23Case]:
  """Lists the labelled KiTS23 cases under `data_dir`, sorted by case number.

  Cases without `segmentation.nii.gz` (e.g. test cases) or without
  `imaging.nii.gz` (not yet downloaded) are skipped with a logged notice;
  `instances/` folders are ignored.

  Args:
    data_dir: see `find_dataset_dir`.
    site_csv: optional `case,site_id` CSV (takes precedence over ranges).
    site_ranges: optional inclusive `(first, last, site)` case-number ranges,
      e.g. `PHASE_SITE_RANGES`.
    default_site: site of cases no source covers.

  Returns:
    The cases, with their site and `kits23.json` metadata.

  Raises:
    FileNotFoundError / Kits23Error: missing or empty directory, or no usable
      case; the message names the directory.
  """
  dataset_dir = find_dataset_dir(data_dir)
  meta = _read_metadata(dataset_dir)
  site_table = read_site_csv(site_csv) if site_csv is not None else None
  cases, no_seg, no_img = [], [], []
  for folder in sorted(dataset_dir.iterdir()):
    m = _CASE_RE.match(folder.name)
    if not folder.is_dir() or m is None:
      continue
    image_path, label_path = folder / 'imaging.nii.gz', folder / 'segmentation.nii.gz'
    if not label_path.is_file():
      no_seg.append(folder.name)
      continue
    if not image_path.is_file():
      no_img.append(folder.name)
      continue
    number = int(m.group(1))
    cases.append(
        Kits23Case(
            case_id=folder.name,
            case_number=number,
            image_path=image_path,
            label_path=label_path,
            site=site_of(number, site_table, site_ranges, default_site),
            patient_id=folder.name,
            metadata=meta.get(folder.name, {}),
        )
    )
  if no_seg:
    print(f'note: KiTS23: skipped {len(no_seg)} case(s) without segmentation.nii.gz in '
          f'{dataset_dir}: {_some(no_seg)}', flush=True)
  if no_img:
    print(f'note: KiTS23: skipped {len(no_img)} case(s) without imaging.nii.gz in {dataset_dir} '
          f'(download the images with kits23_download_data): {_some(no_img)}', flush=True)
  if not cases:
    raise Kits23Error(
        f'No usable KiTS23 case in {dataset_dir}: {len(no_seg)} without segmentation, '
        f'{len(no_img)} without imaging.'
    )
  return cases


def load_case(case: Kits23Case) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
  """Loads one case.

  Args:
    case: from `scan`.

  Returns:
    `(image, labels, spacing)`: image float32 HU (z, y, x); labels uint8 in
    {0, 1, 2, 3} (z, y, x); spacing (z, y, x) in mm from the image header.

  Raises:
    Kits23Error: image/segmentation shape or spacing mismatch, non-integer
      labels or labels outside {0, 1, 2, 3}; the message names the case.
    nifti.NiftiError: unreadable file or NaN intensities (names the file).
  """
  image, spacing = nifti.read_nifti(case.image_path)
  labels, label_spacing = nifti.read_nifti(case.label_path)
  if image.shape != labels.shape:
    raise Kits23Error(
        f'{case.case_id}: imaging shape {image.shape} != segmentation shape {labels.shape} '
        f'({case.image_path}, {case.label_path}).'
    )
  if not np.allclose(spacing, label_spacing, rtol=1e-4, atol=1e-5):
    raise Kits23Error(
        f'{case.case_id}: imaging spacing {spacing} != segmentation spacing {label_spacing}.'
    )
  labels = _check_labels(labels, set(LABELS), case.case_id, case.label_path)
  return image.astype(np.float32), labels, spacing


def _check_labels(labels: np.ndarray, allowed: set[int], name: str,
                  path: pathlib.Path) -> np.ndarray:
  """Validates integer labels in `allowed` and returns them as uint8."""
  values = np.unique(labels)
  if np.issubdtype(values.dtype, np.floating) and not np.all(values == np.round(values)):
    raise Kits23Error(f'{name}: non-integer label values in {path}: {values[:10].tolist()}.')
  bad = sorted(set(values.astype(np.int64).tolist()) - allowed)
  if bad:
    raise Kits23Error(
        f'{name}: labels {bad} outside the label map {sorted(allowed)} in {path}.'
    )
  return labels.astype(np.uint8)
