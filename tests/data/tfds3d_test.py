"""Tests for the streaming, atomic TFDS builders `kits23_seg` and `brats2024_seg`."""

import pathlib

import numpy as np
import pytest

from adpfl_jax.data import brats
from adpfl_jax.data import kits23
from adpfl_jax.data import nifti
from adpfl_jax.data import phantoms3d
from adpfl_jax.data import tfds_3d

TINY = (8, 16, 16)
KITS_CFG = dict(shape=(6, 12, 12), target_spacing=(1.0, 0.8, 0.8), cases_per_shard=2)
BRATS_CFG = dict(shape=(6, 8, 8), target_spacing=(1.5, 2.0, 2.0), cases_per_shard=3)


def _decoded(value):
  return value.decode() if isinstance(value, bytes) else value


def _listing(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob('*'))


@pytest.fixture(scope='module')
def kits_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp('kits_raw')
  sites = phantoms3d.write_kits23_phantoms(root, cases=5, sites=3, seed=0, shape=TINY)
  return root, sites


def test_kits23_seg_builds_and_reads_back(kits_raw, tmp_path):
  raw, sites = kits_raw
  site_csv = str(raw / kits23.SITE_CSV)
  path = tfds_3d.prepare('kits23_seg', raw, tmp_path / 'out', site_csv=site_csv, **KITS_CFG)
  assert path == tmp_path / 'out' / 'kits23_seg' / '1.1.0'
  assert tfds_3d.find('kits23_seg', tmp_path / 'out') == path
  assert tfds_3d.find('kits23_seg', tmp_path / 'out' / 'kits23_seg') == path
  assert tfds_3d.find('kits23_seg', path) == path
  assert tfds_3d.find('brats2024_seg', tmp_path / 'out') is None
  assert _listing(tmp_path / 'out')[0] == 'kits23_seg'  # No leftover temporary folder.
  assert len(list(path.glob('kits23_seg-train.array_record-*'))) == 3  # 5 cases, 2 per shard.
  ds = tfds_3d.load(path)
  assert set(ds) == {'train'} and len(ds['train']) == 5
  got_sites = {}
  index = tfds_3d.records(path)  # metadata.json lists the examples in their stored order.
  assert [(split, i) for split, i, _ in index] == [('train', i) for i in range(5)]
  for i in range(5):
    ex = ds['train'][i]
    cid = _decoded(ex['case_id'])
    assert index[i][2] == {'case_id': cid, 'patient_id': cid, 'site': _decoded(ex['site'])}
    got_sites[cid] = _decoded(ex['site'])
    assert ex['image'].shape == (6, 12, 12, 1) and ex['image'].dtype == np.float32
    assert ex['label'].shape == (6, 12, 12) and ex['label'].dtype == np.uint8
    assert set(np.unique(ex['label']).tolist()) <= {0, 1, 2, 3} and ex['label'].any()
    # Same values as preprocessing the case directly (serialisation is lossless).
    case = next(c for c in kits23.scan(raw, site_csv=site_csv) if c.case_id == cid)
    direct = tfds_3d.kits23_example(case, tfds_3d.make_config('kits23_seg', **KITS_CFG))
    np.testing.assert_array_equal(ex['image'], direct['image'])
    np.testing.assert_array_equal(ex['label'], direct['label'])
    np.testing.assert_array_equal(ex['original_shape'], TINY)
  assert got_sites == sites
  assert tfds_3d.prepared_config(path)['shape'] == [6, 12, 12]


def test_brats2024_seg_patient_grouped_splits(tmp_path):
  raw = tmp_path / 'raw'
  sites = phantoms3d.write_brats2024_phantoms(raw, cases=7, sites=3, shape=TINY)
  path = tfds_3d.prepare('brats2024_seg', raw, tmp_path / 'out', test_fraction=0.4,
                         split_seed=1, **BRATS_CFG)
  ds = tfds_3d.load(path)
  assert set(ds) == {'train', 'test'}
  patients = {}
  index = {(split, i): rec for split, i, rec in tfds_3d.records(path)}
  for split, source in ds.items():
    for i in range(len(source)):
      ex = source[i]
      cid, pid = _decoded(ex['case_id']), _decoded(ex['patient_id'])
      assert index[split, i] == {'case_id': cid, 'patient_id': pid, 'site': sites[cid],
                                 'timepoint': cid[-3:], 'release': _decoded(ex['release'])}
      assert pid == cid[:-4] and _decoded(ex['site']) == sites[cid]
      assert ex['image'].shape == (6, 8, 8, 4) and ex['label'].shape == (6, 8, 8)
      assert set(np.unique(ex['label']).tolist()) <= {0, 1, 2, 3, 4}
      patients.setdefault(pid, set()).add(split)
  assert all(len(s) == 1 for s in patients.values())  # Time points stay together.
  assert len(ds['train']) + len(ds['test']) == len(brats.scan(raw)) == 7  # No validation case.


