"""Tests for the NIfTI I/O, the KiTS23 reader, CT preprocessing and the CT phantom."""

import gzip
import pathlib
import struct

import nibabel as nib
import numpy as np
import pytest

from adpfl_jax.data import kits23
from adpfl_jax.data import nifti
from adpfl_jax.data import phantoms3d
from adpfl_jax.data import preprocess3d

TINY = (8, 16, 16)


def _header(path: pathlib.Path) -> dict:
  """Dependency-free NIfTI-1 header parse (docs/datasets.md §2.3 offsets)."""
  raw = gzip.open(path).read() if path.suffix == '.gz' else path.read_bytes()
  assert struct.unpack('<i', raw[0:4])[0] == 348
  dim = struct.unpack('<8h', raw[40:56])
  hdr = {
      'dim': dim,
      'datatype': struct.unpack('<h', raw[70:72])[0],
      'pixdim': struct.unpack('<8f', raw[76:108]),
      'vox_offset': struct.unpack('<f', raw[108:112])[0],
      'scl': struct.unpack('<2f', raw[112:120]),
      'qform_code': struct.unpack('<h', raw[252:254])[0],
      'sform_code': struct.unpack('<h', raw[254:256])[0],
      'srow': np.array(struct.unpack('<12f', raw[280:328])).reshape(3, 4),
      'magic': raw[344:348],
  }
  dtype = {2: np.uint8, 4: np.int16, 16: np.float32, 64: np.float64}[hdr['datatype']]
  n = int(np.prod(dim[1:dim[0] + 1]))
  off = int(hdr['vox_offset'])
  flat = np.frombuffer(raw[off:off + n * np.dtype(dtype).itemsize], dtype=dtype)
  hdr['data'] = flat.reshape(dim[1:dim[0] + 1], order='F')  # Fortran order on disk.
  return hdr


@pytest.fixture(scope='module')
def kits_dir(tmp_path_factory) -> tuple[pathlib.Path, dict]:
  root = tmp_path_factory.mktemp('kits')
  sites = phantoms3d.write_kits23_phantoms(root, cases=4, sites=3, seed=0, shape=TINY)
  return root, sites


# ------------------------------------------------------------------- NIfTI geometry


def test_written_kits_headers_match_the_release(kits_dir):
  root, _ = kits_dir
  seg = _header(root / 'dataset' / 'case_00000' / 'segmentation.nii.gz')
  img = _header(root / 'dataset' / 'case_00000' / 'imaging.nii.gz')
  assert seg['magic'] == b'n+1\x00' and seg['vox_offset'] == 352.0
  assert seg['datatype'] == 2 and img['datatype'] == 64  # uint8 labels, float64 image.
  assert seg['scl'] == (1.0, 0.0)
  assert seg['qform_code'] == 0 and seg['sform_code'] == 2
  assert seg['dim'][:4] == (3,) + TINY
  thick, px = seg['pixdim'][1], seg['pixdim'][2]
  assert seg['pixdim'][3] == px
  expected_srow = [[0, 0, -px, 0], [0, -px, 0, 0], [-thick, 0, 0, 0]]
  np.testing.assert_allclose(seg['srow'], expected_srow, rtol=1e-6)
  # The reader returns the on-disk (Fortran-ordered) array unchanged: (z, y, x).
  case = kits23.scan(root)[0]
  image, labels, spacing = kits23.load_case(case)
  np.testing.assert_array_equal(labels, seg['data'])
  np.testing.assert_allclose(image, img['data'].astype(np.float32))
  np.testing.assert_allclose(spacing, seg['pixdim'][1:4], rtol=1e-6)


