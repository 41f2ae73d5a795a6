"""Synthetic KiTS23-like CT and BraTS-like MRI written in the real on-disk layouts.

The same readers (`kits23.scan`, `brats.scan`) run on these phantoms and on the
real data (docs/datasets.md §6.4, §6.5). Anatomy is drawn in normalised coordinates
([-1, 1] along each axis), so tiny shapes (e.g. 8 x 16 x 16) still contain
every structure; the header spacing is what varies per site, as on real
scanners.

KiTS23 phantom: `<out>/dataset/case_XXXXX/{imaging,segmentation}.nii.gz` in the
KiTS affine convention (array (z, y, x), qform 0, sform 2), float64 HU image and
uint8 labels 0-3 rasterised kidney -> cyst -> tumour (tumour wins); one
`instances/` folder to be ignored; `dataset/kits23.json`; `<out>/anony_sites.csv`
(`case,site_id`). Sites differ in slice thickness, pixel size, noise, scanner
HU offset and contrast phase (arterial vs nephrogenic).

BraTS 2024 phantom: `<out>/{training_data1_v2,training_data_additional,validation_data}/
BraTS-GLI-PPPPP-TTT/BraTS-GLI-PPPPP-TTT-{t1n,t1c,t2w,t2f,seg}.nii.gz` (validation
without -seg) with several time points for some patients, plus the metadata
sheet `BraTS-PTG supplementary demographic information and metadata.csv` with
the raw (trailing-space) column names. Sites differ in intensity scale, bias
field, noise, field strength and manufacturer. `write_brats2021_phantoms` writes
the BraTS 2021 / FeTS naming and labels {0, 1, 2, 4} plus `partitioning_1.csv`.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from typing import Sequence

import numpy as np
from scipy import ndimage

from adpfl_jax.data import brats
from adpfl_jax.data import kits23
from adpfl_jax.data import nifti

PathLike = str | os.PathLike

BRATS_METADATA_COLUMNS = (
    'BraTS Subject ID', 'Site', 'Site Subject ID', 'Annotator 1', 'Approver 1',
    'Train/Test/Validation ', 'Magnetic Field Strength', 'Manufacturer', "Patient's Age",
    "Patient's Sex", 'Glioma type ',
)
FETS_PARTITION_CSV = 'partitioning_1.csv'

# Per-site CT scanner profiles: (slice thickness mm, pixel mm, noise HU, offset HU, phase).
_CT_SITES = (
    (5.0, 0.78, 12.0, 0.0, 'arterial'),
    (3.0, 0.92, 22.0, 12.0, 'arterial'),
    (1.0, 0.68, 32.0, -8.0, 'nephrogenic'),
    (2.5, 0.86, 8.0, 4.0, 'arterial'),
    (0.5, 0.72, 40.0, -15.0, 'nephrogenic'),
)
# Per-site MRI profiles: (intensity scale, bias amplitude, noise fraction, tesla, manufacturer).
_MR_SITES = (
    (1000.0, 0.10, 0.02, 3.0, 'Siemens'),
    (1400.0, 0.25, 0.05, 1.5, 'GE'),
    (700.0, 0.15, 0.03, 3.0, 'Philips'),
    (1200.0, 0.30, 0.04, 1.5, 'Siemens'),
    (900.0, 0.05, 0.06, 3.0, 'GE'),
)


def _grid(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Normalised (z, y, x) coordinates in [-1, 1], broadcastable."""
  axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape]
  return np.meshgrid(*axes, indexing='ij', sparse=True)


