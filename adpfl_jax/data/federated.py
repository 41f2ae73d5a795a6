"""The data pipeline: `load(config.data, seed) -> FederatedData`, one path for every data set.

=========  ===============================  ===========  =========  ===========  ============
name       example (channels last)          labels       task       num_classes  privacy unit
=========  ===============================  ===========  =========  ===========  ============
ham10000   (H, W, 3) RGB, fixed normalised  {0, 1}       skin       1 (sigmoid)  lesion
kits23     (D, H, W, 1) CT, HU window +     {0, ..., 3}  kits23     4 (softmax)  patient
           z-score with public constants
brats2024  (D, H, W, 4) t1n, t1c, t2w, t2f, {0, ..., 4}  brats2024  5 (softmax)  patient
           z-score in the brain mask
=========  ===============================  ===========  =========  ===========  ============

`phantom_skin` (the built-in synthetic federation, `phantom_skin.make_federation`) is generated in
memory. The medical data sets go through the same steps, every random choice a function of `seed`:

1. **Read** `config.data.dir` once (`sources.read_<task>`): a raw release in its official layout
   or a folder prepared by `adpfl data prepare` (docs/datasets.md §8.2), listed as `sources.Case`s
   (id, patient / lesion, site, label) without decoding anything. If `config.data.dir` is '',
   phantoms are written once in the real layout into a cache (`phantoms.cached`) and read back
   through the same readers. Reader errors (naming the file, case or column) propagate.
2. **Subsample** (`config.data.max_cases` > 0): a seeded subset of whole patients / lesions with
   at most that many cases (`partition.subsample_groups`).
3. **Partition** into clients, whole patients / lesions per client (`config.data.partition`):
   'natural' (one client per site; `num_clients` = 0 keeps every site, K keeps the K largest and
   the summary says which were dropped), 'iid' or 'dirichlet' (Dirichlet(`alpha`) over the
   HAM10000 diagnosis or the 3D site) into `num_clients` clients. Cases without a site are
   dropped from a natural 3D partition; HAM10000 without sites (ISIC 2018, Kaggle copies) falls
   back to 'dirichlet' with `num_clients` (0: one client per HAM10000 source) and says so.
4. **Split** each client's patients / lesions into train and test
   (`partition.grouped_train_test_split` at `test_fraction`, seeded `[seed, k]` with k the
   client's position in the partition before any site was dropped): no patient is on both sides
   nor in two clients.
5. **One example per privacy unit** in training (`partition.one_per_group`): DP-SGD protects one
   training example, hence one patient only if each patient is one example. BraTS keeps each
   patient's earliest time point, HAM10000 (with `one_image_per_lesion`) the image with the
   smallest image_id of each lesion; KiTS23 has one case per patient. Test splits keep all.
6. **Decode** only the kept cases (`Source.read`, `num_workers` threads): HAM10000 resized to
   `image_size` and normalised with the fixed `phantom_skin.PIXEL_MEAN` / `PIXEL_STD`; 3D
   resampled to `target_spacing` (() keeps the native spacing, which must then be common),
   normalised and cropped / padded to `volume_shape` (`preprocess3d`).
7. **Pad** the clients into a `padded.FederatedData` with the partition summary
   (`partition.partition_summary`, printed with `format_summary`).

Every key is read from `config.data` without fallback (the configs own the defaults:
`configs/default.py`, `configs/common.py` and `experiments/<task>.py`); a missing key raises
`DataConfigError` naming `config.data.<key>`. Keys: name, dir, partition, num_clients, alpha,
test_fraction, max_cases, num_workers; image_size, one_image_per_lesion
(HAM10000); volume_shape, target_spacing (3D); site_csv (KiTS23); site_column (BraTS); with an
empty dir phantom_cases, phantom_sites, phantom_shape, cache_dir. `phantom_skin` reads
num_clients, examples_per_client, test_examples_per_client, image_size, heterogeneity and
seed_offset.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from adpfl_jax.data import ham10000
from adpfl_jax.data import padded
from adpfl_jax.data import partition
from adpfl_jax.data import phantom_skin
from adpfl_jax.data import phantoms
from adpfl_jax.data import sources
from adpfl_jax.data.padded import FederatedData

#: Every `config.data.name`.
DATASETS = ('phantom_skin',) + sources.TASKS
#: A client needs a training and a test patient / lesion.
_MIN_GROUPS = 2
#: The summary counts labels per client when there are at most this many distinct ones.
_MAX_SUMMARY_LABELS = 12


class DataConfigError(ValueError):
  """Invalid or missing `config.data` value, or too little data; the message names the key."""


@dataclasses.dataclass(frozen=True)
class _Task:
  """What differs between the medical tasks, beyond their readers."""

  eval_task: str  # `FederatedData.task`: the evaluation regions.
  num_classes: int
  unit: str  # The privacy unit, one `sources.Case.group`.
  label: str  # What `sources.Case.label` is.
  # Natural partition with cases of unknown site: None drops them; an int falls back to
  # 'dirichlet' with config.data.num_clients clients, or this many when it is 0.
  fallback_clients: int | None


_TASKS = {
    'ham10000': _Task('skin', 1, 'lesion', 'dx', len(ham10000.SOURCES)),
    'kits23': _Task('kits23', 4, 'patient', 'site', None),
    'brats2024': _Task('brats2024', 5, 'patient', 'site', None),
}


def _key(data_cfg, key: str) -> Any:
  if key not in data_cfg:
    raise DataConfigError(f'config.data.{key} is missing: the data pipeline reads it (the configs '
                          'set it: configs/default.py, configs/common.py, experiments/<task>.py).')
  return data_cfg[key]


# --------------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class Options:
  """The `config.data` keys of a medical data set, validated (see the module docstring)."""

  name: str
  dir: str
  partition: str
  num_clients: int
  alpha: float  # 'dirichlet', and HAM10000's fallback from 'natural'.
  test_fraction: float
  max_cases: int
  num_workers: int
  image_size: tuple[int, int] | None  # HAM10000.
  one_image_per_lesion: bool  # HAM10000; the 3D tasks always keep one case per patient.
  volume_shape: tuple[int, int, int] | None  # 3D.
  target_spacing: tuple[float, float, float] | None  # 3D; None keeps the native spacing.
  site_csv: str  # KiTS23.
  site_column: str  # BraTS.


def _int_tuple(value: Any, n: int, key: str) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)):
    value = (int(value),) * n
  try:
    out = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise DataConfigError(f'config.data.{key}={value!r} must be {n} positive integers.') from None
  if len(out) != n or min(out) < 1:
    raise DataConfigError(f'config.data.{key}={value!r} must be {n} positive integers.')
  return out


def _spacing_tuple(value: Any, key: str) -> tuple[float, float, float] | None:
  if value is None or (isinstance(value, (tuple, list)) and not value) or value == '':
    return None
  message = (f'config.data.{key}={value!r} must be 3 positive numbers (mm), or () to keep the '
             'native spacing.')
  try:
    out = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    raise DataConfigError(message) from None
  if len(out) != 3 or min(out) <= 0:
    raise DataConfigError(message)
  return out  # type: ignore[return-value]


def options(data_cfg) -> Options:
  """Reads and validates the keys of `data_cfg` (a ConfigDict or dict) for a medical data set."""
  name = _key(data_cfg, 'name')
  if name not in sources.TASKS:
    raise DataConfigError(f'config.data.name={name!r} is not one of {sources.TASKS}.')
  part = str(_key(data_cfg, 'partition'))
  if part not in partition.PARTITIONS:
    raise DataConfigError(f'config.data.partition={part!r} must be one of '
                          f'{partition.PARTITIONS}.')
  num_clients = int(_key(data_cfg, 'num_clients'))
  if num_clients < 0:
    raise DataConfigError(f'config.data.num_clients={num_clients} must be >= 0 (0: every '
                          'natural site).')
  if part != 'natural' and num_clients < 1:
    raise DataConfigError(f'config.data.num_clients={num_clients}: partition={part!r} needs '
                          'num_clients >= 1.')
  alpha = float(_key(data_cfg, 'alpha'))
  if not alpha > 0:
    raise DataConfigError(f'config.data.alpha={alpha} must be > 0.')
  test_fraction = float(_key(data_cfg, 'test_fraction'))
  if not 0.0 < test_fraction < 1.0:
    raise DataConfigError(f'config.data.test_fraction={test_fraction} must be in (0, 1): every '
                          'client needs a training and a test split.')
  max_cases = int(_key(data_cfg, 'max_cases'))
  if max_cases < 0:
    raise DataConfigError(f'config.data.max_cases={max_cases} must be >= 0 (0: all cases).')
  num_workers = int(_key(data_cfg, 'num_workers'))
  if num_workers < 0:
    raise DataConfigError(f'config.data.num_workers={num_workers} must be >= 0 (0: no threads).')
  task = dict(image_size=None, one_image_per_lesion=True, volume_shape=None,
              target_spacing=None, site_csv='', site_column='')
  if name == 'ham10000':
    task['image_size'] = _int_tuple(_key(data_cfg, 'image_size'), 2, 'image_size')
    task['one_image_per_lesion'] = bool(_key(data_cfg, 'one_image_per_lesion'))
  else:
    task['volume_shape'] = _int_tuple(_key(data_cfg, 'volume_shape'), 3, 'volume_shape')
    task['target_spacing'] = _spacing_tuple(_key(data_cfg, 'target_spacing'), 'target_spacing')
    if name == 'kits23':
      task['site_csv'] = str(_key(data_cfg, 'site_csv'))
    else:
      task['site_column'] = str(_key(data_cfg, 'site_column'))
  return Options(name=name, dir=str(_key(data_cfg, 'dir')), partition=part,
                 num_clients=num_clients, alpha=alpha, test_fraction=test_fraction,
                 max_cases=max_cases, num_workers=num_workers, **task)


# ---------------------------------------------------------------------------------- folder


def _data_dir(opts: Options, data_cfg, seed: int) -> pathlib.Path:
  """`config.data.dir`, checked, or the phantom cache when it is ''."""
  if not opts.dir:
    dims = 2 if opts.name == 'ham10000' else 3
    path = phantoms.cached(opts.name, int(_key(data_cfg, 'phantom_cases')),
                           int(_key(data_cfg, 'phantom_sites')), seed,
                           _int_tuple(_key(data_cfg, 'phantom_shape'), dims, 'phantom_shape'),
                           str(_key(data_cfg, 'cache_dir')) or None)
    print(f'config.data.dir is empty: using {opts.name} phantoms in the real layout at {path}',
          flush=True)
    return path
  path = pathlib.Path(opts.dir).expanduser()
  hint = (f'write phantoms with `adpfl data make-phantoms --task {opts.name} --out {path} '
          '--cases N`, or leave config.data.dir empty to use cached phantoms')
  if not path.exists():
    raise DataConfigError(f'config.data.dir={opts.dir!r} does not exist ({hint}).')
  if not path.is_dir():
    raise DataConfigError(f'config.data.dir={opts.dir!r} is not a directory.')
  if not any(path.iterdir()):
    raise DataConfigError(f'config.data.dir={opts.dir!r} is empty: expected the {opts.name} '
                          f'release layout or a folder from `adpfl data prepare` ({hint}).')
  return path


def _source(opts: Options, root: pathlib.Path) -> sources.Source:
  if opts.name == 'ham10000':
    return sources.read_ham10000(root, opts.image_size)
  if opts.name == 'kits23':
    return sources.read_kits23(root, opts.volume_shape, opts.target_spacing, opts.site_csv)
  return sources.read_brats2024(root, opts.volume_shape, opts.target_spacing, opts.site_column)


# ------------------------------------------------------------------------------ partitions


def _natural(opts: Options, sites: np.ndarray, groups: np.ndarray,
             meta: dict) -> tuple[list[str], list[int], list[np.ndarray]]:
  """One client per known site; the `num_clients` largest (0: all)."""
  known = np.flatnonzero([s is not None for s in sites])
  if len(known) == 0:
    raise DataConfigError(
        f'config.data.partition=natural: no case of {meta["data_dir"]} has a site; use '
        "partition='iid' or 'dirichlet'.")
  if len(known) < len(sites):
    meta['dropped_unassigned'] = int(len(sites) - len(known))
    print(f'natural partition: dropping {len(sites) - len(known)} case(s) with no site',
          flush=True)
  parts = partition.natural(sites[known].astype(str), groups=groups[known])
  names = list(parts)
  indices = [known[v] for v in parts.values()]
  k = opts.num_clients
  if k == 0 or k == len(names):
    return names, list(range(len(names))), indices
  if k > len(names):
    raise DataConfigError(
        f'config.data.num_clients={k} but the natural partition has only {len(names)} site(s) '
        f"{names}; use num_clients=0 (every site), fewer clients, or partition='iid'/"
        "'dirichlet'.")
  kept = sorted(sorted(range(len(names)), key=lambda i: (-len(indices[i]), names[i]))[:k])
  dropped = [names[i] for i in range(len(names)) if i not in kept]
  meta['dropped_sites'] = (f'{len(dropped)} smallest site(s) dropped to keep num_clients={k}: '
                           f'{dropped[:8]}{" ..." if len(dropped) > 8 else ""}')
  print(f'natural partition: keeping the {k} largest of {len(names)} {opts.name} sites',
        flush=True)
  return [names[i] for i in kept], kept, [indices[i] for i in kept]


def _partition(opts: Options, task: _Task, cases: list[sources.Case], groups: np.ndarray,
               seed: int, meta: dict) -> tuple[list[str], list[int], list[np.ndarray]]:
  """Client names, split-seed ordinals and example indices (whole groups per client)."""
  sites = np.array([c.site for c in cases], dtype=object)
  method, k = opts.partition, opts.num_clients
  unknown = int(sum(s is None for s in sites))
  if method == 'natural' and unknown and task.fallback_clients is not None:
    method, k = 'dirichlet', k or task.fallback_clients
    reason = f'{unknown} of {len(cases)} case(s) have no site; sites: {meta["sites"]}'
    meta['partition'] = f'dirichlet with {k} clients (natural unavailable: {reason})'
    print(f'natural partition unavailable for {meta["data_dir"]} ({reason}): using a '
          f'dirichlet partition into {k} clients', flush=True)
  if method == 'natural':
    names, ordinals, indices = _natural(opts, sites, groups, meta)
  else:
    n_groups = len(set(groups.tolist()))
    if k * _MIN_GROUPS > n_groups:
      raise DataConfigError(
          f'config.data.num_clients={k} needs at least {k * _MIN_GROUPS} {task.unit}s '
          f'({_MIN_GROUPS} per client for a train/test split), but {meta["data_dir"]} has '
          f'{n_groups}; lower num_clients or add cases.')
    if method == 'iid':
      indices = partition.iid(len(cases), k, seed, groups=groups)
    else:
      labels = [c.label for c in cases]
      skew = 'label' if all(v is not None for v in labels) else 'quantity'
      meta.update(alpha=opts.alpha, skew=task.label if skew == 'label' else skew)
      try:
        indices = partition.dirichlet(np.array(labels if skew == 'label' else [''] * len(cases)),
                                      k, opts.alpha, seed, min_size=_MIN_GROUPS, groups=groups,
                                      skew=skew)
      except ValueError as e:
        raise DataConfigError(f'config.data.alpha={opts.alpha}, config.data.num_clients={k}: '
                              f'{e}') from e
    names, ordinals = [f'client_{i}' for i in range(k)], list(range(k))
  for name, idx in zip(names, indices):
    n = len(set(groups[idx].tolist()))
    if n < _MIN_GROUPS:
      raise DataConfigError(
          f'client {name!r} has {n} {task.unit}(s); each client needs at least {_MIN_GROUPS} for '
          f'a train/test split (config.data.test_fraction={opts.test_fraction}). Add cases, '
          "lower config.data.num_clients or use partition='iid'.")
  return names, ordinals, indices


# ------------------------------------------------------------------------------------ load


def _phantom_skin(data_cfg, seed: int) -> FederatedData:
  fed = phantom_skin.make_federation(
      num_clients=int(_key(data_cfg, 'num_clients')),
      examples_per_client=int(_key(data_cfg, 'examples_per_client')),
      test_examples_per_client=int(_key(data_cfg, 'test_examples_per_client')),
      image_size=int(_key(data_cfg, 'image_size')),
      seed=seed + int(_key(data_cfg, 'seed_offset')),
      heterogeneity=float(_key(data_cfg, 'heterogeneity')))
  return padded.from_lists(fed['train_x'], fed['train_y'], fed['test_x'], fed['test_y'],
                           fed['client_names'], num_classes=1, task='skin', spacing=(1.0, 1.0))


def load(data_cfg, seed: int) -> FederatedData:
  """Loads the federation `config.data.name` (see the module docstring for the steps).

  Args:
    data_cfg: `config.data` (a ConfigDict or dict holding every key the data set reads).
    seed: seed of every random choice (subsampling, partition, splits, phantoms).

  Returns:
    A `FederatedData` with channels-last float32 examples, uint8 labels, the task's `task` /
    `num_classes`, `spacing` and (medical data sets) `partition_summary`.

  Raises:
    DataConfigError: missing or bad `config.data` value, empty `config.data.dir`, or too few
      cases for the clients (names the key).
    sources.SourceError: a prepared folder prepared with other preprocessing (names the key).
    ham10000.DataError, kits23.Kits23Error, brats.BratsError, nifti.NiftiError,
    FileNotFoundError: from the readers, naming the bad file, case or column.
  """
  seed = int(seed)
  name = _key(data_cfg, 'name')
  if name == 'phantom_skin':
    return _phantom_skin(data_cfg, seed)
  opts = options(data_cfg)
  task = _TASKS[opts.name]
  source = _source(opts, _data_dir(opts, data_cfg, seed))
  meta: dict[str, Any] = dict(task=opts.name, **source.meta, partition=opts.partition, seed=seed,
                              test_fraction=opts.test_fraction)
  cases = source.cases
  keep = np.arange(len(cases))
  if opts.max_cases:
    keep = partition.subsample_groups([c.group for c in cases], opts.max_cases, seed)
    if len(keep) == 0:
      raise DataConfigError(f'config.data.max_cases={opts.max_cases} keeps no whole '
                            f'{task.unit}.')
    meta['max_cases'] = opts.max_cases
    cases = [cases[i] for i in keep]
  groups = np.array([c.group for c in cases])

  names, ordinals, indices = _partition(opts, task, cases, groups, seed, meta)
  one_per_unit = opts.one_image_per_lesion or opts.name != 'ham10000'
  meta['privacy_record'] = (f'{task.unit} (one example per {task.unit} in training)'
                            if one_per_unit else
                            'image (lesions may have several training images: image-level DP '
                            'does not protect a lesion)')
  order = [c.order for c in cases]
  train_idx, test_idx = [], []
  for ordinal, idx in zip(ordinals, indices):
    tr, te = partition.grouped_train_test_split(groups[idx], opts.test_fraction,
                                                [seed, ordinal])
    tr, te = idx[tr], idx[te]
    train_idx.append(partition.one_per_group(tr, groups, order) if one_per_unit else tr)
    test_idx.append(te)

  needed = sorted(set(np.concatenate(train_idx + test_idx).tolist()))
  decoded = dict(zip(needed, source.read([int(keep[i]) for i in needed], opts.num_workers)))
  spacing = source.spacing
  if spacing is None:
    native = {tuple(round(float(s), 4) for s in d[2]) for d in decoded.values()}
    if len(native) > 1:
      raise DataConfigError(
          f'config.data.target_spacing is empty (keep native spacing) but the cases have '
          f'{len(native)} different spacings, e.g. {sorted(native)[:3]}; set '
          'config.data.target_spacing.')
    spacing = native.pop()

  def stack(idx: np.ndarray, part: int) -> np.ndarray:
    return np.stack([decoded[i][part] for i in idx.tolist()])

  labels = [c.label for c in cases]
  used = [labels[i] for i in needed]
  show = all(v is not None for v in used) and len(set(used)) <= _MAX_SUMMARY_LABELS
  summary = partition.partition_summary(names, train_idx, test_idx,
                                        labels=np.array(labels) if show else None,
                                        groups=groups, meta=meta)
  print(partition.format_summary(summary), flush=True)
  return padded.from_lists([stack(i, 0) for i in train_idx], [stack(i, 1) for i in train_idx],
                           [stack(i, 0) for i in test_idx], [stack(i, 1) for i in test_idx],
                           names, num_classes=task.num_classes, task=task.eval_task,
                           spacing=tuple(float(s) for s in spacing), partition_summary=summary)