def test_kits_affine_file_keeps_axis_order_and_spacing(tmp_path):
  # A file built with nibabel directly, with the §2.3 srow and distinct spacings.
  data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
  sz, sy, sx = 2.5, 0.7, 0.9
  aff = np.array([[0, 0, -sx, 0], [0, -sy, 0, 0], [-sz, 0, 0, 0], [0, 0, 0, 1.0]])
  img = nib.Nifti1Image(data, aff)
  img.set_qform(None, code=0)
  nib.save(img, str(tmp_path / 'x.nii.gz'))
  vol = nifti.load_nifti(tmp_path / 'x.nii.gz')
  np.testing.assert_array_equal(vol.array, data)
  np.testing.assert_allclose(vol.spacing, (sz, sy, sx), rtol=1e-6)
  assert vol.axcodes == ('I', 'P', 'L')
  assert vol.file_axes == (0, 1, 2)


def test_write_nifti_kits_layout_roundtrip_asymmetric(tmp_path):
  rng = np.random.default_rng(0)
  data = rng.normal(size=(3, 5, 4))
  data[0, 0, 0] = 99.0  # Marks the (z=0, y=0, x=0) corner.
  p = nifti.write_nifti(tmp_path / 'a.nii.gz', data, (4.0, 0.6, 0.8), dtype=np.float64)
  array, spacing = nifti.read_nifti(p)
  np.testing.assert_array_equal(array, data)
  np.testing.assert_allclose(spacing, (4.0, 0.6, 0.8), rtol=1e-6)
  assert np.unravel_index(np.argmax(array), array.shape) == (0, 0, 0)


# ---------------------------------------------------------------------------- reader


def test_scan_finds_cases_sites_and_metadata(kits_dir):
  root, sites = kits_dir
  cases = kits23.scan(root, site_csv=root / kits23.SITE_CSV)
  assert [c.case_id for c in cases] == ['case_00000', 'case_00001', 'case_00002', 'case_00003']
  assert {c.case_id: c.site for c in cases} == sites
  assert all(c.metadata.get('case_id') == c.case_id for c in cases)
  assert all(c.patient_id == c.case_id for c in cases)
  # Also works from the dataset/ folder itself; instances/ is ignored.
  assert (root / 'dataset' / 'case_00000' / 'instances').is_dir()
  assert [c.case_id for c in kits23.scan(root / 'dataset')] == [c.case_id for c in cases]


def test_load_case_labels_dtypes_and_no_cyst_case(kits_dir):
  root, sites = kits_dir
  found = {}
  for case in kits23.scan(root):
    image, labels, spacing = kits23.load_case(case)
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert image.shape == labels.shape == TINY and len(spacing) == 3
    found[case.case_id] = set(np.unique(labels).tolist())
  assert found['case_00000'] == {0, 1, 2, 3}
  assert found['case_00001'] == {0, 1, 2}  # A case without a cyst.
  # Cyst-free cases are not tied to one site: site 0 has case 0 (cyst) and case 3 (none).
  assert sites['case_00003'] == sites['case_00000'] and found['case_00003'] == {0, 1, 2}
  assert all(v <= {0, 1, 2, 3} for v in found.values())


def test_phantom_intensities_follow_the_doc(tmp_path):
  phantoms3d.write_kits23_phantoms(tmp_path, cases=1, sites=1, shape=(24, 48, 48))
  image, labels, _ = kits23.load_case(kits23.scan(tmp_path)[0])
  med = {k: float(np.median(image[labels == k])) for k in range(4)}
  assert 120 < med[1] < 260  # Kidney, arterial phase (cortex 150-250, medulla lower).
  assert 40 < med[2] < 140  # Tumour 60-120 HU (+ necrosis / noise).
  assert -30 < med[3] < 50  # Cyst 0-20 HU.
  assert image[0, 0, 0] < -900  # Air outside the body.
  # Spine is posterior (high row index) and bright.
  assert image[:, 30:, 20:28].max() > 350 and image[:, :15, 20:28].max() < 350


def test_site_ranges_phase_split(tmp_path):
  phantoms3d.write_kits23_phantoms(tmp_path, cases=[0, 499, 500], sites=1, shape=TINY)
  cases = kits23.scan(tmp_path, site_ranges=kits23.PHASE_SITE_RANGES)
  assert [c.site for c in cases] == ['arterial', 'arterial', 'nephrogenic']


