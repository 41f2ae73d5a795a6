"""Tests for the BraTS 2024 / 2021 readers, MRI preprocessing and the MRI phantom."""

import pathlib

import nibabel as nib
import numpy as np
import pytest

from adpfl_jax.data import brats
from adpfl_jax.data import nifti
from adpfl_jax.data import phantoms3d
from adpfl_jax.data import preprocess3d
from adpfl_jax.data import tfds_3d

TINY = (8, 16, 16)


@pytest.fixture(scope='module')
def brats_dir(tmp_path_factory) -> tuple[pathlib.Path, dict]:
  root = tmp_path_factory.mktemp('brats')
  sites = phantoms3d.write_brats2024_phantoms(root, cases=7, sites=3, seed=0, shape=TINY,
                                              validation_cases=1)
  return root, sites


def _fresh(tmp_path: pathlib.Path, cases: int = 2) -> list[brats.BratsCase]:
  phantoms3d.write_brats2024_phantoms(tmp_path, cases=cases, sites=1, shape=TINY,
                                      validation_cases=0)
  return brats.scan(tmp_path)


# ------------------------------------------------------------------- NIfTI geometry


def test_ras_file_is_read_as_zyx_with_matching_spacing(tmp_path):
  # BraTS-style file built with nibabel directly: array (x, y, z), diagonal affine.
  data_xyz = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  sx, sy, sz = 1.2, 0.9, 2.0
  nib.save(nib.Nifti1Image(data_xyz, np.diag([-sx, -sy, sz, 1.0])), str(tmp_path / 'r.nii.gz'))
  vol = nifti.load_nifti(tmp_path / 'r.nii.gz')
  np.testing.assert_array_equal(vol.array, data_xyz.transpose(2, 1, 0))
  np.testing.assert_allclose(vol.spacing, (sz, sy, sx), rtol=1e-6)
  assert vol.axcodes == ('S', 'P', 'L')
  np.testing.assert_array_equal(vol.to_file_order(vol.array), data_xyz)


def test_write_nifti_ras_layout_roundtrip(tmp_path):
  data = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)
  p = nifti.write_nifti(tmp_path / 'a.nii.gz', data, (2.0, 1.0, 0.5), layout='ras')
  img = nib.load(str(p))
  assert img.shape == (4, 5, 3)  # Stored (x, y, z).
  assert int(img.header['qform_code']) == 1 and int(img.header['sform_code']) == 1
  array, spacing = nifti.read_nifti(p)
  np.testing.assert_array_equal(array, data)
  np.testing.assert_allclose(spacing, (2.0, 1.0, 0.5))


# ---------------------------------------------------------------------------- reader


def test_scan_2024_releases_patients_sites(brats_dir, capsys):
  root, sites = brats_dir
  capsys.readouterr()
  cases = brats.scan(root)
  assert len(cases) == 7
  (skipped,) = set(sites) - {c.case_id for c in cases}  # The validation case, no -seg.
  assert skipped in capsys.readouterr().out and (root / 'validation_data' / skipped).is_dir()
  assert {c.release for c in cases} == {'training_data1_v2', 'training_data_additional'}
  for c in cases:
    assert c.patient_id == c.case_id[:-4]
    assert c.site == sites[c.case_id]
    assert c.metadata['Train/Test/Validation'] in ('Train', 'Train-additional')
    assert [p.name for p in c.image_paths] == [f'{c.case_id}-{m}.nii.gz'
                                               for m in ('t1n', 't1c', 't2w', 't2f')]
  per_patient = {}
  for c in cases:
    per_patient.setdefault(c.patient_id, []).append(c.timepoint)
  assert max(len(v) for v in per_patient.values()) >= 2  # Several time points per patient.
  for tps in per_patient.values():  # Post-treatment time points 100, 101, ...
    assert sorted(tps) == [str(100 + i) for i in range(len(tps))]
  # The raw sheet keeps the trailing-space column names.
  header = (root / (brats.METADATA_STEM + '.csv')).read_text().splitlines()[0]
  assert 'Train/Test/Validation ,' in header and header.endswith('Glioma type ')
  only = brats.scan(root, releases=('training_data_additional',))
  assert {c.release for c in only} == {'training_data_additional'}


def test_unlabelled_cases_when_labels_not_required(brats_dir):
  root, _ = brats_dir
  cases = brats.scan(root, require_labels=False)
  val = [c for c in cases if c.release == 'validation_data']
  assert len(val) == 1 and val[0].label_path is None
  image, labels, _ = brats.load_case(val[0])
  assert labels is None and image.shape == TINY + (4,)


