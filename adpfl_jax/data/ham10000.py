"""HAM10000 and ISIC 2018 Task 1 skin-lesion segmentation: reader, federation, phantoms.

Supported on-disk layouts (docs/datasets.md §1.1 and §1.5), detected automatically:

  HAM10000 (Harvard Dataverse doi:10.7910/DVN/DBW86T):

    ROOT/HAM10000_metadata[.csv|.tab]
    ROOT/HAM10000_images_part_1/ISIC_0024306.jpg ...   (any case, e.g. Kaggle's
    ROOT/HAM10000_images_part_2/ISIC_0029306.jpg ...    ham10000_images_part_1/)
    ROOT/HAM10000_segmentations_lesion_tschandl/[HAM10000_segmentations_lesion_tschandl/]
        ISIC_0024306_segmentation.png ...

  ISIC 2018 Task 1 (lesion boundary segmentation):

    ROOT/ISIC2018_Task1-2_{Training,Validation,Test}_Input/ISIC_XXXXXXX.jpg
    ROOT/ISIC2018_Task1_{Training,Validation,Test}_GroundTruth/ISIC_XXXXXXX_segmentation.png

Images are RGB JPEGs; masks are 8-bit PNGs with lesion = 255. Masks are decoded
as greyscale and thresholded at > 127 (docs/datasets.md §1.4). `load_example` returns
the image as float32 in [0, 1] (uint8 / 255; docs/datasets.md §1.4 gives no other
intensity recipe for dermoscopy, so per-channel standardisation, if wanted, is
left to the model input pipeline) and the mask as uint8 in {0, 1}.

Natural clients are the metadata's `dataset` column (acquisition source,
docs/datasets.md §1.3). When it is absent (Kaggle copy, ISIC 2018) `load_federation`
falls back to a synthetic partition and says so in the summary.

Typical use:

  >>> fed = load_federation('/data/ham10000', image_size=(128, 128))  # doctest: +SKIP
  >>> print(partition.format_summary(fed['partition_summary']))  # doctest: +SKIP
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import logging
import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw

from adpfl_jax.data import partition as partition_lib

PathLike = str | os.PathLike

REQUIRED_COLUMNS = ('lesion_id', 'image_id', 'dx')
METADATA_COLUMNS = (
    'lesion_id', 'image_id', 'dx', 'dx_type', 'age', 'sex', 'localization', 'dataset'
)
METADATA_NAMES = ('HAM10000_metadata.csv', 'HAM10000_metadata.tab', 'HAM10000_metadata')
IMAGE_DIR_PATTERN = re.compile(r'^ham10000_images_part_\d+$', re.IGNORECASE)
MASK_DIR_NAME = 'HAM10000_segmentations_lesion_tschandl'
ISIC2018_SPLITS = ('Training', 'Validation', 'Test')

_IMAGE_RE = re.compile(r'^(ISIC_\d{7})\.jpe?g$', re.IGNORECASE)
_MASK_RE = re.compile(r'^(ISIC_\d{7})_segmentation\.png$', re.IGNORECASE)
_MISSING = ('', 'na', 'nan', 'none', 'null')

# Real per-source class mix (docs/datasets.md §1.3), used to draw phantom `dx`.
_DX_NAMES = ('nv', 'mel', 'bkl', 'bcc', 'akiec', 'vasc', 'df')
_SITE_DX_COUNTS = {
    'vidir_molemax': (3720, 24, 124, 2, 0, 54, 30),
    'vidir_modern': (1832, 680, 475, 211, 32, 82, 51),
    'rosendahl': (803, 342, 490, 296, 295, 3, 30),
    'vienna_dias': (350, 67, 10, 5, 0, 3, 4),
}
_SITE_IMAGES = {'vidir_molemax': 3954, 'vidir_modern': 3363, 'rosendahl': 2259,
                'vienna_dias': 439}
_ALL_DX_COUNTS = (6705, 1113, 1099, 514, 327, 142, 115)
# Lesions with 1..6 images (docs/datasets.md §1.2).
_IMAGES_PER_LESION = (5514, 1423, 490, 34, 5, 4)
_DX_TYPES = (('histo', 5340), ('follow_up', 3704), ('consensus', 902), ('confocal', 69))
_SEXES = (('male', 5406), ('female', 4552), ('unknown', 57))
_LOCALIZATIONS = (
    ('back', 2192), ('lower extremity', 2077), ('trunk', 1404), ('upper extremity', 1118),
    ('abdomen', 1022), ('face', 745), ('chest', 407), ('foot', 319), ('unknown', 234),
    ('neck', 168), ('scalp', 128), ('hand', 90), ('ear', 56), ('genital', 48), ('acral', 7),
)


class DataError(ValueError):
  """A data file or folder is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One image/mask pair and its metadata.

  Attributes:
    image_id: e.g. 'ISIC_0024306'.
    lesion_id: e.g. 'HAM_0000118'; the image_id when the layout has no lesion ids.
    site: the metadata `dataset` column (acquisition source), or None.
    image_path: the JPEG.
    mask_path: the PNG mask.
    dx: diagnosis ('nv', 'mel', ...) or None.
    dx_type: how dx was confirmed, or None.
    age: age in years, or None when missing.
    sex: 'male', 'female', 'unknown' or None.
    localization: body site, or None.
    layout: 'ham10000' or 'isic2018'.
    split: the ISIC 2018 release split ('train', 'validation', 'test') or None.
  """

  image_id: str
  lesion_id: str
  site: str | None
  image_path: pathlib.Path
  mask_path: pathlib.Path
  dx: str | None = None
  dx_type: str | None = None
  age: float | None = None
  sex: str | None = None
  localization: str | None = None
  layout: str = 'ham10000'
  split: str | None = None


# ---------------------------------------------------------------------------
# Scanning.
# ---------------------------------------------------------------------------


def _child_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in root.iterdir() if p.is_dir())


def _find_metadata(root: pathlib.Path) -> pathlib.Path | None:
  by_lower = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_file()}
  for name in METADATA_NAMES:
    if name.lower() in by_lower:
      return by_lower[name.lower()]
  return None


def detect_layout(data_dir: PathLike) -> str:
  """Returns 'ham10000' or 'isic2018' for `data_dir`, or raises DataError."""
  root = pathlib.Path(data_dir)
  if not root.exists():
    raise DataError(f'Data directory {root} does not exist.')
  if not root.is_dir():
    raise DataError(f'Data path {root} is not a directory.')
  entries = list(root.iterdir())
  if not entries:
    raise DataError(
        f'Data directory {root} is empty: expected the HAM10000 layout '
        f'({METADATA_NAMES[0]}, HAM10000_images_part_1/, {MASK_DIR_NAME}/) or the ISIC 2018 '
        'Task 1 layout (ISIC2018_Task1-2_Training_Input/, ISIC2018_Task1_Training_GroundTruth/).'
    )
  names = [p.name.lower() for p in entries]
  if _find_metadata(root) is not None or any(IMAGE_DIR_PATTERN.match(n) for n in names):
    return 'ham10000'
  if any(re.match(r'^isic2018_task1-2_\w+_input$', n) for n in names):
    return 'isic2018'
  raise DataError(
      f'Data directory {root} matches no known layout: found {sorted(p.name for p in entries)[:10]}'
      f', expected {METADATA_NAMES[0]} + HAM10000_images_part_1/ (HAM10000) or '
      'ISIC2018_Task1-2_Training_Input/ (ISIC 2018 Task 1).'
  )


def _index_files(
    dirs: Sequence[pathlib.Path], pattern: re.Pattern[str], recursive: bool
) -> dict[str, pathlib.Path]:
  """Maps image_id -> file for names matching `pattern` (first in sorted order wins)."""
  found: dict[str, pathlib.Path] = {}
  for d in dirs:
    paths = d.rglob('*') if recursive else d.iterdir()
    for p in sorted(paths):
      m = pattern.match(p.name)
      if m and p.is_file():
        found.setdefault(m.group(1).upper(), p)
  return found


def _parse_age(value: str | None, path: pathlib.Path, row: int) -> float | None:
  if value is None or value.strip().lower() in _MISSING:
    return None
  try:
    return float(value)
  except ValueError:
    raise DataError(f'{path}, data row {row}: age {value!r} is not a number.') from None


def _opt(value: str | None) -> str | None:
  if value is None or value.strip().lower() in _MISSING:
    return None
  return value.strip()


def read_metadata(path: PathLike) -> list[dict[str, str]]:
  """Reads the HAM10000 metadata (.csv, tab-separated .tab, or no extension).

  The delimiter is sniffed from the header line (tab or comma). Column names are
  stripped of spaces, quotes and a UTF-8 BOM.

  Args:
    path: the metadata file.

  Returns:
    One dict per data row, keyed by column name.

  Raises:
    DataError: if the file is empty or lacks a required column
      (lesion_id, image_id, dx).
  """
  path = pathlib.Path(path)
  text = path.read_text(encoding='utf-8-sig', errors='replace')
  lines = text.splitlines()
  if not lines or not lines[0].strip():
    raise DataError(f'Metadata file {path} is empty.')
  delimiter = '\t' if '\t' in lines[0] else ','
  reader = csv.reader(io.StringIO(text), delimiter=delimiter)
  header = [h.strip().strip('"').strip() for h in next(reader)]
  missing = [c for c in REQUIRED_COLUMNS if c not in header]
  if missing:
    raise DataError(
        f'Metadata file {path} lacks required column(s) {missing}; found columns {header}. '
        f'Expected the HAM10000 header {",".join(METADATA_COLUMNS)} ("dataset" is optional).'
    )
  rows = []
  for i, values in enumerate(reader, start=1):
    if not values or all(not v.strip() for v in values):
      continue
    if len(values) != len(header):
      raise DataError(
          f'{path}, data row {i}: {len(values)} fields, but the header has {len(header)}.'
      )
    rows.append({h: v.strip() for h, v in zip(header, values)})
  return rows


def _scan_ham10000(root: pathlib.Path, strict: bool) -> list[Record]:
  meta_path = _find_metadata(root)
  if meta_path is None:
    raise DataError(
        f'No HAM10000 metadata file in {root}: expected one of {list(METADATA_NAMES)}.'
    )
  image_dirs = [d for d in _child_dirs(root) if IMAGE_DIR_PATTERN.match(d.name)]
  if not image_dirs:
    raise DataError(
        f'No image folder in {root}: expected HAM10000_images_part_1/ and '
        'HAM10000_images_part_2/.'
    )
  mask_dirs = [d for d in _child_dirs(root) if d.name.lower() == MASK_DIR_NAME.lower()]
  if not mask_dirs:
    raise DataError(f'No mask folder in {root}: expected {MASK_DIR_NAME}/ with '
                    'ISIC_XXXXXXX_segmentation.png files.')
  images = _index_files(image_dirs, _IMAGE_RE, recursive=False)
  masks = _index_files(mask_dirs, _MASK_RE, recursive=True)
  if not images:
    raise DataError(f'No ISIC_XXXXXXX.jpg images in {[str(d) for d in image_dirs]}.')
  _check_pairs(images, masks, strict)

  rows = read_metadata(meta_path)
  has_site = bool(rows) and 'dataset' in rows[0]
  if not has_site:
    logging.info('%s has no "dataset" column: natural sites are unavailable.', meta_path)
  records, seen = [], set()
  for i, row in enumerate(rows, start=1):
    image_id = row['image_id'].upper()
    if not image_id:
      raise DataError(f'{meta_path}, data row {i}: empty image_id.')
    if image_id in seen:
      raise DataError(f'{meta_path}, data row {i}: duplicate image_id {image_id}.')
    seen.add(image_id)
    if image_id not in images:
      if strict:
        raise DataError(
            f'{meta_path}, data row {i}: image {image_id}.jpg not found in '
            f'{[str(d) for d in image_dirs]}.'
        )
      continue
    if image_id not in masks:
      continue  # Only reachable with strict=False (checked in _check_pairs).
    records.append(Record(
        image_id=image_id,
        lesion_id=row['lesion_id'] or image_id,
        site=_opt(row.get('dataset')) if has_site else None,
        image_path=images[image_id],
        mask_path=masks[image_id],
        dx=_opt(row['dx']),
        dx_type=_opt(row.get('dx_type')),
        age=_parse_age(row.get('age'), meta_path, i),
        sex=_opt(row.get('sex')),
        localization=_opt(row.get('localization')),
        layout='ham10000',
    ))
  unlisted = sorted(set(images) - seen)
  if unlisted and strict:
    raise DataError(
        f'Image {images[unlisted[0]]} ({len(unlisted)} image(s) in all) is not listed in '
        f'metadata file {meta_path}.'
    )
  return sorted(records, key=lambda r: r.image_id)


def _check_pairs(
    images: dict[str, pathlib.Path], masks: dict[str, pathlib.Path], strict: bool
) -> None:
  if not strict:
    return
  no_mask = sorted(set(images) - set(masks))
  if no_mask:
    raise DataError(
        f'Image {images[no_mask[0]]} has no mask {no_mask[0]}_segmentation.png '
        f'({len(no_mask)} image(s) without mask in all).'
    )
  no_image = sorted(set(masks) - set(images))
  if no_image:
    raise DataError(
        f'Mask {masks[no_image[0]]} has no image {no_image[0]}.jpg '
        f'({len(no_image)} mask(s) without image in all).'
    )


def _scan_isic2018(root: pathlib.Path, strict: bool) -> list[Record]:
  by_lower = {d.name.lower(): d for d in _child_dirs(root)}
  records = []
  for split in ISIC2018_SPLITS:
    in_dir = by_lower.get(f'isic2018_task1-2_{split.lower()}_input')
    if in_dir is None:
      continue
    gt_dir = by_lower.get(f'isic2018_task1_{split.lower()}_groundtruth')
    if gt_dir is None:
      if strict:
        raise DataError(
            f'{in_dir} has no ground-truth folder: expected '
            f'{root / f"ISIC2018_Task1_{split}_GroundTruth"}.'
        )
      continue
    images = _index_files([in_dir], _IMAGE_RE, recursive=False)
    masks = _index_files([gt_dir], _MASK_RE, recursive=True)
    _check_pairs(images, masks, strict)
    tag = {'Training': 'train', 'Validation': 'validation', 'Test': 'test'}[split]
    for image_id in sorted(set(images) & set(masks)):
      records.append(Record(
          image_id=image_id, lesion_id=image_id, site=None, image_path=images[image_id],
          mask_path=masks[image_id], layout='isic2018', split=tag,
      ))
  if not records:
    raise DataError(f'No ISIC_XXXXXXX.jpg / _segmentation.png pairs found under {root}.')
  return records


def scan(data_dir: PathLike, *, strict: bool = True) -> list[Record]:
  """Lists every image/mask pair of a HAM10000 or ISIC 2018 Task 1 folder.

  Args:
    data_dir: the release root (see the module docstring for the layouts).
    strict: if True (default), any image without mask, mask without image,
      metadata row without image or image without metadata row is an error. If
      False, such files are skipped.

  Returns:
    Records sorted by image_id (ISIC 2018: by split, then image_id).

  Raises:
    DataError: naming the offending folder, file or column.
  """
  root = pathlib.Path(data_dir)
  layout = detect_layout(root)
  if layout == 'ham10000':
    return _scan_ham10000(root, strict)
  return _scan_isic2018(root, strict)


# ---------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------


def _size_hw(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
  if image_size is None:
    return None
  if isinstance(image_size, int):
    return (image_size, image_size)
  hw = tuple(int(s) for s in image_size)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f'image_size must be an int or (height, width), got {image_size!r}.')
  return hw


def _open(path: pathlib.Path, mode: str, what: str) -> Image.Image:
  try:
    with Image.open(path) as img:
      img.load()
      return img.convert(mode)
  except FileNotFoundError:
    raise DataError(f'{what} file {path} does not exist.') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f'Cannot decode {what} file {path}: {e}') from e


def load_example_uint8(
    record: Record, image_size: int | Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes one pair as uint8: image (H, W, 3) and mask (H, W) in {0, 1}.

  Args:
    record: from `scan`.
    image_size: output (height, width), an int for square, or None to keep the
      native size. The image is resized bilinearly, the mask with nearest
      neighbour after thresholding at > 127.

  Raises:
    DataError: for an unreadable/corrupt file or image and mask of different size.
  """
  hw = _size_hw(image_size)
  img = _open(record.image_path, 'RGB', 'image')
  mask = _open(record.mask_path, 'L', 'mask')
  if img.size != mask.size:
    raise DataError(
        f'Image {record.image_path} is {img.size[1]}x{img.size[0]} (HxW) but its mask '
        f'{record.mask_path} is {mask.size[1]}x{mask.size[0]}.'
    )
  mask = mask.point(lambda v: 255 if v > 127 else 0)
  if hw is not None and (img.size[1], img.size[0]) != hw:
    img = img.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    mask = mask.resize((hw[1], hw[0]), Image.Resampling.NEAREST)
  return np.asarray(img, dtype=np.uint8), (np.asarray(mask) > 127).astype(np.uint8)


