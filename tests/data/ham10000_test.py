"""Tests for adpfl_jax.data.ham10000, phantoms_ham10000 and tfds_ham10000.

Every fixture is written to tmp_path in the real release layout (docs/datasets.md §1.1,
§1.5, §6.1); some are written by hand here, others by `phantoms_ham10000.write_phantoms`.
The federation built from these folders is tested in federated_test.py.
"""

import pathlib

import numpy as np
from PIL import Image
import pytest

from adpfl_jax.data import ham10000
from adpfl_jax.data import phantoms_ham10000
from adpfl_jax.data import tfds_ham10000

# Hand-written fixture: (lesion_id, image_id, dx, dx_type, age, sex, localization, dataset).
_ROWS = [
    ('HAM_0000118', 'ISIC_0027419', 'bkl', 'histo', '80.0', 'male', 'scalp', 'vidir_modern'),
    ('HAM_0000118', 'ISIC_0025030', 'bkl', 'histo', '80.0', 'male', 'scalp', 'vidir_modern'),
    ('HAM_0002730', 'ISIC_0026769', 'nv', 'follow_up', '', 'unknown', 'back', 'rosendahl'),
    ('HAM_0001466', 'ISIC_0031633', 'mel', 'histo', '75.0', 'female', 'ear', 'rosendahl'),
]
_HW = (45, 60)  # the real (450, 600) shrunk ten times
_HEADER = 'lesion_id,image_id,dx,dx_type,age,sex,localization,dataset'


def _box(i):
  """Known lesion box (top, left, bottom, right) of the i-th hand-made image."""
  return (5 + i, 10 + 2 * i, 30 + i, 40 + i)


def _write_handmade(root: pathlib.Path, nested: bool = False) -> pathlib.Path:
  """Writes _ROWS as a HAM10000 folder: solid images with a dark box, box masks."""
  mask_dir = root / ham10000.MASK_DIR_NAME
  if nested:
    mask_dir = mask_dir / ham10000.MASK_DIR_NAME
  mask_dir.mkdir(parents=True)
  for i, row in enumerate(_ROWS):
    image_id = row[1]
    part = 1 if int(image_id[5:]) < 29306 else 2
    folder = root / f'HAM10000_images_part_{part}'
    folder.mkdir(exist_ok=True)
    img = np.full(_HW + (3,), (220, 180, 150), np.uint8)
    mask = np.zeros(_HW, np.uint8)
    t, l, b, r = _box(i)
    img[t:b, l:r] = (90, 50, 30)
    mask[t:b, l:r] = 255
    Image.fromarray(img).save(folder / f'{image_id}.jpg', quality=95)
    Image.fromarray(mask).save(mask_dir / f'{image_id}_segmentation.png')
  lines = [_HEADER] + [','.join(r) for r in _ROWS]
  (root / 'HAM10000_metadata.csv').write_text('\n'.join(lines) + '\n')
  return root


