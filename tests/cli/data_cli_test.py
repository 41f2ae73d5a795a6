"""Tests for `adpfl data` (adpfl_jax.data_cli): phantoms in the real layouts, TFDS preparation."""

import csv
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from adpfl_jax import data_cli
from adpfl_jax.data import brats
from adpfl_jax.data import ham10000
from adpfl_jax.data import kits23
from adpfl_jax.data import nifti
from adpfl_jax.data import tfds_3d
from adpfl_jax.data import tfds_ham10000

REPO = pathlib.Path(__file__).resolve().parents[2]
SHAPE = {'ham10000': '24,32', 'kits23': '8,16,16', 'brats2024': '8,16,16'}


def _make(tmp_path, task, cases, *extra):
  out = tmp_path / task
  rc = data_cli.main(['make-phantoms', '--task', task, '--out', str(out), '--cases', str(cases),
                      '--shape', SHAPE[task], *extra])
  assert rc == 0
  return out


def _listing(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob('*'))


def _decoded(value):
  return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- make-phantoms


def test_make_phantoms_ham10000_layout(tmp_path, capsys):
  out = _make(tmp_path, 'ham10000', 8, '--sites', '2')
  assert 'wrote 8 ham10000 phantom images from 2 site(s)' in capsys.readouterr().out
  part1 = sorted(p.name for p in (out / 'HAM10000_images_part_1').iterdir())
  part2 = sorted(p.name for p in (out / 'HAM10000_images_part_2').iterdir())
  assert part1 == [f'ISIC_{i:07d}.jpg' for i in range(24306, 24310)]
  assert part2 == [f'ISIC_{i:07d}.jpg' for i in range(24310, 24314)]
  masks = sorted(p.name for p in (out / 'HAM10000_segmentations_lesion_tschandl').iterdir())
  assert masks == [n.replace('.jpg', '_segmentation.png') for n in part1 + part2]
  with open(out / 'HAM10000_metadata.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['lesion_id', 'image_id', 'dx', 'dx_type', 'age', 'sex',
                           'localization', 'dataset']
  assert len(rows) == 8 and len({r['dataset'] for r in rows}) == 2
  records = ham10000.scan(out)  # The real reader accepts it.
  assert len(records) == 8
  image, mask = ham10000.load_example_uint8(records[0], None)
  assert image.shape == (24, 32, 3) and mask.shape == (24, 32) and mask.any()


def test_make_phantoms_kits23_layout(tmp_path):
  out = _make(tmp_path, 'kits23', 4, '--sites', '2', '--seed', '3')
  for i in range(4):
    case = out / 'dataset' / f'case_{i:05d}'
    assert (case / 'imaging.nii.gz').is_file() and (case / 'segmentation.nii.gz').is_file()
  assert (out / 'dataset' / 'kits23.json').is_file()
  with open(out / kits23.SITE_CSV, newline='') as f:
    assert list(csv.reader(f))[0] == ['case', 'site_id']
  image, spacing = nifti.read_nifti(out / 'dataset' / 'case_00000' / 'imaging.nii.gz')
  assert image.shape == (8, 16, 16) and len(spacing) == 3
  cases = kits23.scan(out, site_csv=str(out / kits23.SITE_CSV))
  assert [c.case_id for c in cases] == [f'case_{i:05d}' for i in range(4)]
  assert {str(c.site) for c in cases} == {'0', '1'}


def test_make_phantoms_brats2024_layout(tmp_path):
  out = _make(tmp_path, 'brats2024', 5)
  folders = sorted((out / 'training_data1_v2').iterdir())
  assert folders and all(p.name.startswith('BraTS-GLI-') for p in folders)
  for folder in folders:
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f'{folder.name}-{m}.nii.gz'
                           for m in ('t1n', 't1c', 't2w', 't2f', 'seg'))
  assert not list((out / 'validation_data').rglob('*-seg.nii.gz'))  # Unlabelled release.
  assert (out / (brats.METADATA_STEM + '.csv')).is_file()
  cases = brats.scan(out)
  assert len(cases) == 5 and len({c.patient_id for c in cases}) < 5  # Several time points.
  assert all(c.site in brats.SITES_2024 for c in cases)


@pytest.mark.parametrize('argv,rc,message', [
    (['--task', 'kits23', '--cases', '0'], 2, '--cases must be >= 1'),
    (['--task', 'kits23', '--cases', '2', '--sites', '0'], 2, '--sites must be >= 1'),
    (['--task', 'kits23', '--cases', '2', '--shape', '8,16'], 2, '--shape for kits23 needs 3'),
    (['--task', 'ham10000', '--cases', '2', '--shape', '8,16,16'], 2,
     '--shape for ham10000 needs 2'),
    (['--task', 'brats2024', '--cases', '2', '--sites', '9'], 1, 'sites must be in [1, 5]'),
    (['--task', 'kits23', '--cases', '600'], 1, 'cases must be in [1, 489]'),
])
def test_make_phantoms_bad_values(tmp_path, capsys, argv, rc, message):
  assert data_cli.main(['make-phantoms', '--out', str(tmp_path / 'o'), *argv]) == rc
  assert message in capsys.readouterr().err