def test_load_case_contrasts_follow_the_doc(tmp_path):
  phantoms3d.write_brats2024_phantoms(tmp_path, cases=1, sites=1, shape=(32, 40, 32),
                                      validation_cases=0)
  image, labels, spacing = brats.load_case(brats.scan(tmp_path)[0])
  assert image.dtype == np.float32 and labels.dtype == np.uint8
  assert image.shape == (32, 40, 32, 4) and spacing == (1.0, 1.0, 1.0)
  assert set(np.unique(labels).tolist()) == {0, 1, 2, 3, 4}
  brain = np.any(image != 0, axis=-1)
  assert np.all(image[~brain] == 0) and np.all(image[brain] > 0)  # Background exactly 0.
  normal = brain & (labels == 0)
  m = {k: image[labels == k].mean(axis=0) for k in (1, 2, 3, 4)}
  m[0] = image[normal].mean(axis=0)
  t1n, t1c, t2w, t2f = range(4)
  assert m[3][t1c] > 1.5 * m[0][t1c]  # ET bright on T1c.
  assert m[1][t1c] < 0.6 * m[0][t1c]  # NETC dark on T1c.
  assert m[2][t2w] > 1.4 * m[0][t2w] and m[2][t2f] > 1.4 * m[0][t2f]  # SNFH bright T2/FLAIR.
  assert m[4][t1n] < 0.5 * m[0][t1n] and m[4][t2w] > 1.5 * m[0][t2w]  # RC CSF-like.
  # SNFH surrounds the core: every ET/NETC voxel's 6-neighbours are tumour, not background.
  core = (labels == 1) | (labels == 3)
  grown = np.zeros_like(core)
  grown[1:] |= core[:-1]
  grown[:-1] |= core[1:]
  assert not np.any(grown & (labels == 0) & brain & ~core)


def test_brats2021_naming_labels_and_partitions(tmp_path):
  sites = phantoms3d.write_brats2021_phantoms(tmp_path, cases=3, sites=2, shape=TINY)
  cases = brats.scan(tmp_path, partition_csv=tmp_path / phantoms3d.FETS_PARTITION_CSV)
  assert [c.case_id for c in cases] == ['BraTS2021_00000', 'BraTS2021_00001', 'BraTS2021_00002']
  assert {c.case_id: c.site for c in cases} == sites
  for c in cases:
    assert c.naming == 'brats2021' and c.patient_id == c.case_id
    raw = np.asarray(nib.load(str(c.label_path)).dataobj).transpose(2, 1, 0)
    assert set(np.unique(raw).tolist()) <= {0, 1, 2, 4} and 4 in raw
    _, labels, _ = brats.load_case(c)
    # 2021 -> 2024: NCR/NET 1 -> NETC 1, ED 2 -> SNFH 2, ET 4 -> ET 3.
    expected = np.select([raw == 1, raw == 2, raw == 4], [1, 2, 3], 0)
    np.testing.assert_array_equal(labels, expected)


def test_patient_grouped_split_keeps_time_points_together(brats_dir):
  root, _ = brats_dir
  cases = brats.scan(root)
  for seed in range(5):
    split = tfds_3d.split_cases(cases, 0.4, seed)
    train = {c.patient_id for c in split['train']}
    test = {c.patient_id for c in split['test']}
    assert train and test and not train & test
    assert len(split['train']) + len(split['test']) == len(cases)


# ---------------------------------------------------------------------------- errors


def test_missing_modality_names_case_and_modality(tmp_path):
  cases = _fresh(tmp_path)
  cases[0].image_paths[3].unlink()
  with pytest.raises(brats.BratsError, match=r"BraTS-GLI-00002-100.*'t2f'"):
    brats.scan(tmp_path)


def test_modality_shape_mismatch_names_the_case(tmp_path):
  case = _fresh(tmp_path)[1]
  nifti.write_nifti(case.image_paths[1], np.ones((8, 16, 14), np.float32), (1, 1, 1),
                    layout='ras')
  with pytest.raises(brats.BratsError, match=r"BraTS-GLI-00002-101.*'t1c'.*shape"):
    brats.load_case(case)


def test_segmentation_shape_mismatch_names_the_case(tmp_path):
  case = _fresh(tmp_path)[0]
  nifti.write_nifti(case.label_path, np.zeros((7, 16, 16), np.uint8), (1, 1, 1), layout='ras')
  with pytest.raises(brats.BratsError, match=r'BraTS-GLI-00002-100.*segmentation shape'):
    brats.load_case(case)