def test_scan_handmade_fields_and_pixels(tmp_path):
  root = _write_handmade(tmp_path / 'ham')
  records = ham10000.scan(root)
  assert [r.image_id for r in records] == sorted(r[1] for r in _ROWS)
  by_id = {r.image_id: r for r in records}
  r = by_id['ISIC_0026769']
  assert r.lesion_id == 'HAM_0002730' and r.site == 'rosendahl' and r.dx == 'nv'
  assert r.age is None and r.sex == 'unknown' and r.localization == 'back'
  assert by_id['ISIC_0027419'].age == 80.0
  assert by_id['ISIC_0031633'].image_path.parent.name == 'HAM10000_images_part_2'
  assert by_id['ISIC_0025030'].image_path.parent.name == 'HAM10000_images_part_1'
  for i, row in enumerate(_ROWS):
    x, y = ham10000.load_example(by_id[row[1]], None)
    assert x.shape == _HW + (3,) and x.dtype == np.float32
    assert y.shape == _HW and y.dtype == np.uint8
    expected = np.zeros(_HW, np.uint8)
    t, l, b, r_ = _box(i)
    expected[t:b, l:r_] = 1
    np.testing.assert_array_equal(y, expected)
    # Background pixel ~ (220, 180, 150) / 255 up to JPEG error.
    np.testing.assert_allclose(x[-1, -1], np.array([220, 180, 150]) / 255, atol=0.03)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_resize_bilinear_image_nearest_mask(tmp_path):
  root = _write_handmade(tmp_path / 'ham')
  rec = ham10000.scan(root)[0]
  x, y = ham10000.load_example(rec, (90, 120))  # exact 2x upsampling
  assert x.shape == (90, 120, 3) and y.shape == (90, 120)
  assert set(np.unique(y).tolist()) <= {0, 1}
  _, native = ham10000.load_example(rec, None)
  # Nearest-neighbour 2x upsampling is a pixel repeat of the native mask.
  np.testing.assert_array_equal(y, native.repeat(2, axis=0).repeat(2, axis=1))
  x_sq, _ = ham10000.load_example(rec, 32)
  assert x_sq.shape == (32, 32, 3)


def test_nested_mask_folder(tmp_path):
  root = _write_handmade(tmp_path / 'ham', nested=True)
  records = ham10000.scan(root)
  assert len(records) == len(_ROWS)
  assert all(r.mask_path.parent.parent.name == ham10000.MASK_DIR_NAME for r in records)


@pytest.mark.parametrize('ext', ['.csv', '.tab', ''])
def test_metadata_extensions_and_nesting(tmp_path, ext):
  root = phantoms_ham10000.write_phantoms(tmp_path / 'ph', cases=7, sites=2, seed=1,
                                          image_size=(24, 32), metadata_ext=ext,
                                          nested_masks=(ext == '.tab'))
  meta = root / f'HAM10000_metadata{ext}'
  assert meta.is_file()
  header = meta.read_text().splitlines()[0]
  assert header.split('\t' if ext == '.tab' else ',') == list(ham10000.METADATA_COLUMNS)
  records = ham10000.scan(root)
  assert len(records) == 7
  assert {r.site for r in records} == {'vidir_molemax', 'vidir_modern'}
  assert any(r.age is None for r in records)
  assert any(r.sex == 'unknown' for r in records)
  assert all(r.lesion_id.startswith('HAM_') and r.dx in phantoms_ham10000.DX_NAMES for r in records)
  lesions, counts = np.unique([r.lesion_id for r in records], return_counts=True)
  assert counts.max() >= 2  # some lesion has several images, as in the real data
  assert len(lesions) < 7
  x, y = ham10000.load_example(records[0], None)
  assert x.shape == (24, 32, 3) and set(np.unique(y).tolist()) <= {0, 1} and y.any()


def test_tab_metadata_in_dataverse_style(tmp_path):
  root = tmp_path / 'ham'
  _write_handmade(root)
  (root / 'HAM10000_metadata.csv').unlink()
  lines = ['\t'.join(_HEADER.split(','))]
  for row in _ROWS:
    lines.append('\t'.join(v if i == 4 or not v else f'"{v}"' for i, v in enumerate(row)))
  (root / 'HAM10000_metadata.tab').write_text('\n'.join(lines) + '\n')
  by_id = {r.image_id: r for r in ham10000.scan(root)}
  assert by_id['ISIC_0027419'].localization == 'scalp'
  assert by_id['ISIC_0027419'].site == 'vidir_modern'
  assert by_id['ISIC_0026769'].age is None


def test_missing_dataset_column_gives_no_sites(tmp_path):
  root = phantoms_ham10000.write_phantoms(tmp_path / 'ph', cases=8, sites=2,
                                          image_size=(24, 32), with_dataset_column=False)
  assert 'dataset' not in (root / 'HAM10000_metadata.csv').read_text().splitlines()[0]
  records = ham10000.scan(root)
  assert all(r.site is None for r in records) and all(r.dx for r in records)