def test_failing_build_leaves_no_output(tmp_path):
  raw = tmp_path / 'raw'
  phantoms3d.write_kits23_phantoms(raw, cases=5, sites=2, shape=TINY)
  bad = raw / 'dataset' / 'case_00003' / 'imaging.nii.gz'
  data = bad.read_bytes()
  bad.write_bytes(data[: len(data) // 2])  # Truncated gzip in a later shard.
  out = tmp_path / 'out'
  with pytest.raises(nifti.NiftiError, match='case_00003/imaging.nii.gz'):
    tfds_3d.prepare('kits23_seg', raw, out, **KITS_CFG)
  assert not out.exists()
  # An existing output folder keeps only what was there before.
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  seg = raw / 'dataset' / 'case_00001' / 'segmentation.nii.gz'
  bad.write_bytes(data)
  labels, spacing = nifti.read_nifti(seg)
  labels[0, 0, 0] = 9
  nifti.write_nifti(seg, labels, spacing)
  with pytest.raises(kits23.Kits23Error, match=r'case_00001.*\[9\]'):
    tfds_3d.prepare('kits23_seg', raw, out, **KITS_CFG)
  assert _listing(out) == ['keep.txt']


def test_empty_data_dir_fails_without_output(tmp_path):
  (tmp_path / 'raw').mkdir()
  with pytest.raises(kits23.Kits23Error, match='raw'):
    tfds_3d.prepare('kits23_seg', tmp_path / 'raw', tmp_path / 'out', **KITS_CFG)
  assert not (tmp_path / 'out').exists()
  with pytest.raises(brats.BratsError, match='raw'):
    tfds_3d.prepare('brats2024_seg', tmp_path / 'raw', tmp_path / 'out', **BRATS_CFG)
  assert not (tmp_path / 'out').exists()


def test_reuse_conflict_and_overwrite(kits_raw, tmp_path):
  raw, _ = kits_raw
  out = tmp_path / 'out'
  cfg = dict(KITS_CFG, max_cases=2)
  path = tfds_3d.prepare('kits23_seg', raw, out, **cfg)
  stamp = (path / 'dataset_info.json').stat().st_mtime_ns
  assert tfds_3d.prepare('kits23_seg', raw, out, **cfg) == path  # Reused as is.
  assert (path / 'dataset_info.json').stat().st_mtime_ns == stamp
  with pytest.raises(FileExistsError, match='different config'):
    tfds_3d.prepare('kits23_seg', raw, out, **dict(cfg, max_cases=3))
  path = tfds_3d.prepare('kits23_seg', raw, out, overwrite=True, **dict(cfg, max_cases=3))
  assert len(tfds_3d.load(path)['train']) == 3
  assert _listing(out)[0] == 'kits23_seg'


def test_bad_options_are_named(kits_raw, tmp_path):
  raw, _ = kits_raw
  with pytest.raises(TypeError, match='shapee'):
    tfds_3d.prepare('kits23_seg', raw, tmp_path / 'out', shapee=(4, 4, 4))
  with pytest.raises(ValueError, match='kits19_seg'):
    tfds_3d.prepare('kits19_seg', raw, tmp_path / 'out')
  with pytest.raises(ValueError, match='test_fraction'):
    tfds_3d.prepare('kits23_seg', raw, tmp_path / 'out', **dict(KITS_CFG, test_fraction=1.5))
  with pytest.raises(TypeError, match=r"needs option\(s\) \['target_spacing'\]"):
    tfds_3d.prepare('kits23_seg', raw, tmp_path / 'out', shape=(4, 4, 4))
  assert not (tmp_path / 'out').exists()


def test_default_sites_follow_the_pipeline_rule(kits_raw, tmp_path):
  """Without site options, KiTS23 sites come from <data_dir>/anony_sites.csv, else the phase."""
  raw, sites = kits_raw
  path = tfds_3d.prepare('kits23_seg', raw, tmp_path / 'csv', **KITS_CFG)
  assert {r['case_id']: r['site'] for _, _, r in tfds_3d.records(path)} == sites
  no_csv = tmp_path / 'raw'
  phantoms3d.write_kits23_phantoms(no_csv, cases=[0, 500], sites=1, shape=TINY)
  (no_csv / kits23.SITE_CSV).unlink()
  path = tfds_3d.prepare('kits23_seg', no_csv, tmp_path / 'phase', **KITS_CFG)
  assert [r['site'] for _, _, r in tfds_3d.records(path)] == ['arterial', 'nephrogenic']


def test_find_rejects_another_version(kits_raw, tmp_path):
  raw, _ = kits_raw
  path = tfds_3d.prepare('kits23_seg', raw, tmp_path / 'out', **dict(KITS_CFG, max_cases=1))
  old = path.parent / '1.0.0'
  path.rename(old)
  with pytest.raises(ValueError, match=r"version\(s\) \['1.0.0'\], not 1.1.0.*prepare"):
    tfds_3d.find('kits23_seg', tmp_path / 'out')
  with pytest.raises(ValueError, match=r'version 1.0.0, not 1.1.0'):
    tfds_3d.find('kits23_seg', old)
