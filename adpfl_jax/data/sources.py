"""The pipeline's view of a data folder: every case it can select, and reading the ones it keeps.

`read_ham10000`, `read_kits23` and `read_brats2024` turn `config.data.dir` into a `Source`:

* `cases`: one `Case` per example (its id, its privacy unit — lesion or patient —, its natural site,
  the label a Dirichlet partition skews, and the key that picks one example per unit), listed
  once from the folder's index (file names, metadata sheets) without decoding any image;
* `read(indices, num_workers)`: decodes only those cases, as float32 channels-last examples and
  uint8 label maps of the configured size, with their native spacing.

Two kinds of folder are read, told apart by their layout:

* a **raw release** in its official layout (docs/datasets.md §1–3), read by the readers
  (`ham10000.scan` / `load_example`, `kits23.scan` / `load_case`, `brats.scan` / `load_case`); 3D
  cases are preprocessed with `preprocess3d` on `num_workers` threads;
* a **prepared** folder written by `adpfl data prepare` (docs/datasets.md §8.2; `tfds_ham10000.find`
  / `tfds_3d.find`), read from its `metadata.json` case index and `array_record` files: the
  preprocessing was done at prepare time by the same functions, so both kinds give the same arrays
  for the same preprocessing keys. A prepared folder whose preprocessing differs from the config
  raises `SourceError` naming the `config.data` key.

Sites: HAM10000's `dataset` column; KiTS23's `case,site_id` CSV (`config.data.site_csv`, else
`anony_sites.csv` in the folder, else the contrast phase; `kits23.site_source`); the BraTS
metadata column `config.data.site_column`. A case no source covers has site None.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

import numpy as np
import tqdm

from adpfl_jax.data import brats
from adpfl_jax.data import ham10000
from adpfl_jax.data import kits23
from adpfl_jax.data import phantom_skin
from adpfl_jax.data import preprocess3d
from adpfl_jax.data import tfds_3d
from adpfl_jax.data import tfds_ham10000

PathLike = str | os.PathLike

#: The medical tasks read from a release (or prepared) folder.
TASKS = ('ham10000', 'kits23', 'brats2024')
#: Site the 3D readers give to a case that no site source covers.
UNASSIGNED = 'unassigned'

#: (image, labels, native spacing) of one decoded case.
Decoded = tuple[np.ndarray, np.ndarray, tuple[float, ...]]


class SourceError(ValueError):
  """A prepared folder does not match the config; the message names the `config.data` key."""


@dataclasses.dataclass(frozen=True)
class Case:
  """What the pipeline knows of one example before decoding it.

  Attributes:
    case_id: HAM10000 image_id, KiTS23 / BraTS case id.
    group: the privacy unit: HAM10000 lesion_id, KiTS23 / BraTS patient id.
    site: the natural client, or None when unknown.
    label: what a Dirichlet partition skews and the summary counts (HAM10000 `dx`, 3D site),
      or None when unknown.
    order: training keeps, of each group, the example with the smallest `order` (HAM10000
      image_id, BraTS time point).
  """

  case_id: str
  group: str
  site: str | None
  label: str | None
  order: str


@dataclasses.dataclass(frozen=True)
class Source:
  """A data folder as the pipeline sees it (see the module docstring).

  Attributes:
    cases: every selectable example, in the readers' order.
    read: `(indices into cases, num_workers) -> [Decoded]`, in the order of `indices`.
    spacing: voxel (pixel) spacing of the decoded examples; None: each case's native spacing.
    meta: what the partition summary records about the folder (`data_dir`, `data_format`,
      `sites`, and `layout` for HAM10000).
  """

  cases: list[Case]
  read: Callable[[Sequence[int], int], list[Decoded]]
  spacing: tuple[float, ...] | None
  meta: dict[str, Any]


def _threaded(fn: Callable[[int], Decoded]) -> Callable[[Sequence[int], int], list[Decoded]]:
  """`read` that maps `fn` over the indices, on `num_workers` threads if > 0."""

  def read(indices: Sequence[int], num_workers: int) -> list[Decoded]:
    # A progress bar once decoding takes more than a second (3D cases take a while each).
    with tqdm.tqdm(total=len(indices), desc='decoding cases', unit='case', delay=1.0,
                   file=sys.stdout) as bar:
      def one(i: int) -> Decoded:
        out = fn(i)
        bar.update(1)
        return out
      if num_workers > 0 and len(indices) > 1:
        with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
          return list(pool.map(one, indices))
      return [one(i) for i in indices]

  return read


def _meta(root: pathlib.Path, data_format: str, sites: str, **extra: Any) -> dict[str, Any]:
  return dict(data_dir=str(root), data_format=data_format, sites=sites, **extra)


# -------------------------------------------------------------------------------- HAM10000


def read_ham10000(root: pathlib.Path, image_size: tuple[int, int]) -> Source:
  """HAM10000 / ISIC 2018: `image_size` (H, W) RGB normalised with `phantom_skin.normalize`."""
  prepared = tfds_ham10000.find(root, image_size)
  if prepared is not None:
    return _prepared_ham10000(prepared)
  records = ham10000.scan(root)
  has_sites = any(r.site is not None for r in records)
  cases = [Case(r.image_id, r.lesion_id, r.site, r.dx, r.image_id) for r in records]

  def decode(i: int) -> Decoded:
    image, mask = ham10000.load_example(records[i], image_size)
    return phantom_skin.normalize(image), mask, (1.0, 1.0)

  sites = ('metadata column "dataset"' if has_sites else
           f'none ({records[0].layout} layout without a "dataset" column)')
  return Source(cases, _threaded(decode), (1.0, 1.0),
                _meta(root, 'raw', sites, layout=records[0].layout))


def _prepared_ham10000(path: pathlib.Path) -> Source:
  records = tfds_ham10000.records(path)
  data = tfds_ham10000.load(path)
  cases = [Case(r['image_id'], r['lesion_id'], r['site'], r['dx'], r['image_id'])
           for r in records]

  def read(indices: Sequence[int], num_workers: int) -> list[Decoded]:
    del num_workers  # array_record reads a batch in parallel itself.
    return [(phantom_skin.normalize(ham10000.to_float(ex['image'])), ex['mask'], (1.0, 1.0))
            for ex in data.__getitems__(list(indices))]

  has_sites = any(r['site'] is not None for r in records)
  sites = 'metadata column "dataset"' if has_sites else 'none (no "dataset" column)'
  return Source(cases, read, (1.0, 1.0),
                _meta(path, 'prepared', sites, layout=records[0]['layout']))


# ------------------------------------------------------------------------------------- 3D


def _site(site: str) -> str | None:
  return None if site == UNASSIGNED else site


def _decode_raw(found: Sequence[Any], load_case: Callable, preprocess: Callable,
                volume_shape: tuple[int, int, int],
                target_spacing: tuple[float, float, float] | None) -> Callable[[int], Decoded]:
  """Decoder of raw 3D case i: read its NIfTI files, resample, normalise, crop/pad."""

  def decode(i: int) -> Decoded:
    image, labels, spacing = load_case(found[i])
    pre = preprocess(image, labels, spacing, target_spacing=target_spacing or spacing,
                     shape=volume_shape)
    return pre.image.astype(np.float32), pre.labels.astype(np.uint8), tuple(spacing)

  return decode


def read_kits23(root: pathlib.Path, volume_shape: tuple[int, int, int],
                target_spacing: tuple[float, float, float] | None, site_csv: str) -> Source:
  """KiTS23 CT: `preprocess3d.preprocess_ct_case` at `target_spacing` (None: native) and shape."""
  prepared = tfds_3d.find('kits23_seg', root)
  if prepared is not None:
    return _prepared_kits23(prepared, volume_shape, target_spacing, site_csv)
  csv_path, ranges, sites = kits23.site_source(root, site_csv)
  found = kits23.scan(root, site_csv=csv_path, site_ranges=ranges, default_site=UNASSIGNED)
  cases = [Case(c.case_id, c.patient_id, _site(c.site), c.site, '') for c in found]

  decode = _decode_raw(found, kits23.load_case, preprocess3d.preprocess_ct_case, volume_shape,
                       target_spacing)
  return Source(cases, _threaded(decode), target_spacing, _meta(root, 'raw', sites))


def read_brats2024(root: pathlib.Path, volume_shape: tuple[int, int, int],
                   target_spacing: tuple[float, float, float] | None,
                   site_column: str) -> Source:
  """BraTS 2024 (or 2021) MRI: `preprocess3d.preprocess_mri_case`; labelled cases only."""
  prepared = tfds_3d.find('brats2024_seg', root)
  if prepared is not None:
    return _prepared_brats2024(prepared, volume_shape, target_spacing, site_column)
  found = brats.scan(root, site_column=site_column, default_site=UNASSIGNED)
  cases = [Case(c.case_id, c.patient_id, _site(c.site), c.site, c.timepoint) for c in found]

  decode = _decode_raw(found, brats.load_case, preprocess3d.preprocess_mri_case, volume_shape,
                       target_spacing)
  return Source(cases, _threaded(decode), target_spacing,
                _meta(root, 'raw', f'metadata column {site_column!r}'))


def _check_prepared(path: pathlib.Path, volume_shape: tuple[int, int, int],
                    target_spacing: tuple[float, float, float] | None) -> dict[str, Any]:
  """The prepared config, checked against the config's shape and spacing."""
  config = tfds_3d.prepared_config(path)
  if target_spacing is None:
    raise SourceError(
        f'config.data.target_spacing=() keeps each case\'s native spacing, but {path} was '
        f'resampled to {tuple(config["target_spacing"])} mm at prepare time; set '
        'config.data.target_spacing to it, or use the raw release.')
  for key, mine, theirs in (('volume_shape', volume_shape, config['shape']),
                            ('target_spacing', target_spacing, config['target_spacing'])):
    if list(mine) != list(theirs):
      flag = '--shape' if key == 'volume_shape' else '--target-spacing'
      raise SourceError(
          f'config.data.{key}={tuple(mine)} but {path} was prepared with {tuple(theirs)}; set '
          f'config.data.{key}={tuple(theirs)}, or prepare again with {flag} '
          f'{",".join(map(str, mine))}.')
  return config