def test_isic2018_layout(tmp_path):
  root = phantoms_ham10000.write_phantoms(tmp_path / 'isic', cases=10, layout='isic2018',
                                          image_size=(24, 32))
  assert (root / 'ISIC2018_Task1-2_Training_Input' / 'LICENSE.txt').is_file()
  records = ham10000.scan(root)
  assert len(records) == 10
  assert {r.split for r in records} == {'train', 'validation'}
  assert all(r.site is None and r.lesion_id == r.image_id for r in records)
  native = {ham10000.load_example(r, None)[0].shape for r in records}
  assert len(native) > 1  # sizes vary, as in ISIC 2018
  x, y = ham10000.load_example(records[0], (16, 20))
  assert x.shape == (16, 20, 3) and y.shape == (16, 20)
  # An input folder without its ground-truth folder is named in the error.
  gt = root / 'ISIC2018_Task1_Validation_GroundTruth'
  for f in gt.iterdir():
    f.unlink()
  gt.rmdir()
  with pytest.raises(ham10000.DataError, match='ISIC2018_Task1_Validation_GroundTruth'):
    ham10000.scan(root)


def test_kaggle_lowercase_duplicate_folders(tmp_path):
  root = _write_handmade(tmp_path / 'ham')
  src = root / 'HAM10000_images_part_1'
  dup = root / 'ham10000_images_part_1'
  dup.mkdir()
  for f in src.iterdir():
    dup.joinpath(f.name).write_bytes(f.read_bytes())
  records = ham10000.scan(root)
  assert len(records) == len(_ROWS)
  assert {r.image_path.parent.name for r in records} == {
      'HAM10000_images_part_1', 'HAM10000_images_part_2'}


def test_error_empty_and_missing_dir(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ham10000.DataError, match=f'{empty}.*empty'):
    ham10000.scan(empty)
  with pytest.raises(ham10000.DataError, match='does not exist'):
    ham10000.scan(tmp_path / 'nope')
  (empty / 'notes.txt').write_text('x')
  with pytest.raises(ham10000.DataError, match='no known layout'):
    ham10000.scan(empty)


def test_error_metadata_missing_columns(tmp_path):
  root = _write_handmade(tmp_path / 'ham')
  meta = root / 'HAM10000_metadata.csv'
  meta.write_text('image_id,diagnosis\nISIC_0027419,bkl\n')
  with pytest.raises(ham10000.DataError) as err:
    ham10000.scan(root)
  msg = str(err.value)
  assert 'HAM10000_metadata.csv' in msg and 'lesion_id' in msg and "'dx'" in msg


