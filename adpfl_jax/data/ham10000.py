"""HAM10000 and ISIC 2018 Task 1 skin-lesion segmentation reader: scan a release, decode a pair.

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
intensity recipe for dermoscopy; the pipeline then normalises it with the fixed public
`phantom_skin.PIXEL_MEAN` / `PIXEL_STD`) and the mask as uint8 in {0, 1}.

`scan` lists the image/mask pairs with their metadata (`Record`: image and lesion id, the
metadata's `dataset` column as `site` — the acquisition source, docs/datasets.md §1.3 — and the
diagnosis); `load_example` decodes one pair. Federation (subsampling, partition, splits) is the
pipeline's job (`federated.py`); phantoms in this layout are written by `phantoms_ham10000.py`.

Typical use:

  >>> records = scan('/data/ham10000')  # doctest: +SKIP
  >>> image, mask = load_example(records[0], (128, 128))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

PathLike = str | os.PathLike

REQUIRED_COLUMNS = ('lesion_id', 'image_id', 'dx')
METADATA_COLUMNS = (
    'lesion_id', 'image_id', 'dx', 'dx_type', 'age', 'sex', 'localization', 'dataset'
)
METADATA_NAMES = ('HAM10000_metadata.csv', 'HAM10000_metadata.tab', 'HAM10000_metadata')
IMAGE_DIR_PATTERN = re.compile(r'^ham10000_images_part_\d+$', re.IGNORECASE)
MASK_DIR_NAME = 'HAM10000_segmentations_lesion_tschandl'
ISIC2018_SPLITS = ('Training', 'Validation', 'Test')
#: The acquisition sources of the `dataset` column (docs/datasets.md §1.3).
SOURCES = ('vidir_molemax', 'vidir_modern', 'rosendahl', 'vienna_dias')

_IMAGE_RE = re.compile(r'^(ISIC_\d{7})\.jpe?g$', re.IGNORECASE)
_MASK_RE = re.compile(r'^(ISIC_\d{7})_segmentation\.png$', re.IGNORECASE)
_MISSING = ('', 'na', 'nan', 'none', 'null')


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
    print(f'note: {meta_path} has no "dataset" column: natural sites are unavailable.',
          flush=True)
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
  return to_float(img), mask


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 RGB -> float32 in [0, 1] (uint8 / 255), as `load_example` returns it."""
  return image.astype(np.float32) / np.float32(255.0)