def load_example(
    record: Record, image_size: int | Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes one pair: image float32 (H, W, 3) in [0, 1] and mask uint8 (H, W) in {0, 1}.

  See `load_example_uint8` for resizing and errors; the image is uint8 / 255.
  """
  img, mask = load_example_uint8(record, image_size)
  return img.astype(np.float32) / np.float32(255.0), mask


def load_arrays(
    records: Sequence[Record],
    image_size: int | Sequence[int] | None,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Stacks `load_example` over records: x (N, H, W, 3) float32, y (N, H, W) uint8."""
  hw = _size_hw(image_size)
  if not records:
    shape = hw or (0, 0)
    return np.zeros((0, *shape, 3), np.float32), np.zeros((0, *shape), np.uint8)
  if num_workers > 0:
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
      pairs = list(pool.map(lambda r: load_example(r, hw), records))
  else:
    pairs = [load_example(r, hw) for r in records]
  shapes = {p[0].shape for p in pairs}
  if len(shapes) > 1:
    raise DataError(
        f'Images have different sizes {sorted(shapes)[:4]}: pass image_size=(height, width).'
    )
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# ---------------------------------------------------------------------------
# Federation.
# ---------------------------------------------------------------------------


def _subsample(records: list[Record], max_examples: int, seed: int) -> list[Record]:
  """Random subset of whole lesions with at most `max_examples` images."""
  groups = np.array([r.lesion_id for r in records])
  uniq = np.unique(groups)
  order = np.random.default_rng([seed, 7]).permutation(len(uniq))
  by_group: dict[str, list[int]] = {}
  for i, g in enumerate(groups):
    by_group.setdefault(str(g), []).append(i)
  keep: list[int] = []
  for u in order:
    members = by_group[str(uniq[u])]
    if len(keep) + len(members) <= max_examples:
      keep.extend(members)
    if len(keep) == max_examples:
      break
  return [records[i] for i in sorted(keep)]


def load_federation(
    data_dir: PathLike,
    image_size: int | Sequence[int] | None,
    partition: str = 'natural',
    num_clients: int | None = None,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_examples: int | None = None,
    *,
    min_size: int = 1,
    natural_fallback: str | None = 'dirichlet',
    num_workers: int = 0,
    strict: bool = True,
) -> dict[str, Any]:
  """Loads a HAM10000 / ISIC 2018 folder as per-client train and test arrays.

  Partitioning is done on whole lesions (`lesion_id`), and each client's
  train/test split is grouped by lesion as well, so no lesion appears in two
  clients or on both sides of a split.

  Args:
    data_dir: the release root.
    image_size: (height, width) or int; None keeps the native size (all images
      must then have the same size).
    partition: 'natural' (metadata `dataset` column; lesions found at several
      sources go to the source with most of their images), 'iid' or 'dirichlet'
      (Dirichlet(alpha) over `dx`; quantity skew when there is no `dx`).
    num_clients: number of clients for 'iid' / 'dirichlet' (default 4, the
      number of HAM10000 sources); for 'natural' it must be None or equal the
      number of sites.
    alpha: Dirichlet concentration.
    test_fraction: fraction of each client's images in its test split.
    seed: seed of every random choice (subsampling, partition, splits).
    max_examples: if set, keep a random subset of whole lesions with at most
      this many images (for smoke runs).
    min_size: minimum images per client for 'dirichlet'.
    natural_fallback: partition to use when 'natural' is requested but there are
      no sites ('dirichlet' or 'iid'); None raises instead.
    num_workers: threads for JPEG/PNG decoding (0: sequential).
    strict: see `scan`.

  Returns:
    `{'clients': [{'name', 'train': (x, y), 'test': (x, y), 'train_ids',
    'test_ids'}], 'partition_summary': dict}` with x float32 (N, H, W, 3) in
    [0, 1] and y uint8 (N, H, W) in {0, 1}.
  """
  root = pathlib.Path(data_dir)
  records = scan(root, strict=strict)
  if max_examples is not None:
    records = _subsample(records, int(max_examples), seed)
    if not records:
      raise DataError(f'max_examples={max_examples} keeps no whole lesion from {root}.')
  lesions = np.array([r.lesion_id for r in records])
  has_dx = all(r.dx is not None for r in records)
  labels = np.array([r.dx if has_dx else '' for r in records])
  meta: dict[str, Any] = {'data_dir': str(root), 'layout': records[0].layout,
                          'partition': partition, 'seed': seed}

  method = partition
  no_site = sum(r.site is None for r in records)
  if partition == 'natural' and no_site:
    if records[0].layout == 'isic2018':
      reason = 'the ISIC 2018 layout has no site metadata'
    elif no_site == len(records):
      reason = 'the metadata has no "dataset" column (or it is empty)'
    else:
      reason = f'{no_site} image(s) have an empty "dataset" value'
    if natural_fallback is None:
      raise DataError(f'Natural partition unavailable for {root}: {reason}.')
    method = natural_fallback
    meta['partition'] = f'{natural_fallback} (fallback: {reason})'
    logging.warning('Natural partition unavailable for %s: %s; using %s.', root, reason,
                    natural_fallback)

  if method == 'natural':
    parts = partition_lib.natural([r.site for r in records], groups=lesions)
    if num_clients is not None and num_clients != len(parts):
      raise ValueError(
          f'partition="natural" gives {len(parts)} clients {list(parts)}, but num_clients='
          f'{num_clients} was requested; pass num_clients=None or use iid/dirichlet.'
      )
    names, indices = list(parts), list(parts.values())
  elif method in ('iid', 'dirichlet'):
    k = 4 if num_clients is None else int(num_clients)
    if method == 'iid':
      indices = partition_lib.iid(len(records), k, seed, groups=lesions)
    else:
      skew = 'label' if has_dx else 'quantity'
      meta.update(alpha=alpha, skew=skew)
      indices = partition_lib.dirichlet(labels, k, alpha, seed, min_size, groups=lesions,
                                        skew=skew)
    names = [f'client_{i}' for i in range(k)]
  else:
    raise ValueError(
        f"Unknown partition {partition!r}: expected 'natural', 'iid' or 'dirichlet'."
    )

  meta['test_fraction'] = test_fraction
  clients, train_all, test_all = [], [], []
  for c, (name, idx) in enumerate(zip(names, indices)):
    tr, te = partition_lib.grouped_train_test_split(lesions[idx], test_fraction, [seed, c])
    tr, te = idx[tr], idx[te]
    train_all.append(tr)
    test_all.append(te)
    clients.append({
        'name': name,
        'train': load_arrays([records[i] for i in tr], image_size, num_workers),
        'test': load_arrays([records[i] for i in te], image_size, num_workers),
        'train_ids': [records[i].image_id for i in tr],
        'test_ids': [records[i].image_id for i in te],
    })
  summary = partition_lib.partition_summary(
      names, train_all, test_all, labels=labels if has_dx else None, groups=lesions, meta=meta
  )
  return {'clients': clients, 'partition_summary': summary}


# ---------------------------------------------------------------------------
# Phantoms.
# ---------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, hw: tuple[int, int], cells: int) -> np.ndarray:
  """Smooth noise in [0, 1] of shape hw (bilinear upsampling of a coarse grid)."""
  coarse = rng.random((cells, max(2, round(cells * hw[1] / hw[0]))), dtype=np.float32)
  img = Image.fromarray(coarse).resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
  return np.asarray(img, dtype=np.float32)


def _site_style(name: str, index: int, seed: int) -> dict[str, Any]:
  """Per-source acquisition style: colour cast, brightness, vignetting."""
  rng = np.random.default_rng([seed, index, 11])
  return {
      'cast': rng.uniform(-18, 18, size=3).astype(np.float32),
      'gain': float(rng.uniform(0.8, 1.1)),
      'vignette': float(rng.uniform(0.15, 0.5)),
      'hair_rate': float(rng.uniform(0.5, 3.0)),
      'name': name,
  }


def _lesion_shape(rng: np.random.Generator) -> dict[str, Any]:
  k = int(rng.integers(3, 7))
  return {
      'radius': float(rng.uniform(0.18, 0.33)),
      'amp': rng.uniform(0.02, 0.16, size=k) / np.arange(1, k + 1) ** 0.5,
      'phase': rng.uniform(0, 2 * np.pi, size=k),
      'ecc': float(rng.uniform(0.75, 1.0)),
      'pigment': (np.array([135, 80, 55]) * rng.uniform(0.7, 1.1)
                  + rng.uniform(-8, 8, size=3)).astype(np.float32),
      'dark': float(rng.uniform(0.3, 0.7)),
  }


def _render_phantom(
    rng: np.random.Generator, hw: tuple[int, int], shape: dict[str, Any],
    style: dict[str, Any], dx: str,
) -> tuple[np.ndarray, np.ndarray]:
  """Renders one dermoscopy-like RGB uint8 image and its {0, 255} mask."""
  h, w = hw
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  scale = float(min(h, w))
  cy = h / 2 + rng.normal(0, 0.06) * h
  cx = w / 2 + rng.normal(0, 0.06) * w
  rot = rng.uniform(0, 2 * np.pi)
  dy, dx_ = (yy - cy) / scale, (xx - cx) / scale
  theta = np.arctan2(dy, dx_) - rot
  dist = np.hypot(dy, dx_ * shape['ecc'])
  k = np.arange(1, len(shape['amp']) + 1)[:, None, None]
  wobble = np.sum(shape['amp'][:, None, None] * np.cos(k * theta + shape['phase'][:, None, None]),
                  axis=0)
  radius = shape['radius'] * rng.uniform(0.9, 1.1) * (1.0 + wobble)
  mask = dist < radius
  border = max(0.01, 0.08 * shape['radius'])
  alpha = 1.0 / (1.0 + np.exp(-(radius - dist) / (0.35 * border)))  # fuzzy border

  # Skin: beige with low-frequency texture, site colour cast and radial vignetting.
  skin = np.array([220, 180, 150], np.float32) + style['cast']
  tex = _smooth_noise(rng, hw, 6)[..., None]
  img = skin * (0.92 + 0.12 * tex)
  r_img = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2)) / math.sqrt(2)
  img = img * (1.0 - style['vignette'] * r_img[..., None] ** 2)

  # Lesion: pigment with internal texture, darker towards the centre.
  depth = np.clip(1.0 - dist / np.maximum(radius, 1e-3), 0.0, 1.0)[..., None]
  texture = _smooth_noise(rng, hw, 12)[..., None]
  spots = _smooth_noise(rng, hw, 24)[..., None]
  dark = shape['dark'] + (0.2 if dx == 'mel' else 0.0)
  pigment = shape['pigment'] * (1.0 - dark * depth) * (0.75 + 0.5 * texture)
  pigment = pigment * (1.0 - 0.45 * np.clip((spots - 0.62) / 0.2, 0.0, 1.0))  # dots/globules
  if dx == 'vasc':
    pigment = pigment * np.array([1.3, 0.6, 0.7], np.float32)
  img = img * (1.0 - alpha[..., None]) + pigment * alpha[..., None]
  img = np.clip(img * style['gain'], 0, 255).astype(np.uint8)

  # Artefacts: dark hair curves and, sometimes, ruler ticks (not part of the mask).
  pil = Image.fromarray(img)
  draw = ImageDraw.Draw(pil)
  for _ in range(int(rng.poisson(style['hair_rate']))):
    p0, p1, p2 = (rng.uniform([0, 0], [w, h]) for _ in range(3))
    t = np.linspace(0, 1, 24)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    grey = rng.uniform(15, 55)
    colour = (int(grey * 1.2), int(grey), int(grey * 0.85))
    draw.line([tuple(p) for p in pts], fill=colour, width=max(1, round(scale / 150)))
  if rng.random() < 0.2:
    y0 = h - max(3, h // 20)
    for x in range(max(2, w // 10), w - max(2, w // 10), max(3, w // 40)):
      draw.line([(x, y0), (x, h - 2)], fill=(40, 40, 40), width=1)
  return np.asarray(pil), mask.astype(np.uint8) * 255


def _weighted(rng: np.random.Generator, items: Sequence[tuple[str, int]]) -> str:
  p = np.array([c for _, c in items], np.float64)
  return items[int(rng.choice(len(items), p=p / p.sum()))][0]


def write_phantoms(
    out_dir: PathLike,
    cases: int,
    sites: int | Sequence[str] = 3,
    seed: int = 0,
    image_size: tuple[int, int] = (96, 128),
    layout: str = 'ham10000',
    nested_masks: bool = False,
    metadata_ext: str = '.csv',
    with_dataset_column: bool = True,
) -> pathlib.Path:
  """Writes HAM10000-like dermoscopy phantoms in the real on-disk layout (docs/datasets.md §6.2).

  HAM10000 layout: `cases` JPEGs split over HAM10000_images_part_1/ and _2/
  (consecutive image ids from ISIC_0024306, the first half in part 1), PNG masks
  (mode L, {0, 255}) in HAM10000_segmentations_lesion_tschandl/ (nested twice if
  `nested_masks`), and HAM10000_metadata{metadata_ext} with the real header.
  Lesions have 1 to 6 images drawn with the real frequencies (the first lesion
  has 2 images when cases >= 2); `dx` follows each source's real class mix; at
  least one row has an empty age and one has sex 'unknown' (when cases >= 3).

  ISIC 2018 layout: ISIC2018_Task1-2_{Training,Validation}_Input/ and
  ISIC2018_Task1_{Training,Validation}_GroundTruth/ (a fifth of the cases, when
  >= 5, go to Validation), image sizes varying around `image_size`, and
  LICENSE.txt / ATTRIBUTION.txt files among the inputs.

  Args:
    out_dir: created if needed.
    cases: number of images.
    sites: number of acquisition sources (named like the real ones first), or names.
    seed: seed of everything drawn.
    image_size: (height, width); the real HAM10000 size is (450, 600).
    layout: 'ham10000' or 'isic2018'.
    nested_masks: write masks under the doubly nested mask folder.
    metadata_ext: '.csv' (comma), '.tab' (tab-separated, Dataverse-style quoted
      strings) or '' (comma, FLamby's extension-less copy).
    with_dataset_column: False writes the 7-column Kaggle header.

  Returns:
    `out_dir` as a Path.
  """
  if layout not in ('ham10000', 'isic2018'):
    raise ValueError(f"layout must be 'ham10000' or 'isic2018', got {layout!r}.")
  if metadata_ext not in ('.csv', '.tab', ''):
    raise ValueError(f"metadata_ext must be '.csv', '.tab' or '', got {metadata_ext!r}.")
  if cases < 1:
    raise ValueError(f'cases must be >= 1, got {cases}.')
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  hw = (int(image_size[0]), int(image_size[1]))
  rng = np.random.default_rng(seed)

  if isinstance(sites, int):
    real = list(_SITE_IMAGES)
    site_names = real[:sites] + [f'site_{i}' for i in range(len(real), sites)]
  else:
    site_names = [str(s) for s in sites]
  if not site_names:
    raise ValueError('sites must name at least one source.')
  styles = {n: _site_style(n, i, seed) for i, n in enumerate(site_names)}

  if layout == 'isic2018':
    _write_isic2018(out, cases, hw, rng, styles[site_names[0]])
    return out

  # Lesions: sizes from the real images-per-lesion histogram.
  sizes: list[int] = []
  p_size = np.array(_IMAGES_PER_LESION, np.float64) / sum(_IMAGES_PER_LESION)
  while sum(sizes) < cases:
    s = 2 if not sizes and cases >= 2 else int(rng.choice(6, p=p_size)) + 1
    sizes.append(min(s, cases - sum(sizes)))
  weights = np.array([_SITE_IMAGES.get(n, 2000) for n in site_names], np.float64)
  lesion_site = [site_names[i % len(site_names)] if i < len(site_names)
                 else site_names[int(rng.choice(len(site_names), p=weights / weights.sum()))]
                 for i in range(len(sizes))]
  lesion_ids = rng.choice(np.arange(1, 10**7), size=len(sizes), replace=False)
  image_numbers = 24306 + rng.permutation(cases)

  part_dirs = [out / 'HAM10000_images_part_1', out / 'HAM10000_images_part_2']
  mask_dir = out / MASK_DIR_NAME
  if nested_masks:
    mask_dir = mask_dir / MASK_DIR_NAME
  for d in part_dirs + [mask_dir]:
    d.mkdir(parents=True, exist_ok=True)
  half = math.ceil(cases / 2)
  rows = []
  n = 0
  for lesion, (size, site) in enumerate(zip(sizes, lesion_site)):
    dx_counts = np.array(_SITE_DX_COUNTS.get(site, _ALL_DX_COUNTS), np.float64)
    dx = _DX_NAMES[int(rng.choice(len(_DX_NAMES), p=dx_counts / dx_counts.sum()))]
    shape = _lesion_shape(rng)
    # Fixture checklist (docs/datasets.md §6.1): one empty age, one sex 'unknown'.
    age = '' if lesion == min(1, len(sizes) - 1) else f'{5.0 * int(rng.integers(0, 18)):.1f}'
    sex = 'unknown' if lesion == len(sizes) - 1 else _weighted(rng, _SEXES[:2])
    localization = _weighted(rng, _LOCALIZATIONS)
    dx_type = _weighted(rng, _DX_TYPES)
    for _ in range(size):
      number = int(image_numbers[n])
      image_id = f'ISIC_{number:07d}'
      img, mask = _render_phantom(rng, hw, shape, styles[site], dx)
      part = part_dirs[0] if number < 24306 + half else part_dirs[1]
      Image.fromarray(img).save(part / f'{image_id}.jpg', quality=90)
      Image.fromarray(mask).save(mask_dir / f'{image_id}_segmentation.png')
      row = [f'HAM_{int(lesion_ids[lesion]):07d}', image_id, dx, dx_type, age, sex,
             localization]
      rows.append(row + [site] if with_dataset_column else row)
      n += 1
  header = list(METADATA_COLUMNS if with_dataset_column else METADATA_COLUMNS[:7])
  _write_metadata(out / f'HAM10000_metadata{metadata_ext}', header, rows, metadata_ext)
  return out


def _write_metadata(path: pathlib.Path, header: list[str], rows: list[list[str]],
                    ext: str) -> None:
  with path.open('w', newline='', encoding='utf-8') as f:
    if ext == '.tab':
      # Dataverse-ingested tabular files: tab separated, string values quoted.
      f.write('\t'.join(header) + '\n')
      for row in rows:
        cells = [v if (i == 4 or not v) else f'"{v}"' for i, v in enumerate(row)]
        f.write('\t'.join(cells) + '\n')
    else:
      writer = csv.writer(f, lineterminator='\n')
      writer.writerow(header)
      writer.writerows(rows)


def _write_isic2018(out: pathlib.Path, cases: int, hw: tuple[int, int],
                    rng: np.random.Generator, style: dict[str, Any]) -> None:
  num_val = cases // 5 if cases >= 5 else 0
  numbers = np.sort(rng.choice(np.arange(0, 16100), size=cases, replace=False))
  val_set = set(rng.choice(cases, size=num_val, replace=False).tolist())
  for split in ('Training', 'Validation') if num_val else ('Training',):
    in_dir = out / f'ISIC2018_Task1-2_{split}_Input'
    gt_dir = out / f'ISIC2018_Task1_{split}_GroundTruth'
    in_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    for name in ('LICENSE.txt', 'ATTRIBUTION.txt'):
      (in_dir / name).write_text('Phantom data written by adpfl_jax; not real ISIC images.\n')
      (gt_dir / name).write_text('Phantom data written by adpfl_jax; not real ISIC images.\n')
  for i, number in enumerate(numbers):
    split = 'Validation' if i in val_set else 'Training'
    f = rng.uniform(0.75, 1.3)  # ISIC 2018 image sizes vary widely.
    h = max(8, round(hw[0] * f))
    w = max(8, round(hw[1] * f * rng.uniform(0.9, 1.15)))
    img, mask = _render_phantom(rng, (h, w), _lesion_shape(rng), style,
                                _DX_NAMES[int(rng.integers(0, 7))])
    image_id = f'ISIC_{int(number):07d}'
    Image.fromarray(img).save(
        out / f'ISIC2018_Task1-2_{split}_Input' / f'{image_id}.jpg', quality=90)
    Image.fromarray(mask).save(
        out / f'ISIC2018_Task1_{split}_GroundTruth' / f'{image_id}_segmentation.png')