def test_labels_outside_label_map_name_the_case(tmp_path):
  case = _fresh(tmp_path)[0]
  bad = np.zeros(TINY, np.uint8)
  bad[0, 0, 0] = 7
  nifti.write_nifti(case.label_path, bad, (1, 1, 1), layout='ras')
  with pytest.raises(brats.BratsError, match=r'BraTS-GLI-00002-100.*\[7\]'):
    brats.load_case(case)
  # Label 3 is valid in 2024 but not in the 2021 label map.
  phantoms3d.write_brats2021_phantoms(tmp_path / 'b21', cases=1, sites=1, shape=TINY)
  c21 = brats.scan(tmp_path / 'b21')[0]
  nifti.write_nifti(c21.label_path, np.full(TINY, 3, np.uint8), (1, 1, 1), layout='ras')
  with pytest.raises(brats.BratsError, match=r'BraTS2021_00000.*\[3\]'):
    brats.load_case(c21)


def test_truncated_modality_and_nan_name_the_file(tmp_path):
  cases = _fresh(tmp_path)
  path = cases[0].image_paths[2]
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) - 40])
  with pytest.raises(nifti.NiftiError, match='BraTS-GLI-00002-100-t2w.nii.gz'):
    brats.load_case(cases[0])
  arr, sp = nifti.read_nifti(cases[1].image_paths[0])
  arr[3, 3, 3] = np.nan
  nifti.write_nifti(cases[1].image_paths[0], arr, sp, layout='ras')
  with pytest.raises(nifti.NiftiError, match=r'BraTS-GLI-00002-101-t1n.nii.gz.*NaN'):
    brats.load_case(cases[1])


def test_empty_data_dir_names_the_dir(tmp_path):
  (tmp_path / 'training_data1_v2').mkdir()
  with pytest.raises(brats.BratsError, match=str(tmp_path)):
    brats.scan(tmp_path)


def test_xlsx_metadata_without_openpyxl_is_a_clear_error(tmp_path):
  try:
    import openpyxl  # noqa: F401
    pytest.skip('openpyxl installed')
  except ImportError:
    pass
  p = tmp_path / (brats.METADATA_STEM + '.xlsx')
  p.write_bytes(b'PK')
  with pytest.raises(brats.BratsError, match=r'metadata.xlsx.*openpyxl'):
    brats.read_metadata(p)


# ---------------------------------------------------------------- MRI preprocessing


def test_zscore_in_mask_matches_brute_force():
  rng = np.random.default_rng(0)
  image = np.zeros((6, 7, 8, 2), np.float32)
  image[1:5, 2:6, 1:7] = rng.uniform(1, 10, size=(4, 4, 6, 2))
  out = preprocess3d.zscore_in_mask(image)
  mask = np.any(image != 0, axis=-1)
  for c in range(2):
    vals = image[..., c][mask].astype(np.float64)
    np.testing.assert_allclose(out[..., c][mask], (vals - vals.mean()) / vals.std(), atol=1e-5)
    assert np.all(out[..., c][~mask] == 0)


def test_crop_to_brain_and_stack(tmp_path):
  chans = [np.zeros((6, 7, 8), np.float32) for _ in range(4)]
  chans[2][1, 2, 3] = 1.0
  chans[0][4, 5, 6] = 2.0
  image = preprocess3d.stack_modalities(chans)
  assert image.shape == (6, 7, 8, 4)
  cropped, _, box = preprocess3d.crop_to_brain(image)
  assert box == (slice(1, 5), slice(2, 6), slice(3, 7))
  assert cropped.shape == (4, 4, 4, 4)


def test_preprocess_mri_case_shape_and_background(tmp_path):
  phantoms3d.write_brats2024_phantoms(tmp_path, cases=1, sites=1, shape=(16, 24, 20),
                                      validation_cases=0)
  image, labels, spacing = brats.load_case(brats.scan(tmp_path)[0])
  pre = preprocess3d.preprocess_mri_case(image, labels, spacing, target_spacing=(2.0, 2.0, 2.0),
                                         shape=(10, 12, 12))
  assert pre.image.shape == (10, 12, 12, 4) and pre.labels.shape == (10, 12, 12)
  assert set(np.unique(pre.labels).tolist()) <= {0, 1, 2, 3, 4}
  inside = np.any(pre.image != 0, axis=-1)
  for c in range(4):  # z-scored within the brain.
    assert abs(float(pre.image[..., c][inside].mean())) < 0.2
  assert np.all(pre.labels[~inside] == 0)
