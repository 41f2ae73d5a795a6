"""HAM10000-like dermoscopy phantoms written in the real release layouts (docs/datasets.md §6.2).

`write_phantoms` renders RGB JPEGs with a fuzzy, wobbly pigmented lesion, skin texture, per-source
colour cast, vignetting, hairs and ruler ticks, and writes them with their PNG masks and the
metadata table in the HAM10000 layout (or the ISIC 2018 Task 1 layout), so that `ham10000.scan`
reads them exactly like the real release. Lesion multiplicity, diagnoses, sexes, body sites and
diagnosis types follow the real frequencies (docs/datasets.md §1.2, §1.3). `adpfl data
make-phantoms --task ham10000` and the pipeline's phantom cache (`phantoms.py`) call it.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw

from adpfl_jax.data import ham10000

PathLike = str | os.PathLike

#: The seven HAM10000 diagnoses; phantom `dx` follows each source's real class mix
#: (docs/datasets.md §1.3).
DX_NAMES = ('nv', 'mel', 'bkl', 'bcc', 'akiec', 'vasc', 'df')
_SITE_DX_COUNTS = {
    'vidir_molemax': (3720, 24, 124, 2, 0, 54, 30),
    'vidir_modern': (1832, 680, 475, 211, 32, 82, 51),
    'rosendahl': (803, 342, 490, 296, 295, 3, 30),
    'vienna_dias': (350, 67, 10, 5, 0, 3, 4),
}
_SITE_IMAGES = dict(zip(ham10000.SOURCES, (3954, 3363, 2259, 439)))
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
  mask_dir = out / ham10000.MASK_DIR_NAME
  if nested_masks:
    mask_dir = mask_dir / ham10000.MASK_DIR_NAME
  for d in part_dirs + [mask_dir]:
    d.mkdir(parents=True, exist_ok=True)
  half = math.ceil(cases / 2)
  rows = []
  n = 0
  for lesion, (size, site) in enumerate(zip(sizes, lesion_site)):
    dx_counts = np.array(_SITE_DX_COUNTS.get(site, _ALL_DX_COUNTS), np.float64)
    dx = DX_NAMES[int(rng.choice(len(DX_NAMES), p=dx_counts / dx_counts.sum()))]
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
  columns = ham10000.METADATA_COLUMNS
  header = list(columns if with_dataset_column else columns[:7])
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
                                DX_NAMES[int(rng.integers(0, 7))])
    image_id = f'ISIC_{int(number):07d}'
    Image.fromarray(img).save(
        out / f'ISIC2018_Task1-2_{split}_Input' / f'{image_id}.jpg', quality=90)
    Image.fromarray(mask).save(
        out / f'ISIC2018_Task1_{split}_GroundTruth' / f'{image_id}_segmentation.png')