def _prepared_3d(path: pathlib.Path, sites_of: Callable[[dict[str, str]], str | None],
                 order_key: str | None, spacing: tuple[float, float, float],
                 sites: str) -> Source:
  """A prepared `kits23_seg` / `brats2024_seg` folder (every split: the pipeline re-splits)."""
  entries = tfds_3d.records(path)
  data = tfds_3d.load(path)
  cases = []
  for _, _, rec in entries:
    site = sites_of(rec)
    cases.append(Case(rec['case_id'], rec['patient_id'], _site(site), site,
                      rec[order_key] if order_key else ''))
  order = sorted(range(len(cases)), key=lambda i: cases[i].case_id)  # The readers' order.
  entries = [entries[i] for i in order]
  cases = [cases[i] for i in order]

  def read(indices: Sequence[int], num_workers: int) -> list[Decoded]:
    del num_workers  # array_record reads a batch in parallel itself.
    by_split: dict[str, list[int]] = {}
    for i in indices:
      by_split.setdefault(entries[i][0], []).append(i)
    out: dict[int, Decoded] = {}
    for split, idx in by_split.items():
      examples = data[split].__getitems__([entries[i][1] for i in idx])
      for i, ex in zip(idx, examples):
        out[i] = (ex['image'], ex['label'], tuple(float(s) for s in ex['original_spacing']))
    return [out[i] for i in indices]

  return Source(cases, read, spacing, _meta(path, 'prepared', sites))