def test_case_without_segmentation_is_skipped_with_a_visible_notice(tmp_path, capsys):
  phantoms3d.write_kits23_phantoms(tmp_path, cases=2, sites=1, shape=TINY)
  (tmp_path / 'dataset' / 'case_00001' / 'segmentation.nii.gz').unlink()
  capsys.readouterr()
  cases = kits23.scan(tmp_path)
  assert [c.case_id for c in cases] == ['case_00000']
  assert 'note: KiTS23: skipped 1 case(s)' in capsys.readouterr().out


# ---------------------------------------------------------------------------- errors


def test_empty_and_missing_data_dir(tmp_path):
  with pytest.raises(kits23.Kits23Error, match=str(tmp_path)):
    kits23.scan(tmp_path)
  with pytest.raises(FileNotFoundError, match='nope'):
    kits23.scan(tmp_path / 'nope')


def test_truncated_and_corrupt_gzip_name_the_file(tmp_path):
  phantoms3d.write_kits23_phantoms(tmp_path, cases=2, sites=1, shape=TINY)
  cases = kits23.scan(tmp_path)
  path = cases[0].image_path
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(nifti.NiftiError, match='case_00000/imaging.nii.gz'):
    kits23.load_case(cases[0])
  cases[1].label_path.write_bytes(b'\x1f\x8b' + bytes(range(200)))
  with pytest.raises(nifti.NiftiError, match='case_00001/segmentation.nii.gz'):
    kits23.load_case(cases[1])


def test_shape_mismatch_names_the_case(tmp_path):
  phantoms3d.write_kits23_phantoms(tmp_path, cases=1, sites=1, shape=TINY)
  case = kits23.scan(tmp_path)[0]
  nifti.write_nifti(case.label_path, np.zeros((8, 16, 15), np.uint8), (5.0, 0.78, 0.78))
  with pytest.raises(kits23.Kits23Error, match=r'case_00000.*shape'):
    kits23.load_case(case)


def test_labels_outside_label_map_name_the_case(tmp_path):
  phantoms3d.write_kits23_phantoms(tmp_path, cases=1, sites=1, shape=TINY)
  case = kits23.scan(tmp_path)[0]
  _, spacing = nifti.read_nifti(case.label_path)
  bad = np.zeros(TINY, np.uint8)
  bad[1, 2, 3] = 5
  nifti.write_nifti(case.label_path, bad, spacing)
  with pytest.raises(kits23.Kits23Error, match=r'case_00000.*\[5\]'):
    kits23.load_case(case)


def test_nan_intensities_name_the_file(tmp_path):
  phantoms3d.write_kits23_phantoms(tmp_path, cases=1, sites=1, shape=TINY)
  case = kits23.scan(tmp_path)[0]
  image, spacing = nifti.read_nifti(case.image_path)
  image = image.astype(np.float64)
  image[2, 3, 4] = np.nan
  nifti.write_nifti(case.image_path, image, spacing)
  with pytest.raises(nifti.NiftiError, match=r'imaging.nii.gz.*NaN'):
    kits23.load_case(case)


def test_non_3d_data_names_the_file(tmp_path):
  p = tmp_path / 'four_d.nii.gz'
  nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)), str(p))
  with pytest.raises(nifti.NiftiError, match=r'four_d.nii.gz.*3D'):
    nifti.read_nifti(p)
  # A trailing singleton dimension is accepted.
  nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.float32), np.eye(4)), str(p))
  assert nifti.read_nifti(p)[0].shape == (6, 5, 4)


def test_bad_site_csv_names_the_file(tmp_path):
  p = tmp_path / 'sites.csv'
  p.write_text('case,site\ncase_00000,1\n')
  with pytest.raises(kits23.Kits23Error, match='sites.csv'):
    kits23.read_site_csv(p)
  p.write_text('case,site_id\ncase_00000,1\n7,2\n')
  assert kits23.read_site_csv(p) == {0: '1', 7: '2'}


# ----------------------------------------------------------------- CT preprocessing


