"""Federations of the real medical data sets: HAM10000, KiTS23 and BraTS 2024 (host-side NumPy).

`load(data_cfg, seed)` turns a release folder in its official on-disk layout
(docs/datasets.md §1–3) into a `federated.FederatedData` of stacked, fixed-shape, channels-last
arrays:

=========  ===============================  ===========  =====  ===========  ==================
name       example (channels last)          labels       task   num_classes  privacy record
=========  ===============================  ===========  =====  ===========  ==================
ham10000   (H, W, 3) RGB, fixed normalised  {0, 1}       skin   1 (sigmoid)  one lesion
kits23     (D, H, W, 1) CT, HU window +     {0, ..., 3}  kits23 4 (softmax)  one patient (case)
           z-score with public constants
brats2024  (D, H, W, 4) t1n, t1c, t2w, t2f, {0, ..., 4}  brats  5 (softmax)  one patient
           z-score in the brain mask
=========  ===============================  ===========  =====  ===========  ==================

Pipeline (the same for the three tasks, every random choice a function of `seed`):

1. **Read** `data_cfg.dir` with the real readers (`ham10000.scan` / `load_federation`,
   `kits23.scan`, `brats.scan`); their errors (naming the bad file, case or column) propagate.
   An empty or missing `data_cfg.dir` raises here and names `config.data.dir`. If
   `data_cfg.dir` is '' (the default), phantoms are written once in the real layout by the same
   writers `adpfl data make-phantoms` uses (`write_phantoms`) into a cache folder (see
   `phantom_dir`), and read back through the same readers.
2. **Subsample** (optional, `data_cfg.max_cases`): a seeded random subset of whole patients
   (HAM10000: whole lesions) with at most that many cases (images).
3. **Partition** into clients by patient / lesion: `data_cfg.partition` is 'natural' (the
   acquisition site: HAM10000 `dataset` column, the KiTS23 `case,site_id` CSV (FLamby's
   `anony_sites.csv` format) or else the contrast phase by case number, the BraTS metadata
   `Site` column), 'iid' or 'dirichlet' (Dirichlet(`data_cfg.alpha`) over the diagnosis for
   HAM10000, over the site for the 3D sets). `data_cfg.num_clients` is the number of clients;
   for 'natural', 0 keeps every site and K < #sites keeps the K largest sites (the others are
   dropped, and the summary says so). Cases whose site is unknown ('unassigned') are dropped
   from a natural partition.
4. **Split** each client's patients (lesions) into train and test with
   `partition.grouped_train_test_split` at `data_cfg.test_fraction`, seeded with
   `[seed, client]`: no patient (lesion) is on both sides, nor in two clients.
5. **Privacy unit.** DP-SGD protects one *training example*; it protects a patient only if each
   patient is one example. Therefore, by default, training keeps **one example per privacy
   unit**: for BraTS 2024 the earliest time point of each patient (`BraTS-GLI-PPPPP-TTT`, the
   smallest TTT); for HAM10000, with `data_cfg.one_image_per_lesion=True` (default), the image
   with the smallest `image_id` of each lesion. KiTS23 has one case per patient already. Test
   splits keep every time point / image (they are only evaluated, never trained on). With
   `one_image_per_lesion=False` a lesion may contribute several training images and image-level
   DP does *not* protect the lesion (the summary records which rule was used).
6. **Preprocess** every case to one fixed shape. 3D: `preprocess3d.preprocess_ct_case` (resample
   to `data_cfg.target_spacing`, clip to the HU window and z-score with the public KiTS19
   nnU-Net constants, crop/pad `data_cfg.volume_shape` around the foreground box centre) or
   `preprocess3d.preprocess_mri_case` (crop to the brain box, resample, per-modality z-score in
   the brain mask, crop/pad around the brain box centre). 2D: resize to `data_cfg.image_size`
   (int or (height, width)) and normalise RGB with the fixed `phantom_skin.PIXEL_MEAN` /
   `PIXEL_STD` (public constants, never data statistics).

The returned `spacing` is the voxel spacing of the preprocessed examples in mm in array-axis
order: `data_cfg.target_spacing` for 3D (each case's actual spacing differs from it only by the
rounding of its resampled shape, under half a voxel over the whole extent), or the common native
spacing when `target_spacing` is empty; (1, 1) (pixels) for HAM10000. The partition summary
(`partition.partition_summary`, per client train/test examples, patients/lesions and label or
site counts) is printed with `partition.format_summary` and returned in `partition_summary`.

Keys read from `data_cfg` (missing keys take the defaults in `DEFAULTS`): name, dir, partition,
num_clients, alpha, test_fraction, max_cases, image_size, one_image_per_lesion, volume_shape,
target_spacing, site_csv (KiTS23), site_column (BraTS), num_workers, and for the phantom cache
phantom_cases, phantom_sites, phantom_shape, cache_dir.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Sequence

import numpy as np

from adpfl_jax.data import brats
from adpfl_jax.data import federated
from adpfl_jax.data import ham10000
from adpfl_jax.data import kits23
from adpfl_jax.data import partition as partition_lib
from adpfl_jax.data import phantom_skin
from adpfl_jax.data import phantoms3d
from adpfl_jax.data import preprocess3d

PathLike = str | os.PathLike

TASKS = ('ham10000', 'kits23', 'brats2024')
#: Evaluation task name and number of classes of each data set.
TASK_OF = {'ham10000': ('skin', 1), 'kits23': ('kits23', 4), 'brats2024': ('brats2024', 5)}
PARTITIONS = ('natural', 'iid', 'dirichlet')
#: Sites of which the site is unknown; never a natural client.
UNASSIGNED = 'unassigned'
#: Environment variable overriding the phantom cache root.
CACHE_ENV = 'ADPFL_CACHE_DIR'
_COMPLETE = '.complete'
# Bumped whenever a phantom generator changes, so cached phantoms of an older recipe are not reused.
PHANTOM_VERSION = {'ham10000': 1, 'kits23': 2, 'brats2024': 2}

#: Defaults of every key `load` reads, per data set.
DEFAULTS: dict[str, dict[str, Any]] = {
    'ham10000': dict(partition='natural', num_clients=0, alpha=0.5, test_fraction=0.2,
                     max_cases=0, image_size=64, one_image_per_lesion=True, num_workers=0,
                     phantom_cases=120, phantom_sites=3, phantom_shape=(96, 128), cache_dir=''),
    'kits23': dict(partition='natural', num_clients=0, alpha=0.5, test_fraction=0.2,
                   max_cases=0, volume_shape=(32, 64, 64), target_spacing=(5.0, 3.2, 3.2),
                   site_csv='', num_workers=0, phantom_cases=24, phantom_sites=3,
                   phantom_shape=(32, 48, 48), cache_dir=''),
    'brats2024': dict(partition='natural', num_clients=0, alpha=0.5, test_fraction=0.2,
                      max_cases=0, volume_shape=(48, 64, 48), target_spacing=(3.0, 3.0, 3.0),
                      site_column='Site', num_workers=0, phantom_cases=24, phantom_sites=3,
                      phantom_shape=(32, 48, 40), cache_dir=''),
}


class LoaderError(ValueError):
  """Invalid data configuration or too little data; the message names the config key."""


# --------------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class Options:
  """The `data_cfg` keys `load` uses, validated (see the module docstring)."""

  name: str
  dir: str
  partition: str
  num_clients: int
  alpha: float
  test_fraction: float
  max_cases: int
  num_workers: int
  extra: dict

  def get(self, key: str):
    return self.extra[key]


def _int_tuple(value: Any, n: int, key: str) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)):
    value = (int(value),) * n
  try:
    out = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise LoaderError(f'config.data.{key}={value!r} must be {n} positive integers.') from None
  if len(out) != n or min(out) < 1:
    raise LoaderError(f'config.data.{key}={value!r} must be {n} positive integers.')
  return out


def _spacing_tuple(value: Any, key: str) -> tuple[float, float, float] | None:
  if value is None or (isinstance(value, (tuple, list)) and not value) or value == '':
    return None
  try:
    out = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    raise LoaderError(f'config.data.{key}={value!r} must be 3 positive numbers (mm), or () '
                      'to keep the native spacing.') from None
  if len(out) != 3 or min(out) <= 0:
    raise LoaderError(f'config.data.{key}={value!r} must be 3 positive numbers (mm), or () '
                      'to keep the native spacing.')
  return out  # type: ignore[return-value]


def options(data_cfg) -> Options:
  """Reads and validates the keys of `data_cfg` (a ConfigDict or dict) for `load`."""
  name = data_cfg['name'] if 'name' in data_cfg else None
  if name not in TASKS:
    raise LoaderError(f'config.data.name={name!r} is not one of {TASKS}.')
  defaults = DEFAULTS[name]

  def get(key):
    return data_cfg[key] if key in data_cfg else defaults[key]

  part = str(get('partition'))
  if part not in PARTITIONS:
    raise LoaderError(f'config.data.partition={part!r} must be one of {PARTITIONS}.')
  num_clients = int(get('num_clients'))
  if num_clients < 0:
    raise LoaderError(f'config.data.num_clients={num_clients} must be >= 0 (0: every natural '
                      'site).')
  if part != 'natural' and num_clients < 1:
    raise LoaderError(f'config.data.num_clients={num_clients}: partition={part!r} needs '
                      'num_clients >= 1.')
  alpha = float(get('alpha'))
  if part == 'dirichlet' and not alpha > 0:
    raise LoaderError(f'config.data.alpha={alpha} must be > 0.')
  test_fraction = float(get('test_fraction'))
  if not 0.0 < test_fraction < 1.0:
    raise LoaderError(f'config.data.test_fraction={test_fraction} must be in (0, 1): every '
                      'client needs a training and a test split.')
  max_cases = int(get('max_cases') or 0)
  if max_cases < 0:
    raise LoaderError(f'config.data.max_cases={max_cases} must be >= 0 (0: all cases).')
  extra: dict[str, Any] = {}
  if name == 'ham10000':
    size = get('image_size')
    extra['image_size'] = _int_tuple(size, 2, 'image_size')
    extra['one_image_per_lesion'] = bool(get('one_image_per_lesion'))
    extra['phantom_shape'] = _int_tuple(get('phantom_shape'), 2, 'phantom_shape')
  else:
    extra['volume_shape'] = _int_tuple(get('volume_shape'), 3, 'volume_shape')
    extra['target_spacing'] = _spacing_tuple(get('target_spacing'), 'target_spacing')
    extra['phantom_shape'] = _int_tuple(get('phantom_shape'), 3, 'phantom_shape')
    if name == 'kits23':
      extra['site_csv'] = str(get('site_csv') or '')
    else:
      extra['site_column'] = str(get('site_column') or 'Site')
  extra['phantom_cases'] = int(get('phantom_cases'))
  extra['phantom_sites'] = int(get('phantom_sites'))
  extra['cache_dir'] = str(get('cache_dir') or '')
  return Options(name=name, dir=str(data_cfg['dir'] if 'dir' in data_cfg else ''),
                 partition=part, num_clients=num_clients, alpha=alpha,
                 test_fraction=test_fraction, max_cases=max_cases,
                 num_workers=int(get('num_workers')), extra=extra)


# -------------------------------------------------------------------------------- phantoms


def write_phantoms(task: str, out_dir: PathLike, cases: int, sites: int = 3, seed: int = 0,
                   shape: Sequence[int] | None = None) -> pathlib.Path:
  """Writes `cases` phantom cases of `task` in the real on-disk layout under `out_dir`.

  Uses `ham10000.write_phantoms` (RGB JPEG + PNG masks + metadata CSV, `shape` = (H, W)),
  `phantoms3d.write_kits23_phantoms` (`dataset/case_XXXXX/`, `anony_sites.csv`) or
  `phantoms3d.write_brats2024_phantoms` (release folders, metadata sheet, several time points
  per patient; `cases` counts labelled time points). `shape` defaults to the writer's default.

  Returns:
    `out_dir` as a Path.
  """
  if task not in TASKS:
    raise ValueError(f'Unknown task {task!r}; expected one of {TASKS}.')
  if int(cases) < 1:
    raise ValueError(f'cases must be >= 1, got {cases}.')
  if int(sites) < 1:
    raise ValueError(f'sites must be >= 1, got {sites}.')
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  kw = {} if shape is None else {'shape': tuple(int(s) for s in shape)}
  if task == 'ham10000':
    if shape is not None:
      kw = {'image_size': kw['shape']}
    ham10000.write_phantoms(out, int(cases), sites=int(sites), seed=int(seed), **kw)
  elif task == 'kits23':
    phantoms3d.write_kits23_phantoms(out, int(cases), sites=int(sites), seed=int(seed), **kw)
  else:
    phantoms3d.write_brats2024_phantoms(out, int(cases), sites=int(sites), seed=int(seed), **kw)
  return out


def phantom_dir(task: str, cases: int, sites: int, seed: int, shape: Sequence[int],
                cache_dir: PathLike | None = None) -> pathlib.Path:
  """Returns a cached phantom folder of `task`, writing it first if needed.

  The folder is `<root>/<task>-v<version>-<cases>-<seed>-s<sites>-<shape>` (version from
  `PHANTOM_VERSION`), where `<root>` is `cache_dir`, else `$ADPFL_CACHE_DIR`, else
  `$XDG_CACHE_HOME/adpfl_jax/phantoms` (default `~/.cache/adpfl_jax/phantoms`). It is written
  into a temporary sibling folder and renamed into place when complete, so concurrent runs never
  see a half-written folder.
  """
  if cache_dir:
    root = pathlib.Path(cache_dir)
  elif os.environ.get(CACHE_ENV):
    root = pathlib.Path(os.environ[CACHE_ENV])
  else:
    xdg = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    root = pathlib.Path(xdg) / 'adpfl_jax' / 'phantoms'
  shape_s = 'x'.join(str(int(s)) for s in shape)
  final = root / f'{task}-v{PHANTOM_VERSION.get(task, 1)}-{int(cases)}-{int(seed)}-s{int(sites)}-{shape_s}'
  if (final / _COMPLETE).is_file():
    return final
  root.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{final.name}-incomplete-', dir=root))
  try:
    write_phantoms(task, tmp, cases, sites, seed, shape)
    (tmp / _COMPLETE).write_text('written by adpfl_jax.data.loaders.phantom_dir\n')
    if final.exists():  # A stale, incomplete folder (no marker): replace it.
      shutil.rmtree(final, ignore_errors=True)
    try:
      os.replace(tmp, final)
    except OSError:
      if not (final / _COMPLETE).is_file():  # Not a concurrent writer's success: re-raise.
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def _data_dir(opts: Options, seed: int) -> pathlib.Path:
  """`config.data.dir`, checked, or the phantom cache when it is ''."""
  if not opts.dir:
    path = phantom_dir(opts.name, opts.get('phantom_cases'), opts.get('phantom_sites'), seed,
                       opts.get('phantom_shape'), opts.get('cache_dir') or None)
    print(f'config.data.dir is empty: using {opts.name} phantoms in the real layout at {path}',
          flush=True)
    return path
  path = pathlib.Path(opts.dir).expanduser()
  hint = (f'write phantoms with `adpfl data make-phantoms --task {opts.name} --out {path} '
          '--cases N`, or leave config.data.dir empty to use cached phantoms')
  if not path.exists():
    raise LoaderError(f'config.data.dir={opts.dir!r} does not exist ({hint}).')
  if not path.is_dir():
    raise LoaderError(f'config.data.dir={opts.dir!r} is not a directory.')
  if not any(path.iterdir()):
    raise LoaderError(f'config.data.dir={opts.dir!r} is empty: expected the {opts.name} release '
                      f'layout ({hint}).')
  return path


# ------------------------------------------------------------------------------ partitions


def _subsample_groups(groups: np.ndarray, max_cases: int, seed: int) -> np.ndarray:
  """Sorted indices of a seeded random subset of whole groups with at most `max_cases` items."""
  uniq = sorted(set(groups.tolist()))
  order = np.random.default_rng([seed, 7]).permutation(len(uniq))
  members: dict[str, list[int]] = {}
  for i, g in enumerate(groups.tolist()):
    members.setdefault(g, []).append(i)
  keep: list[int] = []
  for u in order:
    m = members[uniq[u]]
    if len(keep) + len(m) <= max_cases:
      keep.extend(m)
    if len(keep) == max_cases:
      break
  return np.array(sorted(keep), np.int64)


def _keep_largest_sites(names: list[str], indices: list[np.ndarray], num_clients: int,
                        what: str, meta: dict) -> tuple[list[str], list[np.ndarray]]:
  """Natural partition: keeps the `num_clients` largest sites (0 keeps all)."""
  if num_clients == 0 or num_clients == len(names):
    return names, indices
  if num_clients > len(names):
    raise LoaderError(
        f'config.data.num_clients={num_clients} but the natural partition has only '
        f'{len(names)} site(s) {names}; use num_clients=0 (every site), fewer clients, or '
        "partition='iid'/'dirichlet'.")
  order = sorted(range(len(names)), key=lambda i: (-len(indices[i]), names[i]))[:num_clients]
  order.sort()
  dropped = [names[i] for i in range(len(names)) if i not in order]
  meta['dropped_sites'] = (f'{len(dropped)} smallest site(s) dropped to keep num_clients='
                           f'{num_clients}: {dropped[:8]}{" ..." if len(dropped) > 8 else ""}')
  print(f'natural partition: keeping the {num_clients} largest of {len(names)} {what} sites',
        flush=True)
  return [names[i] for i in order], [indices[i] for i in order]


def _partition(opts: Options, sites: np.ndarray, groups: np.ndarray, seed: int,
               meta: dict) -> tuple[list[str], list[np.ndarray]]:
  """Client names and example indices, whole groups per client (3D data sets)."""
  n_groups = len(set(groups.tolist()))
  min_groups = 2  # Each client needs a training and a test patient.
  if opts.partition == 'natural':
    known = np.flatnonzero(sites != UNASSIGNED)
    if len(known) == 0:
      raise LoaderError(
          f'config.data.partition=natural: no case of {opts.dir or "the phantoms"} has a site; '
          "use partition='iid' or 'dirichlet'.")
    if len(known) < len(sites):
      meta['dropped_unassigned'] = int(len(sites) - len(known))
      print(f'natural partition: dropping {len(sites) - len(known)} case(s) with no site',
            flush=True)
    parts = partition_lib.natural(sites[known], groups=groups[known])
    names = list(parts)
    indices = [known[v] for v in parts.values()]
    names, indices = _keep_largest_sites(names, indices, opts.num_clients, opts.name, meta)
  else:
    k = opts.num_clients
    if k * min_groups > n_groups:
      raise LoaderError(
          f'config.data.num_clients={k} needs at least {k * min_groups} patients '
          f'({min_groups} per client for a train/test split), but {opts.dir or "the data"} '
          f'has {n_groups}; lower num_clients or add cases.')
    if opts.partition == 'iid':
      indices = partition_lib.iid(len(groups), k, seed, groups=groups)
    else:
      meta.update(alpha=opts.alpha, skew='site')
      try:
        indices = partition_lib.dirichlet(sites, k, opts.alpha, seed, min_size=min_groups,
                                          groups=groups, skew='label')
      except ValueError as e:
        raise LoaderError(f'config.data.alpha={opts.alpha}, config.data.num_clients={k}: '
                          f'{e}') from e
    names = [f'client_{i}' for i in range(k)]
  for name, idx in zip(names, indices):
    n = len(set(groups[idx].tolist()))
    if n < min_groups:
      raise LoaderError(
          f'client {name!r} has {n} patient(s); each client needs at least {min_groups} for a '
          f'train/test split (config.data.test_fraction={opts.test_fraction}). Add cases, lower '
          "config.data.num_clients or use partition='iid'.")
  return names, indices


def _one_per_group(idx: np.ndarray, groups: np.ndarray, keys: Sequence[Any]) -> np.ndarray:
  """Of each group among `idx`, the example with the smallest key (sorted indices)."""
  best: dict[Any, int] = {}
  for i in idx.tolist():
    g = groups[i]
    if g not in best or keys[i] < keys[best[g]]:
      best[g] = i
  return np.array(sorted(best.values()), np.int64)


# ---------------------------------------------------------------------------------- 3D sets


def _map(fn: Callable[[int], Any], items: Sequence[int], num_workers: int) -> list[Any]:
  if num_workers > 0 and len(items) > 1:
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
      return list(pool.map(fn, items))
  return [fn(i) for i in items]


def _load_3d(opts: Options, seed: int) -> federated.FederatedData:
  root = _data_dir(opts, seed)
  task, num_classes = TASK_OF[opts.name]
  meta: dict[str, Any] = {'task': opts.name, 'data_dir': str(root), 'partition': opts.partition,
                          'seed': seed, 'test_fraction': opts.test_fraction}
  if opts.name == 'kits23':
    site_csv = opts.get('site_csv')
    if not site_csv and (root / phantoms3d.KITS_SITE_CSV).is_file():
      site_csv = str(root / phantoms3d.KITS_SITE_CSV)
    if site_csv:
      cases = kits23.scan(root, site_csv=site_csv, default_site=UNASSIGNED)
      meta['sites'] = f'case,site_id table {site_csv}'
    else:
      cases = kits23.scan(root, site_ranges=kits23.PHASE_SITE_RANGES, default_site=UNASSIGNED)
      meta['sites'] = 'contrast phase by case number (no case,site_id CSV)'
    time_keys = [0] * len(cases)
    meta['privacy_record'] = 'patient (one case per patient)'
  else:
    cases = brats.scan(root, site_column=opts.get('site_column'), default_site=UNASSIGNED)
    time_keys = [c.timepoint for c in cases]
    meta['sites'] = f'metadata column {opts.get("site_column")!r}'
    meta['privacy_record'] = 'patient (earliest time point per patient in training)'
  groups = np.array([c.patient_id for c in cases])
  sites = np.array([str(c.site) for c in cases])

  if opts.max_cases:
    keep = _subsample_groups(groups, opts.max_cases, seed)
    if len(keep) == 0:
      raise LoaderError(f'config.data.max_cases={opts.max_cases} keeps no whole patient.')
    cases = [cases[i] for i in keep]
    time_keys = [time_keys[i] for i in keep]
    groups, sites = groups[keep], sites[keep]
    meta['max_cases'] = opts.max_cases

  names, indices = _partition(opts, sites, groups, seed, meta)
  train_idx, test_idx = [], []
  for c, idx in enumerate(indices):
    tr, te = partition_lib.grouped_train_test_split(groups[idx], opts.test_fraction, [seed, c])
    tr, te = idx[tr], idx[te]
    if opts.name == 'brats2024':
      tr = _one_per_group(tr, groups, time_keys)
    train_idx.append(tr)
    test_idx.append(te)

  shape = opts.get('volume_shape')
  target = opts.get('target_spacing')
  needed = sorted(set(np.concatenate(train_idx + test_idx).tolist()))

  def prep(i: int):
    case = cases[i]
    if opts.name == 'kits23':
      image, labels, spacing = kits23.load_case(case)
      fn = preprocess3d.preprocess_ct_case
    else:
      image, labels, spacing = brats.load_case(case)
      fn = preprocess3d.preprocess_mri_case
    pre = fn(image, labels, spacing, target_spacing=target or spacing, shape=shape)
    return pre.image.astype(np.float32), pre.labels.astype(np.uint8), tuple(spacing)

  done = dict(zip(needed, _map(prep, needed, opts.num_workers)))
  if target is None:
    native = {tuple(round(float(s), 4) for s in v[2]) for v in done.values()}
    if len(native) > 1:
      raise LoaderError(
          f'config.data.target_spacing is empty (keep native spacing) but the cases have '
          f'{len(native)} different spacings, e.g. {sorted(native)[:3]}; set '
          'config.data.target_spacing.')
    spacing = tuple(float(s) for s in native.pop())
  else:
    spacing = tuple(float(s) for s in target)

  def stack(idx):
    return (np.stack([done[i][0] for i in idx.tolist()]),
            np.stack([done[i][1] for i in idx.tolist()]))

  trains = [stack(i) for i in train_idx]
  tests = [stack(i) for i in test_idx]
  site_labels = sites if len(set(sites.tolist())) <= 12 else None
  summary = partition_lib.partition_summary(names, train_idx, test_idx, labels=site_labels,
                                            groups=groups, meta=meta)
  print(partition_lib.format_summary(summary), flush=True)
  return federated.from_lists([t[0] for t in trains], [t[1] for t in trains],
                              [t[0] for t in tests], [t[1] for t in tests], names,
                              num_classes=num_classes, task=task, spacing=spacing,
                              partition_summary=summary)


# -------------------------------------------------------------------------------- HAM10000


def normalize_rgb(images: np.ndarray) -> np.ndarray:
  """RGB in [0, 1] -> model input with the fixed `phantom_skin.PIXEL_MEAN` / `PIXEL_STD`."""
  return phantom_skin.normalize(images)


def _load_ham10000(opts: Options, seed: int) -> federated.FederatedData:
  root = _data_dir(opts, seed)
  records = ham10000.scan(root)
  by_id = {r.image_id: r for r in records}
  has_sites = all(r.site is not None for r in records)
  natural = opts.partition == 'natural'
  if natural and has_sites:
    k = None  # Every site; `_keep_largest_sites` applies num_clients below.
  else:
    k = opts.num_clients or None
  fed = ham10000.load_federation(
      root, image_size=opts.get('image_size'), partition=opts.partition, num_clients=k,
      alpha=opts.alpha, test_fraction=opts.test_fraction, seed=seed,
      max_examples=opts.max_cases or None, min_size=2, num_workers=opts.num_workers)
  meta = {key: v for key, v in fed['partition_summary'].items()
          if key not in ('clients', 'total', 'num_clients')}
  meta['task'] = 'ham10000'
  clients = fed['clients']
  names = [c['name'] for c in clients]
  if natural and has_sites:
    sizes = [np.arange(len(c['train_ids']) + len(c['test_ids'])) for c in clients]
    kept, _ = _keep_largest_sites(names, sizes, opts.num_clients, 'ham10000', meta)
    clients = [c for c in clients if c['name'] in kept]
    names = kept

  one = opts.get('one_image_per_lesion')
  meta['one_image_per_lesion'] = one
  meta['privacy_record'] = ('lesion (one image per lesion in training)' if one else
                            'image (lesions may have several training images: image-level DP '
                            'does not protect a lesion)')
  ids = sorted({i for c in clients for i in c['train_ids'] + c['test_ids']})
  pos = {image_id: n for n, image_id in enumerate(ids)}
  lesions = np.array([by_id[i].lesion_id for i in ids])
  dx = [by_id[i].dx for i in ids]
  labels = np.array(dx) if all(d is not None for d in dx) else None
  train_x, train_y, test_x, test_y, train_idx, test_idx = [], [], [], [], [], []
  for c in clients:
    x, y = c['train']
    rows = np.arange(len(c['train_ids']), dtype=np.int64)
    if one:  # Of each lesion, the training image with the smallest image_id.
      best: dict[str, int] = {}
      for r, image_id in enumerate(c['train_ids']):
        lesion = by_id[image_id].lesion_id
        if lesion not in best or image_id < c['train_ids'][best[lesion]]:
          best[lesion] = r
      rows = np.array(sorted(best.values()), np.int64)
    if len(rows) == 0 or len(c['test_ids']) == 0:
      raise LoaderError(
          f"client {c['name']!r} has {len(rows)} training and {len(c['test_ids'])} test "
          f'image(s) in {root}; add images, lower config.data.num_clients or change '
          'config.data.test_fraction.')
    train_x.append(normalize_rgb(x[rows]))
    train_y.append(y[rows])
    test_x.append(normalize_rgb(c['test'][0]))
    test_y.append(c['test'][1])
    train_idx.append(np.array([pos[c['train_ids'][r]] for r in rows], np.int64))
    test_idx.append(np.array([pos[i] for i in c['test_ids']], np.int64))
  summary = partition_lib.partition_summary(names, train_idx, test_idx, labels=labels,
                                            groups=lesions, meta=meta)
  print(partition_lib.format_summary(summary), flush=True)
  task, num_classes = TASK_OF['ham10000']
  return federated.from_lists(train_x, train_y, test_x, test_y, names, num_classes=num_classes,
                              task=task, spacing=(1.0, 1.0), partition_summary=summary)


# ------------------------------------------------------------------------------------ load


def load(data_cfg, seed: int) -> federated.FederatedData:
  """Loads the federation `data_cfg.name` in {'ham10000', 'kits23', 'brats2024'}.

  Args:
    data_cfg: `config.data` (see the module docstring for the keys read).
    seed: seed of every random choice (subsampling, partition, splits, phantoms).

  Returns:
    A `federated.FederatedData` with channels-last float32 examples, uint8 labels, the task's
    `task` / `num_classes`, `spacing` and `partition_summary`.

  Raises:
    LoaderError: bad config value, empty `config.data.dir`, or too few cases for the clients.
    ham10000.DataError, kits23.Kits23Error, brats.BratsError, nifti.NiftiError,
    FileNotFoundError: from the readers, naming the bad file, case or column.
  """
  opts = options(data_cfg)
  if opts.name == 'ham10000':
    return _load_ham10000(opts, int(seed))
  return _load_3d(opts, int(seed))
