"""TFDS builders `kits23_seg` and `brats2024_seg`: streaming, TensorFlow-free, atomic.

`prepare(task, data_dir, out_dir, **cfg)` reads the raw release from `data_dir`
(the TFDS `manual_dir`), preprocesses every case to one fixed configured shape
and writes `array_record` splits; `load(path)` reads them back with
`as_data_source()` (random access, no TensorFlow):

  path = prepare('kits23_seg', '/data/kits23', '/data/prepared', shape=(32, 64, 64),
                 target_spacing=(5.0, 3.2, 3.2))
  train = load(path)['train']
  example = train[0]  # {'image': (32, 64, 64, 1) float32, 'label': ..., 'site': b'...', ...}

Training reads the prepared folder directly (`--config.data.dir=/data/prepared`,
docs/datasets.md §8.2): `find` locates the dataset, and `records` lists its cases from
`metadata.json` (`config` plus, per split, each example's `case_id`, `patient_id`,
`site` and, for BraTS, `timepoint` and `release`, in the order of the examples), so the
pipeline partitions and splits without reading a single volume and then reads only
the examples it keeps. The preprocessing is the pipeline's own
(`preprocess3d.preprocess_ct_case` / `preprocess_mri_case` at the configured `shape`
and `target_spacing`), so the arrays equal those decoded from the raw release.

Why `tfds.core.ShardBasedBuilder` rather than `GeneratorBasedBuilder` (checked
with tensorflow-datasets 4.9.10, no TensorFlow installed):

* `GeneratorBasedBuilder` + `file_format='array_record'` builds and reads back
  without TensorFlow, but its writer (`tfds.core.writer.Writer`) holds every
  serialised example of a split in an in-memory shuffle buffer until the split
  ends, so peak memory grows with the number of cases; past 1 GiB
  (`shuffle.MAX_MEM_BUFFER_SIZE`) it spills to temporary bucket files through
  `tf.io.gfile`, which fails without TensorFlow with
  `ModuleNotFoundError: No module named 'tensorflow'`. A full KiTS23 or BraTS
  split at useful shapes is several GiB, so that path cannot work here.
* `ShardBasedBuilder` (same package, same `array_record` output, same
  `as_data_source()`) writes each shard straight from its generator, in order,
  without shuffling or temporary files. Its shard writer (`ShardWriter`) keeps
  the examples of the shard being written in memory (`itertools.tee`), so peak
  memory is bounded by `cases_per_shard` cases, not by the dataset size.

Each shard's generator loads and preprocesses one case at a time. Splits are
`train` and, if `test_fraction > 0`, `test`, split by patient (BraTS time points
of one patient stay together). The build goes to a hidden temporary folder
inside `out_dir` and is renamed into place only on success; on any error the
temporary folder is deleted, so bad input leaves no prepared dataset behind.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from adpfl_jax.data import brats
from adpfl_jax.data import kits23
from adpfl_jax.data import partition
from adpfl_jax.data import preprocess3d

PathLike = str | os.PathLike

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class Kits23Config:
  """Preparation options for `kits23_seg` (stored in the dataset's metadata).

  Attributes:
    shape: fixed (z, y, x) output shape, cropped/padded around the kidneys.
    target_spacing: resampling target in mm (docs/datasets.md §2.6).
    hu_window: HU clip window.
    ct_mean: z-score mean (HU).
    ct_std: z-score std (HU).
    site_csv: `case,site_id` CSV for natural clients; with `site_ranges` also None,
      `kits23.site_source` decides (`<data_dir>/anony_sites.csv`, else the phase).
    site_ranges: inclusive `(first, last, site)` case-number ranges.
    test_fraction: fraction of patients in the `test` split (0: train only).
    split_seed: seed of the patient-grouped split.
    cases_per_shard: cases per `array_record` shard (bounds peak memory).
    max_cases: keep only the first `max_cases` cases (None: all).
  """

  shape: tuple[int, int, int]
  target_spacing: tuple[float, float, float]
  hu_window: tuple[float, float] = preprocess3d.KITS19_HU_WINDOW
  ct_mean: float = preprocess3d.KITS19_MEAN
  ct_std: float = preprocess3d.KITS19_STD
  site_csv: str | None = None
  site_ranges: tuple[tuple[int, int, str], ...] | None = None
  test_fraction: float = 0.0
  split_seed: int = 0
  cases_per_shard: int = 4
  max_cases: int | None = None


@dataclasses.dataclass(frozen=True)
class BratsConfig:
  """Preparation options for `brats2024_seg` (stored in the dataset's metadata).

  Attributes:
    shape: fixed (z, y, x) output shape, cropped/padded around the brain box.
    target_spacing: resampling target in mm.
    releases: release folders to use (None: all labelled ones found).
    metadata_path: metadata sheet (None: auto-detect in the data dir).
    site_column: metadata column defining the natural clients.
    partition_csv: FeTS partition CSV (BraTS 2021 naming).
    test_fraction: fraction of patients in the `test` split (0: train only).
    split_seed: seed of the patient-grouped split.
    cases_per_shard: cases per `array_record` shard (bounds peak memory).
    max_cases: keep only the first `max_cases` cases (None: all).
  """

  shape: tuple[int, int, int]
  target_spacing: tuple[float, float, float]
  releases: tuple[str, ...] | None = None
  metadata_path: str | None = None
  site_column: str = 'Site'
  partition_csv: str | None = None
  test_fraction: float = 0.0
  split_seed: int = 0
  cases_per_shard: int = 4
  max_cases: int | None = None


def _normalize(value: Any) -> Any:
  """Tuples -> lists, paths -> str, recursively: the JSON form of a config."""
  if isinstance(value, dict):
    return {k: _normalize(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_normalize(v) for v in value]
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  return value


def _freeze(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  return value


def make_config(task: str, **cfg: Any) -> Kits23Config | BratsConfig:
  """Builds and validates the config of `task` from keyword options.

  Raises:
    ValueError: unknown task, or invalid value (names the key).
    TypeError: unknown or missing option (names it).
  """
  config_cls = _task(task)[1]
  names = {f.name for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(cfg) - names)
  if unknown:
    raise TypeError(f'Unknown {task} option(s) {unknown}; valid options: {sorted(names)}.')
  missing = [f.name for f in dataclasses.fields(config_cls)
             if f.default is dataclasses.MISSING and f.name not in cfg]
  if missing:
    raise TypeError(f'{task} needs option(s) {missing} (the config.data volume_shape and '
                    'target_spacing the training config uses).')
  config = config_cls(**{k: _freeze(v) for k, v in cfg.items()})
  if len(config.shape) != 3 or any(int(s) < 1 for s in config.shape):
    raise ValueError(f'shape must be 3 positive ints, got {config.shape}.')
  if len(config.target_spacing) != 3 or any(float(s) <= 0 for s in config.target_spacing):
    raise ValueError(f'target_spacing must be 3 positive numbers, got {config.target_spacing}.')
  if not 0.0 <= config.test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in [0, 1), got {config.test_fraction}.')
  if config.cases_per_shard < 1:
    raise ValueError(f'cases_per_shard must be >= 1, got {config.cases_per_shard}.')
  return config


# ------------------------------------------------------------------------ splits


def split_cases(cases: Sequence[Any], test_fraction: float, seed: int) -> dict[str, list[Any]]:
  """Splits cases into `train` (and `test`) with no patient on both sides.

  Args:
    cases: objects with a `patient_id` attribute (KiTS23 or BraTS cases).
    test_fraction: target fraction of cases in `test`; 0 gives train only.
    seed: split seed.

  Returns:
    `{'train': [...], 'test': [...]}` (no `test` key when `test_fraction` is 0),
    each in input order.
  """
  if test_fraction <= 0:
    return {'train': list(cases)}
  train_idx, test_idx = partition.grouped_train_test_split([c.patient_id for c in cases],
                                                           test_fraction, seed)
  return {'train': [cases[i] for i in train_idx], 'test': [cases[i] for i in test_idx]}


# ---------------------------------------------------------------------- examples


def kits23_example(case: kits23.Kits23Case, config: Kits23Config) -> dict[str, Any]:
  """Loads and preprocesses one KiTS23 case into a `kits23_seg` example."""
  image, labels, spacing = kits23.load_case(case)
  shape = image.shape
  pre = preprocess3d.preprocess_ct_case(
      image, labels, spacing, target_spacing=config.target_spacing, shape=config.shape,
      window=config.hu_window, mean=config.ct_mean, std=config.ct_std)
  return {
      'image': pre.image,
      'label': pre.labels,
      'case_id': case.case_id,
      'patient_id': case.patient_id,
      'site': case.site,
      'spacing': np.asarray(pre.spacing, np.float32),
      'original_spacing': np.asarray(spacing, np.float32),
      'original_shape': np.asarray(shape, np.int32),
  }


def brats_example(case: brats.BratsCase, config: BratsConfig) -> dict[str, Any]:
  """Loads and preprocesses one BraTS case into a `brats2024_seg` example."""
  image, labels, spacing = brats.load_case(case)
  shape = image.shape[:3]
  pre = preprocess3d.preprocess_mri_case(
      image, labels, spacing, target_spacing=config.target_spacing, shape=config.shape)
  return {
      'image': pre.image,
      'label': pre.labels,
      'case_id': case.case_id,
      'patient_id': case.patient_id,
      'timepoint': case.timepoint,
      'release': case.release,
      'site': case.site,
      'spacing': np.asarray(pre.spacing, np.float32),
      'original_spacing': np.asarray(spacing, np.float32),
      'original_shape': np.asarray(shape, np.int32),
  }


def make_features(shape: Sequence[int], channels: int,
                  extra_text: Sequence[str] = ()) -> tfds.features.FeaturesDict:
  """Features of a prepared split: fixed-shape image (z, y, x, c), label, ids, spacings."""
  shape = tuple(int(s) for s in shape)
  feats = {
      'image': tfds.features.Tensor(shape=shape + (channels,), dtype=np.float32),
      'label': tfds.features.Tensor(shape=shape, dtype=np.uint8),
      'spacing': tfds.features.Tensor(shape=(3,), dtype=np.float32),
      'original_spacing': tfds.features.Tensor(shape=(3,), dtype=np.float32),
      'original_shape': tfds.features.Tensor(shape=(3,), dtype=np.int32),
  }
  for name in ('case_id', 'patient_id', 'site') + tuple(extra_text):
    feats[name] = tfds.features.Text()
  return tfds.features.FeaturesDict(feats)


# ---------------------------------------------------------------------- builders


class _Seg3dBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
  """Shared logic: scan, split, shard, stream one preprocessed case at a time."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'Case index in metadata.json (training reads prepared folders); KiTS23 sites '
               'from kits23.site_source by default.',
  }

  def __init__(self, *, prep_config: Any, **kwargs: Any):
    self._prep = prep_config
    super().__init__(**kwargs)

  # What a task's builder sets: its registered name, its reader and example function, the input
  # channels, the extra string features beyond case/patient/site, and its info text.
  TASK: str
  EXAMPLE: Callable[[Any, Any], dict[str, Any]]
  CHANNELS: int
  EXTRA: tuple[str, ...] = ()
  DESCRIPTION: str
  HOMEPAGE: str

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=make_features(self._prep.shape, self.CHANNELS, self.EXTRA),
        homepage=self.HOMEPAGE, metadata=self._metadata())

  def _scan(self, data_dir: pathlib.Path) -> list[Any]:
    return scan_cases(self.TASK, data_dir, self._prep)

  def _example(self, case: Any) -> dict[str, Any]:
    return type(self).EXAMPLE(case, self._prep)

  def _record(self, case: Any) -> dict[str, str]:
    record = {'case_id': case.case_id, 'patient_id': case.patient_id, 'site': str(case.site)}
    return dict(record, **{k: str(getattr(case, k)) for k in self.EXTRA})

  def _metadata(self) -> tfds.core.MetadataDict:
    return tfds.core.MetadataDict(
        task=self.name, config=_normalize(dataclasses.asdict(self._prep)))

  def _shard_iterators_per_split(
      self, dl_manager: tfds.download.DownloadManager
  ) -> Mapping[str, Sequence[Callable[[], Iterator[tuple[str, dict[str, Any]]]]]]:
    cases = self._scan(pathlib.Path(dl_manager.manual_dir))
    if self._prep.max_cases is not None:
      cases = cases[: self._prep.max_cases]
    splits = split_cases(cases, self._prep.test_fraction, self._prep.split_seed)
    n = self._prep.cases_per_shard
    out = {}
    # Written to metadata.json with the rest of the info, after the splits: the examples of a
    # split are stored in this order (one shard after the other, each in order).
    self.info.metadata['records'] = {
        split: [self._record(c) for c in split_cases_] for split, split_cases_ in splits.items()
        if split_cases_}
    for split, split_cases_ in splits.items():
      if not split_cases_:
        continue
      bar = tqdm.tqdm(total=len(split_cases_), desc=f'{self.name} {split}', unit='case',
                      delay=0.5)
      chunks = [split_cases_[i:i + n] for i in range(0, len(split_cases_), n)]
      out[split] = [functools.partial(self._generate_shard, chunk, bar, last=(j == len(chunks) - 1))
                    for j, chunk in enumerate(chunks)]
    return out

  def _generate_shard(self, cases: Sequence[Any], bar: tqdm.tqdm,
                      last: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    for case in cases:
      yield case.case_id, self._example(case)
      bar.update(1)
    if last:
      bar.close()


class Kits23Seg(_Seg3dBuilder, skip_registration=True):
  """KiTS23 CT, resampled, HU-windowed, z-scored, fixed shape around the kidneys."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Clone https://github.com/neheller/kits23, run `kits23_download_data` and pass the
  repository (or its `dataset/` folder) as `data_dir`; layout
  `dataset/case_XXXXX/{imaging,segmentation}.nii.gz`.
  """
  TASK = 'kits23_seg'
  EXAMPLE = kits23_example
  CHANNELS = 1
  DESCRIPTION = ('KiTS23 kidney/tumour/cyst CT segmentation (labels 0-3), preprocessed to a '
                 'fixed shape.')
  HOMEPAGE = 'https://kits-challenge.org/kits23/'


class Brats2024Seg(_Seg3dBuilder, skip_registration=True):
  """BraTS 2024 GLI (or 2021) 4-channel MRI, brain-cropped, z-scored, fixed shape."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download BraTS2024-BraTS-GLI-TrainingData.zip (and AdditionalTrainingData) from
  Synapse, unzip into `data_dir` (folders training_data1_v2/,
  training_data_additional/), optionally with the metadata sheet as CSV.
  """
  TASK = 'brats2024_seg'
  EXAMPLE = brats_example
  CHANNELS = 4
  EXTRA = ('timepoint', 'release')
  DESCRIPTION = ('BraTS 2024 adult glioma post-treatment MRI (t1n, t1c, t2w, t2f), labels 1 NETC, '
                 '2 SNFH, 3 ET, 4 RC, preprocessed to a fixed shape.')
  HOMEPAGE = 'https://www.synapse.org/brats2024'


_TASKS = {'kits23_seg': (Kits23Seg, Kits23Config), 'brats2024_seg': (Brats2024Seg, BratsConfig)}


def _task(task: str):
  if task not in _TASKS:
    raise ValueError(f'Unknown task {task!r}; expected one of {sorted(_TASKS)}.')
  return _TASKS[task]


# ---------------------------------------------------------------- prepare / load


def scan_cases(task: str, data_dir: PathLike, config: Kits23Config | BratsConfig) -> list[Any]:
  """Lists the cases `task` would prepare from `data_dir` with `config`."""
  _task(task)
  if task == 'kits23_seg':
    site_csv, site_ranges = config.site_csv, config.site_ranges
    if site_csv is None and site_ranges is None:
      site_csv, site_ranges, _ = kits23.site_source(data_dir)
    return kits23.scan(data_dir, site_csv=site_csv, site_ranges=site_ranges)
  return brats.scan(data_dir, releases=config.releases, metadata_path=config.metadata_path,
                    site_column=config.site_column, partition_csv=config.partition_csv)


def prepared_config(path: PathLike) -> dict[str, Any]:
  """The preparation config stored with a prepared dataset (JSON form)."""
  meta = pathlib.Path(path) / 'metadata.json'
  return json.loads(meta.read_text())['config']


def find(task: str, root: PathLike) -> pathlib.Path | None:
  """The prepared `task` dataset in `root`, or None if `root` holds none.

  `root` may be the `out_dir` given to `prepare` (holding `<task>/<version>/`), the
  `<task>/` folder or the `<task>/<version>/` folder itself. The current `VERSION` is
  returned when several versions are present.

  Raises:
    ValueError: `root` holds `task` only in other versions (prepared by an older release of
      this code; prepare it again).
  """
  builder_cls, _ = _task(task)
  return _find_version(pathlib.Path(root), builder_cls.name, str(builder_cls.VERSION), task)


def _find_version(root: pathlib.Path, name: str, version: str,
                  what: str) -> pathlib.Path | None:
  """`root`, `root/<version>` or `root/<name>/<version>` if it is a prepared `name` dataset."""
  if (root / 'dataset_info.json').is_file():  # A version folder.
    if root.parent.name != name:
      return None
    if root.name == version:
      return root
    raise ValueError(f'{root} is {what} version {root.name}, not {version}: prepare it again '
                     f'with `adpfl data prepare` (writes {root.parent / version}).')
  for base in (root / name, root):
    if base.name != name or not base.is_dir():
      continue
    if (base / version / 'dataset_info.json').is_file():
      return base / version
    found = sorted(p.name for p in base.iterdir() if (p / 'dataset_info.json').is_file())
    if found:
      raise ValueError(f'{base} holds {what} version(s) {found}, not {version}: prepare it '
                       f'again with `adpfl data prepare` (writes {base / version}).')
  return None


def records(path: PathLike) -> list[tuple[str, int, dict[str, str]]]:
  """`(split, index, record)` of every example of a prepared dataset, from `metadata.json`.

  `record` holds the case's `case_id`, `patient_id`, `site` (and `timepoint`, `release` for
  BraTS); `load(path)[split][index]` is its example.
  """
  meta = json.loads((pathlib.Path(path) / 'metadata.json').read_text())
  return [(split, i, rec) for split, recs in meta['records'].items()
          for i, rec in enumerate(recs)]


def prepare(
    task: str,
    data_dir: PathLike,
    out_dir: PathLike,
    *,
    overwrite: bool = False,
    **cfg: Any,
) -> pathlib.Path:
  """Prepares `task` ('kits23_seg' or 'brats2024_seg') from raw data, atomically.

  Args:
    task: builder name.
    data_dir: raw release folder (the TFDS manual dir).
    out_dir: TFDS data dir; the result is `<out_dir>/<task>/<version>/`.
    overwrite: replace an existing prepared dataset with a different config.
    **cfg: `Kits23Config` / `BratsConfig` fields.

  Returns:
    The prepared dataset folder. If it already exists with the same config it
    is returned as is.

  Raises:
    FileExistsError: a prepared dataset with another config exists and
      `overwrite` is False.
    FileNotFoundError, ValueError (and the readers' errors, which name the bad
      case or file): nothing is left under `out_dir` in that case.
  """
  builder_cls, _ = _task(task)
  config = make_config(task, **cfg)
  data_dir = pathlib.Path(data_dir)
  if not data_dir.is_dir():
    raise FileNotFoundError(f'{task}: data directory not found: {data_dir}')
  out_dir = pathlib.Path(out_dir)
  final = out_dir / builder_cls.name / str(builder_cls.VERSION)
  wanted = _normalize(dataclasses.asdict(config))
  if final.exists() and not overwrite:
    try:
      existing = prepared_config(final)
    except (OSError, KeyError, ValueError):
      existing = None
    if existing == wanted:
      _log.info('%s: reusing prepared dataset %s', task, final)
      return final
    raise FileExistsError(
        f'{final} exists with a different config ({existing}); pass overwrite=True to replace.')

  scan_cases(task, data_dir, config)  # Fail early, with the readers' errors, before any write.
  created = [p for p in (out_dir, final.parent) if not p.exists()]
  out_dir.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{builder_cls.name}-incomplete-', dir=out_dir))
  try:
    builder = builder_cls(data_dir=tmp, file_format='array_record', prep_config=config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(data_dir)))
    built = pathlib.Path(builder.data_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # overwrite=True: move the old one into tmp, deleted below.
      os.replace(final, tmp / 'replaced')
    os.replace(built, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    for p in reversed(created):  # Only folders this call created, if still empty.
      if p.is_dir() and not any(p.iterdir()):
        p.rmdir()
    raise
  shutil.rmtree(tmp, ignore_errors=True)
  _log.info('%s: prepared %s', task, final)
  return final


def load(path: PathLike) -> Mapping[str, Any]:
  """Opens a prepared dataset: split name -> random-access data source."""
  return tfds.builder_from_directory(os.fspath(path)).as_data_source()
