"""Training from a folder prepared by `adpfl data prepare` gives the raw release's federation."""

import importlib.util
import pathlib

import numpy as np
import pytest

from adpfl_jax import data_cli
from adpfl_jax.data import federated
from adpfl_jax.data import kits23
from adpfl_jax.data import phantoms
from adpfl_jax.data import sources
from adpfl_jax.data import tfds_3d

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = {  # phantom shape, cases, and the preprocessing keys of the tiny config
    'kits23': ((8, 16, 16), 12, dict(volume_shape=(4, 8, 8), target_spacing=(4.0, 2.0, 2.0))),
    'brats2024': ((8, 16, 16), 16, dict(volume_shape=(4, 8, 8),
                                        target_spacing=(2.0, 2.0, 2.0))),
    'ham10000': ((24, 32), 30, dict(image_size=(12, 16))),
}


def _flags(task):
  keys = TINY[task][2]
  if task == 'ham10000':
    return ['--image-size', '12,16']
  return ['--shape', ','.join(map(str, keys['volume_shape'])),
          '--target-spacing', ','.join(map(str, keys['target_spacing']))]


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """Per task: (raw phantom release, prepared folder of it at the tiny preprocessing)."""
  out = {}
  for task, (shape, cases, _) in TINY.items():
    raw = phantoms.write(task, tmp_path_factory.mktemp(f'{task}_raw'), cases, sites=3,
                         shape=shape)
    prep = tmp_path_factory.mktemp(f'{task}_prep')
    extra = ['--test-fraction', '0.3'] if task == 'brats2024' else []  # Ignored by training.
    assert data_cli.main(['prepare', '--task', task, '--data-dir', str(raw), '--out', str(prep),
                          *_flags(task), *extra]) == 0
    out[task] = raw, prep
  return out


def _cfg(task, root, **kw):
  spec = importlib.util.spec_from_file_location(task, REPO / 'experiments' / f'{task}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(None).data.to_dict()
  cfg.update(TINY[task][2], dir=str(root), num_workers=0)
  cfg.update(kw)
  return cfg


def _assert_same(a, b):
  assert a.client_names == b.client_names and a.task == b.task and a.spacing == b.spacing
  np.testing.assert_array_equal(a.sizes, b.sizes)
  np.testing.assert_array_equal(a.train_x, b.train_x)
  np.testing.assert_array_equal(a.train_y, b.train_y)
  for k in range(a.num_clients):
    np.testing.assert_array_equal(a.test_x[k], b.test_x[k])
    np.testing.assert_array_equal(a.test_y[k], b.test_y[k])
  drop = ('data_dir', 'data_format', 'sites')
  assert ({k: v for k, v in a.partition_summary.items() if k not in drop}
          == {k: v for k, v in b.partition_summary.items() if k not in drop})


@pytest.mark.parametrize('task,seed,kw', [
    ('kits23', 0, {}),
    ('kits23', 3, dict(partition='iid', num_clients=2)),
    ('brats2024', 0, {}),
    ('brats2024', 1, dict(max_cases=9, num_workers=2)),
    ('ham10000', 0, {}),
    ('ham10000', 2, dict(partition='dirichlet', num_clients=2, alpha=1.0,
                         one_image_per_lesion=False)),
])
def test_prepared_folder_gives_the_raw_federation(folders, task, seed, kw):
  raw, prep = folders[task]
  from_raw = federated.load(_cfg(task, raw, **kw), seed)
  from_prep = federated.load(_cfg(task, prep, **kw), seed)
  _assert_same(from_raw, from_prep)
  assert from_raw.partition_summary['data_format'] == 'raw'
  assert from_prep.partition_summary['data_format'] == 'prepared'


def test_any_level_of_the_prepared_folder_is_accepted(folders):
  raw, prep = folders['kits23']
  reference = federated.load(_cfg('kits23', raw), 0)
  for root in (prep / 'kits23_seg', prep / 'kits23_seg' / '1.1.0'):
    _assert_same(reference, federated.load(_cfg('kits23', root), 0))


def test_prepared_kits23_takes_the_site_csv_of_the_config(folders, tmp_path):
  raw, prep = folders['kits23']
  table = tmp_path / 'sites.csv'
  table.write_text('case,site_id\n' + ''.join(f'case_{i:05d},{"AB"[i % 2]}\n' for i in range(10)))
  cfg = dict(site_csv=str(table), num_clients=2)
  from_raw = federated.load(_cfg('kits23', raw, **cfg), 0)
  _assert_same(from_raw, federated.load(_cfg('kits23', prep, **cfg), 0))
  assert from_raw.client_names == ['A', 'B']  # Cases 10, 11 are not in the table: dropped.
  assert from_raw.partition_summary['dropped_unassigned'] == 2


def test_prepared_folder_reads_no_case_it_does_not_keep(folders, monkeypatch):
  raw, prep = folders['brats2024']
  read = []
  real = sources._prepared_3d

  def spy(*args, **kw):
    source = real(*args, **kw)

    def counting(indices, num_workers):
      read.extend(indices)
      return source.read(indices, num_workers)

    return sources.Source(source.cases, counting, source.spacing, source.meta)

  monkeypatch.setattr(sources, '_prepared_3d', spy)
  fd = federated.load(_cfg('brats2024', prep, max_cases=9), 1)
  assert len(read) == len(set(read)) == int(fd.sizes.sum()) + sum(len(t) for t in fd.test_x)


@pytest.mark.parametrize('task,key,value,message', [
    ('kits23', 'volume_shape', (4, 8, 16), r'config\.data\.volume_shape=\(4, 8, 16\) but .* '
     r'prepared with \(4, 8, 8\)'),
    ('kits23', 'target_spacing', (4.0, 2.0, 1.0), r'config\.data\.target_spacing=.*--target-spacing'),
    ('kits23', 'target_spacing', (), r'config\.data\.target_spacing=\(\) keeps each case'),
    ('brats2024', 'site_column', 'Manufacturer', r'config\.data\.site_column=.Manufacturer.'),
    ('ham10000', 'image_size', (16, 16), r'not 16x16/1\.1\.0: set config\.data\.image_size'),
])
def test_preprocessing_mismatch_names_the_key(folders, task, key, value, message):
  _, prep = folders[task]
  with pytest.raises(ValueError, match=message):
    federated.load(_cfg(task, prep, **{key: value}), 0)


def test_other_ct_normalisation_is_refused(folders, tmp_path):
  raw, _ = folders['kits23']
  path = tfds_3d.prepare('kits23_seg', raw, tmp_path / 'prep', hu_window=(-54.0, 258.0),
                         max_cases=6, shape=(4, 8, 8), target_spacing=(4.0, 2.0, 2.0))
  with pytest.raises(sources.SourceError, match=r'HU window \[-54\.0, 258\.0\]'):
    federated.load(_cfg('kits23', path), 0)


def test_prepared_site_csv_is_the_raw_default(folders):
  raw, prep = folders['kits23']
  assert (raw / kits23.SITE_CSV).is_file()  # The phantoms' anony_sites.csv, found by both.
  fd = federated.load(_cfg('kits23', prep), 0)
  assert fd.client_names == ['0', '1', '2']