def _prepared_kits23(path: pathlib.Path, volume_shape: tuple[int, int, int],
                     target_spacing: tuple[float, float, float] | None,
                     site_csv: str) -> Source:
  config = _check_prepared(path, volume_shape, target_spacing)
  normalisation = (config['hu_window'], config['ct_mean'], config['ct_std'])
  if normalisation != (list(preprocess3d.KITS19_HU_WINDOW), preprocess3d.KITS19_MEAN,
                       preprocess3d.KITS19_STD):
    raise SourceError(
        f'{path} was normalised with HU window {config["hu_window"]}, mean {config["ct_mean"]}, '
        f'std {config["ct_std"]}; training uses the KiTS19 constants of preprocess3d: prepare '
        'it again with the default normalisation.')
  if site_csv:  # The sites of this CSV, as the raw release would give them.
    table = kits23.read_site_csv(site_csv)
    return _prepared_3d(
        path, lambda r: kits23.site_of(kits23.case_number(r['case_id']), table, None,
                                       UNASSIGNED),
        None, target_spacing, f'case,site_id table {site_csv}')
  return _prepared_3d(path, lambda r: r['site'], None, target_spacing,
                      f'sites stored at prepare time ({config["site_csv"] or "default rule"})')


def _prepared_brats2024(path: pathlib.Path, volume_shape: tuple[int, int, int],
                        target_spacing: tuple[float, float, float] | None,
                        site_column: str) -> Source:
  config = _check_prepared(path, volume_shape, target_spacing)
  if site_column != config['site_column']:
    raise SourceError(
        f'config.data.site_column={site_column!r} but {path} holds the sites of column '
        f'{config["site_column"]!r}; set config.data.site_column={config["site_column"]!r} or '
        'read the raw release.')
  return _prepared_3d(path, lambda r: r['site'], 'timepoint', target_spacing,
                      f'metadata column {site_column!r}')