def _ellipsoid(grid, center, radii) -> np.ndarray:
  z, y, x = grid
  return (((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
          + ((x - center[2]) / radii[2]) ** 2) <= 1.0


def _nearest_voxel(shape: Sequence[int], point: Sequence[float]) -> tuple[int, ...]:
  return tuple(int(np.clip(round((p + 1.0) / 2.0 * (n - 1)), 0, n - 1))
               for p, n in zip(point, shape))


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
  """Zero-mean, unit-std smooth random field."""
  field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode='wrap')
  return (field - field.mean()) / (field.std() + 1e-8)


def _as_case_numbers(cases: int | Sequence[int]) -> list[int]:
  if isinstance(cases, int):
    if cases < 1 or cases > len(kits23.TRAINING_CASE_NUMBERS):
      raise ValueError(f'cases must be in [1, {len(kits23.TRAINING_CASE_NUMBERS)}], got {cases}.')
    return list(kits23.TRAINING_CASE_NUMBERS[:cases])
  return [int(c) for c in cases]


# ---------------------------------------------------------------------- KiTS23


def kits23_phantom(
    shape: Sequence[int],
    rng: np.random.Generator,
    *,
    phase: str = 'arterial',
    noise_hu: float = 15.0,
    offset_hu: float = 0.0,
    with_cyst: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """One abdominal CT phantom in (z, y, x): float64 HU image and uint8 labels.

  Axis 1 runs anterior -> posterior and axis 2 right -> left, as in KiTS23
  files (axis codes ('I', 'P', 'L')); the spine is posterior.

  Args:
    shape: (z, y, x).
    rng: NumPy generator.
    phase: 'arterial' (bright cortex, darker medulla) or 'nephrogenic'.
    noise_hu: Gaussian noise std (HU).
    offset_hu: scanner calibration offset added everywhere (HU).
    with_cyst: add a cyst (label 3) to the contralateral kidney.

  Returns:
    `(image, labels)`.
  """
  shape = tuple(int(s) for s in shape)
  g = _grid(shape)
  z, y, x = g
  img = np.full(shape, -1000.0)
  body = np.broadcast_to((x / 0.88) ** 2 + (y / 0.7) ** 2 <= 1.0, shape)
  inner = np.broadcast_to((x / 0.8) ** 2 + (y / 0.62) ** 2 <= 1.0, shape)
  img[body] = -100.0  # Subcutaneous fat rim.
  img[inner] = 40.0  # Soft tissue.
  spine = np.broadcast_to((x / 0.1) ** 2 + ((y - 0.42) / 0.1) ** 2 <= 1.0, shape)
  img[spine] = rng.uniform(400.0, 700.0)

  labels = np.zeros(shape, np.uint8)
  tumour_side = int(rng.integers(2))
  centers, radii, kidneys = [], [], []
  for side in (0, 1):
    sign = -1.0 if side == 0 else 1.0
    c = (rng.uniform(-0.15, 0.15), 0.25 + rng.uniform(-0.04, 0.04),
         sign * (0.42 + rng.uniform(-0.04, 0.04)))
    r = tuple(a * rng.uniform(0.9, 1.1) for a in (0.5, 0.17, 0.14))
    kidney = _ellipsoid(g, c, r)
    hilum = (c[0], c[1] - 0.02, c[2] - sign * r[2])  # Medial notch: bean shape.
    kidney &= ~_ellipsoid(g, hilum, (0.2, 0.08, 0.06))
    medulla = kidney & _ellipsoid(g, c, tuple(0.55 * a for a in r))
    cortex_hu, medulla_hu = (200.0, 110.0) if phase == 'arterial' else (160.0, 150.0)
    img[kidney] = cortex_hu + rng.uniform(-40.0, 40.0)
    img[medulla] = medulla_hu + rng.uniform(-20.0, 20.0)
    labels[kidney] = 1
    labels[_nearest_voxel(shape, c)] = 1
    centers.append(c)
    radii.append(r)
    kidneys.append(kidney)

  if with_cyst:  # Contralateral, smooth, water-like.
    side = 1 - tumour_side
    c, r = centers[side], radii[side]
    cc = (c[0] + 0.6 * r[0], c[1], c[2])
    cyst = _ellipsoid(g, cc, (0.12, 0.08, 0.08))
    img[cyst] = rng.uniform(0.0, 20.0)
    labels[cyst] = 3
    labels[_nearest_voxel(shape, cc)] = 3

  # Exophytic tumour on the lateral, anterior surface of one kidney.
  c, r = centers[tumour_side], radii[tumour_side]
  sign = -1.0 if tumour_side == 0 else 1.0
  tc = (c[0] - 0.3 * r[0], c[1] - 0.5 * r[1], c[2] + sign * r[2])
  tr = rng.uniform(0.1, 0.15)
  tumour = _ellipsoid(g, tc, (tr * 1.5, tr, tr))
  texture = _smooth_noise(rng, shape, 1.0)
  img[tumour] = rng.uniform(70.0, 110.0) + 15.0 * texture[tumour]
  necrosis = _ellipsoid(g, tc, (0.6 * tr, 0.4 * tr, 0.4 * tr))
  img[necrosis] = rng.uniform(10.0, 30.0)
  labels[tumour] = 2
  labels[_nearest_voxel(shape, tc)] = 2

  img = img + offset_hu + noise_hu * rng.standard_normal(shape)
  return img, labels


def write_kits23_phantoms(
    out_dir: PathLike,
    cases: int | Sequence[int] = 6,
    sites: int = 3,
    seed: int = 0,
    shape: Sequence[int] = (32, 48, 48),
    *,
    with_metadata: bool = True,
    with_instances: bool = True,
) -> dict[str, str]:
  """Writes KiTS23-like cases in the official layout under `out_dir`.

  Args:
    out_dir: root; cases go to `<out_dir>/dataset/case_XXXXX/`.
    cases: number of cases (the first official training case numbers, which
      skip 300-399) or explicit case numbers.
    sites: number of sites; case i goes to site `i % sites`.
    seed: base seed; case n uses `np.random.default_rng([seed, n])`.
    shape: (z, y, x) voxels of every case.
    with_metadata: write `dataset/kits23.json`.
    with_instances: write an `instances/` mask in the first case (to be ignored).

  Returns:
    Mapping case id -> site id, as written to `<out_dir>/anony_sites.csv`.
    One case in three has no cyst (index i with (i + i // sites) % 3 == 1: 1, 3, 8, ... for 3
    sites), spread so that every site has cases with and without one.
  """
  out = pathlib.Path(out_dir)
  dataset = out / 'dataset'
  numbers = _as_case_numbers(cases)
  site_of, meta = {}, []
  for i, num in enumerate(numbers):
    site = i % sites
    thick, px, noise, offset, phase = _CT_SITES[site % len(_CT_SITES)]
    rng = np.random.default_rng([seed, num])
    if site >= len(_CT_SITES):  # More sites than profiles: perturb.
      srng = np.random.default_rng([seed, 10_000 + site])
      px, noise, offset = px * srng.uniform(0.9, 1.1), noise * srng.uniform(0.7, 1.3), \
          offset + srng.uniform(-10, 10)
    img, lbl = kits23_phantom(shape, rng, phase=phase, noise_hu=noise, offset_hu=offset,
                              with_cyst=((i + i // sites) % 3 != 1))
    cid = kits23.case_id(num)
    spacing = (thick, px, px)
    nifti.write_nifti(dataset / cid / 'imaging.nii.gz', img, spacing, dtype=np.float64)
    nifti.write_nifti(dataset / cid / 'segmentation.nii.gz', lbl, spacing, dtype=np.uint8)
    if with_instances and i == 0:
      nifti.write_nifti(dataset / cid / 'instances' / 'kidney_instance-1_annotation-1.nii.gz',
                        (lbl == 1).astype(np.uint8), spacing, dtype=np.uint8)
    site_of[cid] = str(site)
    meta.append({
        'case_id': cid,
        'gender': ('male', 'female')[int(rng.integers(2))],
        'age_at_nephrectomy': int(rng.integers(30, 85)),
        'bmi': round(float(rng.uniform(19, 38)), 1),
        'malignant': bool(rng.random() < 0.85),
        'tumor_histologic_subtype': 'clear_cell_rcc',
        'radiographic_size': round(float(rng.uniform(1.5, 9.0)), 1),
    })
  if with_metadata:
    (dataset / 'kits23.json').write_text(json.dumps(meta, indent=2))
  with open(out / kits23.SITE_CSV, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['case', 'site_id'])
    for cid, site in site_of.items():
      w.writerow([cid, site])
  return site_of


# ----------------------------------------------------------------------- BraTS

# Intensity of each structure per contrast (t1n, t1c, t2w, t2f), relative units.
_MR_TISSUE = {
    'brain': (0.60, 0.62, 0.45, 0.50),
    'csf': (0.15, 0.15, 1.00, 0.12),  # Ventricles: FLAIR suppresses free water.
    'snfh': (0.45, 0.50, 0.85, 0.95),  # Oedema-like halo: T2/FLAIR bright.
    'rc': (0.12, 0.12, 1.00, 0.90),  # Resection cavity (docs/datasets.md §6.5).
    'et': (0.58, 1.30, 0.55, 0.65),  # Enhancing rim: T1c bright.
    'netc': (0.40, 0.22, 0.70, 0.60),  # Necrotic core: T1c dark.
}


def brats_phantom(
    shape: Sequence[int],
    rng: np.random.Generator,
    *,
    tumour_center: Sequence[float] = (0.1, -0.1, 0.35),
    tumour_radius: float = 0.22,
    with_rc: bool = True,
    scale: float = 1000.0,
    bias: float = 0.1,
    noise: float = 0.02,
) -> tuple[np.ndarray, np.ndarray]:
  """One skull-stripped brain MRI phantom: (z, y, x, 4) float32 and uint8 labels.

  Channels t1n, t1c, t2w, t2f; background exactly 0. Labels 1 NETC (core), 2
  SNFH (irregular halo around ET and NETC), 3 ET (rim), 4 RC (cavity touching
  the tumour), each with the contrast pattern of docs/datasets.md §6.5.

  Args:
    shape: (z, y, x).
    rng: NumPy generator.
    tumour_center: normalised centre of the tumour.
    tumour_radius: normalised outer ET radius.
    with_rc: add a resection cavity.
    scale: site intensity scale.
    bias: amplitude of a smooth multiplicative bias field.
    noise: noise std as a fraction of `scale`.

  Returns:
    `(image, labels)`.
  """
  shape = tuple(int(s) for s in shape)
  g = _grid(shape)
  z, y, x = g
  brain = _ellipsoid(g, (0.0, 0.0, 0.0), (0.85, 0.9, 0.8))
  regions = {'brain': brain}
  regions['csf'] = brain & (_ellipsoid(g, (0.05, 0.0, -0.12), (0.25, 0.35, 0.08))
                            | _ellipsoid(g, (0.05, 0.0, 0.12), (0.25, 0.35, 0.08)))
  tc = np.asarray(tumour_center, float)
  r_et = float(tumour_radius)
  dist = np.sqrt((z - tc[0]) ** 2 + (y - tc[1]) ** 2 + (x - tc[2]) ** 2)
  halo = 1.8 * r_et * (1.0 + 0.25 * np.clip(_smooth_noise(rng, shape, 2.0), -2.0, 2.0))
  labels = np.zeros(shape, np.uint8)
  labels[brain & (dist <= halo)] = 2
  paint = [(2, tc + [0.0, 0.0, 1.4 * r_et])]
  if with_rc:  # Cavity touching the tumour, towards the brain centre.
    direction = -tc / (np.linalg.norm(tc) + 1e-8)
    rc_center = tc + direction * (r_et + 0.18)
    labels[brain & _ellipsoid(g, rc_center, (0.24, 0.24, 0.24))] = 4
    paint.append((4, rc_center))
  labels[brain & (dist <= r_et)] = 3
  labels[brain & (dist <= 0.7 * r_et)] = 1
  paint += [(3, tc + [0.0, 0.0, 0.8 * r_et]), (1, tc)]
  for value, point in paint:  # Keep every structure on tiny grids.
    v = _nearest_voxel(shape, point)
    if not (labels == value).any() and brain[v]:
      labels[v] = value

  field = 1.0 + bias * (0.6 * z + 0.3 * y - 0.5 * x)  # Smooth bias field.
  texture = 0.05 * _smooth_noise(rng, shape, 1.5)
  image = np.zeros(shape + (4,), np.float32)
  order = ['brain', 'csf', 'snfh'] + (['rc'] if with_rc else []) + ['et', 'netc']
  label_of = {'snfh': 2, 'rc': 4, 'et': 3, 'netc': 1}
  for c in range(4):
    chan = np.zeros(shape)
    for name in order:  # Tissue from the label map, so image and labels agree.
      chan[regions[name] if name in ('brain', 'csf') else labels == label_of[name]] = (
          _MR_TISSUE[name][c])
    chan = (chan + texture) * field * scale
    chan += noise * scale * rng.standard_normal(shape)
    chan = np.maximum(chan, 0.01 * scale)  # Brain voxels stay strictly positive.
    chan[~brain] = 0.0
    image[..., c] = chan
  labels[~brain] = 0
  return image, labels


def _brats_cases(n_cases: int, sites: int, n_validation: int) -> list[dict]:
  """Patients with 1-3 time points; the last patients go to the additional release."""
  tps = (2, 1, 3, 1)
  plan, k = [], 0
  while len(plan) < n_cases:
    for t in range(min(tps[k % len(tps)], n_cases - len(plan))):
      plan.append({'patient': k, 'tp': 100 + t, 'site': k % sites})
    k += 1
  n_patients = k
  n_additional = n_patients // 4 if n_patients >= 4 else 0
  for p in plan:
    p['release'] = ('training_data_additional' if p['patient'] >= n_patients - n_additional
                    else 'training_data1_v2')
  for v in range(n_validation):
    plan.append({'patient': n_patients + v, 'tp': 100, 'site': (n_patients + v) % sites,
                 'release': 'validation_data'})
  return plan


def write_brats2024_phantoms(
    out_dir: PathLike,
    cases: int = 6,
    sites: int = 3,
    seed: int = 0,
    shape: Sequence[int] = (32, 48, 40),
    *,
    validation_cases: int = 1,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, str]:
  """Writes BraTS-2024-GLI-like cases in the official layout under `out_dir`.

  Patients get 2, 1, 3, 1, 2, ... time points (100, 101, ...), all in one site
  and one release folder; the last quarter of patients go to
  `training_data_additional/`, `validation_cases` extra single-time-point
  patients (no -seg file) to `validation_data/`. Time points of a patient
  share the tumour location, with a changing size.

  Args:
    out_dir: root folder.
    cases: number of labelled case folders (time points).
    sites: number of sites, at most 5 (`brats.SITES_2024`).
    seed: base seed.
    shape: (z, y, x) voxels.
    validation_cases: unlabelled cases in `validation_data/`.
    spacing: (z, y, x) mm; the files use the BraTS-style diagonal affine.

  Returns:
    Mapping case id -> site for every case written (validation included).
  """
  if not 1 <= sites <= len(brats.SITES_2024):
    raise ValueError(f'sites must be in [1, {len(brats.SITES_2024)}], got {sites}.')
  out = pathlib.Path(out_dir)
  plan = _brats_cases(cases, sites, validation_cases)
  site_of, rows = {}, []
  for p in plan:
    pid = 3 * p['patient'] + 2  # Non-consecutive ids, like the release.
    cid = f'BraTS-GLI-{pid:05d}-{p["tp"]:03d}'
    site_name = brats.SITES_2024[p['site']]
    scale, bias, noise, tesla, maker = _MR_SITES[p['site']]
    prng = np.random.default_rng([seed, pid])  # Patient-level: tumour location.
    center = (prng.uniform(-0.2, 0.2), prng.uniform(-0.3, 0.3),
              prng.choice([-1.0, 1.0]) * prng.uniform(0.25, 0.4))
    radius = prng.uniform(0.2, 0.27) * (1.0 + 0.15 * (p['tp'] - 100) * prng.choice([-1, 1]))
    rng = np.random.default_rng([seed, pid, p['tp']])
    image, labels = brats_phantom(shape, rng, tumour_center=center, tumour_radius=radius,
                                  scale=scale, bias=bias, noise=noise)
    folder = out / p['release'] / cid
    for c, mod in enumerate(brats.MODALITIES_2024):
      nifti.write_nifti(folder / f'{cid}-{mod}.nii.gz', image[..., c], spacing, layout='ras',
                        dtype=np.float32)
    if p['release'] != 'validation_data':
      nifti.write_nifti(folder / f'{cid}-seg.nii.gz', labels, spacing, layout='ras',
                        dtype=np.uint8)
    site_of[cid] = site_name
    rows.append([cid, site_name, f'{site_name[:3].upper()}-{pid:04d}', 'A1', 'R1',
                 brats.RELEASE_SPLIT_VALUES[p['release']], f'{tesla:g}T', maker,
                 int(prng.integers(25, 80)), ('M', 'F')[int(prng.integers(2))],
                 'Glioblastoma'])
  with open(out / (brats.METADATA_STEM + '.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(BRATS_METADATA_COLUMNS)
    w.writerows(rows)
  return site_of


def write_brats2021_phantoms(
    out_dir: PathLike,
    cases: int = 4,
    sites: int = 2,
    seed: int = 0,
    shape: Sequence[int] = (32, 48, 40),
) -> dict[str, str]:
  """Writes BraTS 2021 / FeTS-style cases `BraTS2021_XXXXX/` with labels {0,1,2,4}.

  Also writes `partitioning_1.csv` (`Partition_ID,Subject_ID`, FeTS subject
  names `FeTS2022_XXXXX`); case i goes to partition `i % sites + 1`.

  Returns:
    Mapping case id -> partition id (string).
  """
  out = pathlib.Path(out_dir)
  site_of, rows = {}, []
  for i in range(cases):
    cid = f'BraTS2021_{i:05d}'
    site = i % sites
    scale, bias, noise, _, _ = _MR_SITES[site % len(_MR_SITES)]
    rng = np.random.default_rng([seed, i])
    image, labels = brats_phantom(shape, rng, with_rc=False, scale=scale, bias=bias, noise=noise)
    labels = np.where(labels == 3, 4, labels).astype(np.uint8)  # 2021: ET is 4.
    for c, mod in enumerate(brats.MODALITIES_2021):
      nifti.write_nifti(out / cid / f'{cid}_{mod}.nii.gz', image[..., c], (1.0, 1.0, 1.0),
                        layout='ras', dtype=np.float32)
    nifti.write_nifti(out / cid / f'{cid}_seg.nii.gz', labels, (1.0, 1.0, 1.0), layout='ras',
                      dtype=np.uint8)
    site_of[cid] = str(site + 1)
    rows.append([site + 1, f'FeTS2022_{i:05d}'])
  with open(out / FETS_PARTITION_CSV, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['Partition_ID', 'Subject_ID'])
    w.writerows(rows)
  return site_of