@pytest.mark.parametrize('argv,message', [
    (['--task', 'kits19', '--out', 'o', '--cases', '2'], "--task: invalid choice: 'kits19'"),
    (['--task', 'kits23', '--cases', '2'], 'the following arguments are required: --out'),
    (['--task', 'kits23', '--out', 'o', '--cases', 'two'], "--cases: invalid int value: 'two'"),
    (['--task', 'kits23', '--out', 'o', '--cases', '2', '--shape', '8,y,8'],
     "--shape: '8,y,8' is not a comma-separated list of integers"),
    (['--task', 'kits23', '--out', 'o', '--cases', '2', '--shape', '8,x,8'],
     "--shape: '8,x,8' is not a comma-separated list of integers"),
    (['--task', 'kits23', '--out', 'o', '--cases', '2', '--shape', '8,,8'],
     "--shape: '8,,8' is not a comma-separated list of integers"),
])
def test_make_phantoms_usage_errors_name_the_argument(capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    data_cli.main(['make-phantoms', *argv])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_closed_stdout_pipe_is_not_an_error(tmp_path):
  """`adpfl data make-phantoms ... | head` exits 0 when the reader has already left."""
  cmd = (f'{sys.executable} -m adpfl_jax data make-phantoms --task ham10000 --cases 2 '
         f'--shape 24,32 --out {tmp_path / "o"} | true')  # `true` never reads: a closed pipe.
  out = subprocess.run(['bash', '-o', 'pipefail', '-c', cmd], capture_output=True, text=True,
                       cwd=REPO, timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  assert 'Error' not in out.stderr and 'Traceback' not in out.stderr


def test_entry_point_exit_code_and_message(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'adpfl_jax', 'data', 'make-phantoms', '--task', 'kits23', '--out',
       str(tmp_path / 'o'), '--cases', '-1'], capture_output=True, text=True, cwd=REPO,
      timeout=120, check=False)
  assert out.returncode == 2
  assert 'adpfl data make-phantoms: --cases must be >= 1, got -1' in out.stderr
  assert not (tmp_path / 'o').exists()


# --------------------------------------------------------------------------------- prepare


def _prepare(raw, out, task, *extra):
  return data_cli.main(['prepare', '--task', task, '--data-dir', str(raw), '--out', str(out),
                        *extra])


def test_prepare_kits23_reads_back_with_as_data_source(tmp_path, capsys):
  raw = _make(tmp_path, 'kits23', 3)
  capsys.readouterr()
  assert _prepare(raw, tmp_path / 'tfds', 'kits23', '--shape', '4,8,8',
                  '--target-spacing', '4,2,2') == 0
  printed = capsys.readouterr().out
  path = tmp_path / 'tfds' / 'kits23_seg' / '1.1.0'
  assert f'prepared kits23 from {raw}' in printed and str(path) in printed
  source = tfds_3d.load(path)['train']  # builder_from_directory(...).as_data_source()
  assert len(source) == 3
  ids = set()
  for i in range(3):
    ex = source[i]
    assert ex['image'].shape == (4, 8, 8, 1) and ex['image'].dtype == np.float32
    assert ex['label'].shape == (4, 8, 8) and ex['label'].dtype == np.uint8
    ids.add(_decoded(ex['case_id']))
  assert ids == {'case_00000', 'case_00001', 'case_00002'}
  assert tfds_3d.prepared_config(path)['shape'] == [4, 8, 8]


def test_prepare_brats2024_test_split_and_ham10000(tmp_path, capsys):
  raw = _make(tmp_path, 'brats2024', 7, '--sites', '2')
  assert _prepare(raw, tmp_path / 'tfds', 'brats2024', '--shape', '4,8,8',
                  '--target-spacing', '2,2,2', '--test-fraction', '0.4') == 0
  ds = tfds_3d.load(tmp_path / 'tfds' / 'brats2024_seg' / '1.1.0')
  assert set(ds) == {'train', 'test'} and len(ds['train']) + len(ds['test']) == 7
  assert ds['test'][0]['image'].shape == (4, 8, 8, 4)

  ham = _make(tmp_path, 'ham10000', 6)
  capsys.readouterr()
  assert _prepare(ham, tmp_path / 'tfds', 'ham10000', '--image-size', '16,20') == 0
  assert 'prepared ham10000' in capsys.readouterr().out
  source = tfds_ham10000.load_data_source(tmp_path / 'tfds', image_size=(16, 20))
  assert len(source) == 6
  ex = source[0]
  assert ex['image'].shape == (16, 20, 3) and ex['mask'].shape[:2] == (16, 20)


def test_failing_prepare_leaves_no_output(tmp_path, capsys):
  raw = _make(tmp_path, 'kits23', 3)
  bad = raw / 'dataset' / 'case_00002' / 'imaging.nii.gz'
  data = bad.read_bytes()
  bad.write_bytes(data[:len(data) // 2])  # Truncated gzip.
  capsys.readouterr()
  out = tmp_path / 'tfds'
  assert _prepare(raw, out, 'kits23', '--shape', '4,8,8', '--target-spacing', '4,2,2') == 1
  err = capsys.readouterr().err
  assert err.startswith('adpfl data prepare: NiftiError:') and 'case_00002/imaging.nii.gz' in err
  assert not out.exists()
  out.mkdir()  # An existing folder keeps exactly what it had.
  (out / 'keep.txt').write_text('x')
  assert _prepare(raw, out, 'kits23', '--shape', '4,8,8', '--target-spacing', '4,2,2') == 1
  assert _listing(out) == ['keep.txt']


@pytest.mark.parametrize('task,argv,message', [
    ('kits23', ['--shape', '4,8'], '--shape needs Z,Y,X'),
    ('ham10000', ['--image-size', '4,8,8'], '--image-size needs H,W'),
])
def test_prepare_bad_values(tmp_path, capsys, task, argv, message):
  raw = _make(tmp_path, task, 2)
  capsys.readouterr()
  assert _prepare(raw, tmp_path / 'tfds', task, *argv) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'tfds').exists()


def test_prepare_takes_the_preprocessing_keys_of_a_config(tmp_path, capsys):
  raw = _make(tmp_path, 'kits23', 3)
  config = tmp_path / 'tiny_kits23.py'
  config.write_text(
      'import importlib.util\n'
      f'spec = importlib.util.spec_from_file_location("k", {str(REPO / "experiments" / "kits23.py")!r})\n'
      'module = importlib.util.module_from_spec(spec)\n'
      'spec.loader.exec_module(module)\n\n\n'
      'def get_config(arg=None):\n'
      '  c = module.get_config(arg)\n'
      '  c.data.volume_shape = (4, 8, 8) if arg is None else (2, 4, 4)\n'
      '  return c\n')
  capsys.readouterr()
  assert _prepare(raw, tmp_path / 'tfds', 'kits23', '--config', f'{config}:smoke') == 0
  printed = capsys.readouterr().out
  path = tmp_path / 'tfds' / 'kits23_seg' / '1.1.0'
  assert tfds_3d.prepared_config(path)['shape'] == [2, 4, 4]  # The :smoke config's.
  assert tfds_3d.prepared_config(path)['target_spacing'] == [3.0, 1.5, 1.5]
  assert f'adpfl train --config={config}:smoke --config.data.dir={tmp_path / "tfds"}' in printed
  # A flag overrides the config's key.
  assert _prepare(raw, tmp_path / 'flag', 'kits23', '--config', str(config),
                  '--target-spacing', '4,2,2') == 0
  path = tmp_path / 'flag' / 'kits23_seg' / '1.1.0'
  assert tfds_3d.prepared_config(path)['shape'] == [4, 8, 8]
  assert tfds_3d.prepared_config(path)['target_spacing'] == [4.0, 2.0, 2.0]


@pytest.mark.parametrize('task,argv,message', [
    ('kits23', [], '--shape (or --config with a non-empty config.data.volume_shape) is required'),
    ('kits23', ['--shape', '4,8,8'], '--target-spacing (or --config with a non-empty'),
    ('ham10000', [], '--image-size (or --config with a non-empty config.data.image_size)'),
    ('kits23', ['--config', 'nowhere.py'], '--config=nowhere.py: no such file'),
    ('kits23', ['--config', str(REPO / 'experiments' / 'brats2024.py')],
     "is a 'brats2024' config (config.data.name), not 'kits23'"),
])
def test_prepare_needs_the_preprocessing_keys(tmp_path, capsys, task, argv, message):
  raw = _make(tmp_path, task, 2)
  capsys.readouterr()
  assert _prepare(raw, tmp_path / 'tfds', task, *argv) == 2
  err = capsys.readouterr().err
  assert err.startswith('adpfl data prepare: ') and message in err and err.count('\n') == 1
  assert not (tmp_path / 'tfds').exists()


def test_prepare_missing_data_dir_and_bad_spacing(tmp_path, capsys):
  assert _prepare(tmp_path / 'nowhere', tmp_path / 'tfds', 'kits23') == 2
  assert '--data-dir' in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    _prepare(tmp_path, tmp_path / 'tfds', 'kits23', '--target-spacing', '1,2')
  assert e.value.code == 2
  assert "--target-spacing: '1,2' must be 3 positive numbers" in capsys.readouterr().err
  assert not (tmp_path / 'tfds').exists()