def test_normalize_ct_uses_doc_constants():
  hu = np.array([-1000.0, -79.0, 100.93, 304.0, 2000.0])
  out = preprocess3d.normalize_ct(hu)
  lo, hi = (-79 - 100.93) / 76.9, (304 - 100.93) / 76.9
  np.testing.assert_allclose(out, [lo, lo, 0.0, hi, hi], atol=1e-5)
  assert out.dtype == np.float32


def test_resample_linear_ramp_and_labels():
  z = np.arange(8, dtype=np.float32)
  image = np.broadcast_to(z[:, None, None], (8, 16, 16)).copy()
  labels = (image > 3).astype(np.uint8) * 2
  img_r, lbl_r, spacing = preprocess3d.resample_case(image, labels, (5.0, 0.8, 0.8),
                                                     (2.5, 1.6, 1.6))
  assert img_r.shape == lbl_r.shape == (16, 8, 8)
  np.testing.assert_allclose(spacing, (2.5, 1.6, 1.6))
  # zoom maps corners to corners: output slice i samples input z = i * 7 / 15.
  np.testing.assert_allclose(img_r[:, 0, 0], np.arange(16) * 7 / 15, atol=1e-4)
  assert set(np.unique(lbl_r).tolist()) == {0, 2}


def test_crop_or_pad_matches_pad_then_slice():
  rng = np.random.default_rng(1)
  vol = rng.normal(size=(5, 6, 7)).astype(np.float32)
  for center in [(0, 0, 0), (4, 5, 6), (2, 3, 3), (-3, 8, 1)]:
    shape = (3, 4, 5)
    out = preprocess3d.crop_or_pad(vol, shape, center, pad_value=-9.0)
    pad = 20
    big = np.pad(vol, pad, constant_values=-9.0)
    starts = [int(np.floor(c - (s - 1) / 2 + 1e-6)) + pad for c, s in zip(center, shape)]
    ref = big[tuple(slice(st, st + s) for st, s in zip(starts, shape))]
    np.testing.assert_array_equal(out, ref)


def test_sample_patch_foreground_bias_and_reproducibility():
  labels = np.zeros((10, 12, 12), np.uint8)
  labels[2:6, 2:6, 2:6] = 1  # Large class.
  labels[8, 9, 10] = 2  # One-voxel class.
  image = labels.astype(np.float32)[..., None]
  rng = np.random.default_rng(0)
  centers = []
  for _ in range(200):
    img_p, lbl_p = preprocess3d.sample_patch(image, labels, (3, 5, 5), rng, foreground_prob=1.0)
    assert img_p.shape == (3, 5, 5, 1) and lbl_p.shape == (3, 5, 5)
    centers.append(int(lbl_p[1, 2, 2]))
  assert 0 not in centers
  assert 0.35 < centers.count(2) / len(centers) < 0.65  # Classes drawn uniformly.
  a = preprocess3d.sample_patch(image, labels, (3, 5, 5), np.random.default_rng(7))
  b = preprocess3d.sample_patch(image, labels, (3, 5, 5), np.random.default_rng(7))
  np.testing.assert_array_equal(a[1], b[1])


def test_preprocess_ct_case_centres_the_kidneys(tmp_path):
  phantoms3d.write_kits23_phantoms(tmp_path, cases=1, sites=1, shape=(16, 32, 32))
  image, labels, spacing = kits23.load_case(kits23.scan(tmp_path)[0])
  pre = preprocess3d.preprocess_ct_case(image, labels, spacing, target_spacing=(5.0, 1.5, 1.5),
                                        shape=(20, 24, 24))
  assert pre.image.shape == (20, 24, 24, 1) and pre.labels.shape == (20, 24, 24)
  assert set(np.unique(pre.labels).tolist()) <= {0, 1, 2, 3} and (pre.labels > 0).any()
  box = preprocess3d.bounding_box(pre.labels > 0)
  for b, n in zip(box, (20, 24, 24)):
    assert abs((b.start + b.stop - 1) / 2 - (n - 1) / 2) <= 1.0
  lo, hi = (-79 - 100.93) / 76.9, (304 - 100.93) / 76.9
  assert pre.image.min() >= lo - 1e-5 and pre.image.max() <= hi + 1e-5