def test_error_unreadable_jpeg_and_truncated_png(tmp_path):
  root = _write_handmade(tmp_path / 'ham')
  records = {r.image_id: r for r in ham10000.scan(root)}
  bad = records['ISIC_0027419']
  bad.image_path.write_bytes(b'this is not a jpeg' * 10)
  with pytest.raises(ham10000.DataError, match='ISIC_0027419.jpg'):
    ham10000.load_example(bad, (16, 16))
  other = records['ISIC_0026769']
  data = other.mask_path.read_bytes()
  other.mask_path.write_bytes(data[: len(data) // 2])
  with pytest.raises(ham10000.DataError, match='ISIC_0026769_segmentation.png'):
    ham10000.load_example(other, None)


def test_error_shape_mismatch(tmp_path):
  root = _write_handmade(tmp_path / 'ham')
  rec = ham10000.scan(root)[0]
  Image.fromarray(np.zeros((20, 30), np.uint8)).save(rec.mask_path)
  with pytest.raises(ham10000.DataError) as err:
    ham10000.load_example(rec, (16, 16))
  assert rec.image_id in str(err.value) and '45x60' in str(err.value)
  assert '20x30' in str(err.value)


def test_error_unpaired_files(tmp_path):
  root = _write_handmade(tmp_path / 'ham')
  by_id = {r.image_id: r for r in ham10000.scan(root)}
  by_id['ISIC_0031633'].image_path.unlink()  # its mask is left without image
  with pytest.raises(ham10000.DataError, match='ISIC_0031633_segmentation.png.*no image'):
    ham10000.scan(root)
  assert len(ham10000.scan(root, strict=False)) == len(_ROWS) - 1
  by_id['ISIC_0026769'].mask_path.unlink()  # image without mask
  with pytest.raises(ham10000.DataError, match='ISIC_0026769.jpg.*no mask'):
    ham10000.scan(root)


def test_error_image_not_in_metadata(tmp_path):
  root = _write_handmade(tmp_path / 'ham')
  lines = (root / 'HAM10000_metadata.csv').read_text().splitlines()
  (root / 'HAM10000_metadata.csv').write_text('\n'.join(lines[:-1]) + '\n')
  with pytest.raises(ham10000.DataError, match='ISIC_0031633.jpg.*not listed'):
    ham10000.scan(root)


def test_tfds_builder_array_record_roundtrip(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_ham10000, 'IMAGES_PER_SHARD', 4)  # 6 images: 2 shards.
  root = phantoms_ham10000.write_phantoms(tmp_path / 'ph', cases=6, sites=2, image_size=(48, 64))
  out = tfds_ham10000.prepare(root, tmp_path / 'tfds', image_size=(32, 32))
  assert out == tmp_path / 'tfds' / 'ham10000_seg' / '32x32' / '1.1.0'
  assert len(list(out.glob('*.array_record-*'))) == 2, f'not 2 array_record shards in {out}'
  source = tfds_ham10000.load_data_source(tmp_path / 'tfds', image_size=(32, 32))
  assert len(source) == 6
  scanned = ham10000.scan(root)
  expected = {r.image_id: r for r in scanned}
  # The index in metadata.json lists the examples in their stored order: the scan order.
  assert tfds_ham10000.find(tmp_path / 'tfds', (32, 32)) == out
  assert tfds_ham10000.find(tmp_path / 'tfds' / 'ham10000_seg', 32) == out
  index = tfds_ham10000.records(out)
  assert [r['image_id'] for r in index] == [r.image_id for r in scanned]
  assert [(r['lesion_id'], r['site'], r['dx']) for r in index] == [
      (r.lesion_id, r.site, r.dx) for r in scanned]
  seen = set()
  for i in range(len(source)):
    ex = source[i]
    image_id = ex['image_id'].decode()
    assert image_id == index[i]['image_id']
    seen.add(image_id)
    assert ex['image'].shape == (32, 32, 3) and ex['image'].dtype == np.uint8
    assert ex['mask'].shape == (32, 32) and ex['mask'].dtype == np.uint8
    img, mask = ham10000.load_example_uint8(expected[image_id], (32, 32))
    np.testing.assert_array_equal(ex['image'], img)  # PNG is lossless
    np.testing.assert_array_equal(ex['mask'], mask)
    assert ex['lesion_id'].decode() == expected[image_id].lesion_id
    assert ex['site'].decode() == expected[image_id].site
  assert seen == set(expected)


def test_find_names_the_prepared_sizes(tmp_path):
  assert tfds_ham10000.find(tmp_path, (32, 32)) is None  # Not a prepared folder.
  root = phantoms_ham10000.write_phantoms(tmp_path / 'ph', cases=3, sites=1, image_size=(24, 32))
  tfds_ham10000.prepare(root, tmp_path / 'tfds', image_size=(16, 16))
  with pytest.raises(ValueError, match=r"\['16x16/1.1.0'\].*config\.data\.image_size"):
    tfds_ham10000.find(tmp_path / 'tfds', (32, 32))
