"""`adpfl train` as a new user meets it: one-line errors, early checks, help, safe reruns."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from adpfl_jax import train
from adpfl_jax import validation

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
TINY = ['--config.data.examples_per_client=24', '--config.data.test_examples_per_client=4',
        '--config.data.image_size=8', '--config.model.features=4', '--config.model.depth=1',
        '--config.model.groups=2', '--config.fed.local_steps=1', '--config.privacy.batch_size=6',
        '--config.privacy.accountant=rdp', '--config.eval.every_rounds=1']


def _adpfl(*args, cwd=None, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'adpfl_jax', *args], capture_output=True,
                        text=True, timeout=timeout, env=env, cwd=cwd or ROOT)


@pytest.fixture(scope='module')
def kits_dirs(tmp_path_factory):
  """A tiny KiTS23 release with one corrupt image, and an empty folder."""
  root = tmp_path_factory.mktemp('kits')
  proc = _adpfl('data', 'make-phantoms', '--task', 'kits23', '--out', str(root / 'bad'),
                '--cases', '6', '--shape', '16,24,24')
  assert proc.returncode == 0, proc.stderr
  image = root / 'bad' / 'dataset' / 'case_00003' / 'imaging.nii.gz'
  image.write_bytes(image.read_bytes()[:200])
  (root / 'empty').mkdir()
  return root


def test_bad_inputs_exit_2_with_one_line_naming_the_key_or_file(tmp_path, kits_dirs):
  (tmp_path / 'a_file').write_text('x')
  cases = [
      (['--config.privacy.target_epsilon=-1'], 'privacy.target_epsilon'),
      (['--config.privacy.delta=2'], 'privacy.delta'),
      (['--config.privacy.nosie=1'], 'privacy.nosie'),
      (['--config=kits23:smoke', f'--config.data.dir={tmp_path}/missing'], 'data.dir'),
      (['--config=kits23:smoke', f'--config.data.dir={kits_dirs}/empty'], 'data.dir'),
      (['--config=kits23:smoke', f'--config.data.dir={kits_dirs}/bad'], 'case_00003'),
      (['--workdir', str(tmp_path / 'a_file')], 'a_file'),
      (['--config.data.dir=/somewhere'], 'data.dir'),
  ]
  for extra, named in cases:
    config = [a for a in extra if a.startswith('--config=')] or ['--config=quickstart:smoke']
    workdir = [] if '--workdir' in extra else ['--workdir', str(tmp_path / 'w')]
    rest = [a for a in extra if not a.startswith('--config=')]
    proc = _adpfl('train', *config, *workdir, *rest)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (extra, proc.stderr[-2000:])
    assert 1 <= len(err) <= 2 and named in err[-1], (extra, err)
    assert '\\n' not in proc.stderr and 'Traceback' not in proc.stderr, extra
  near = _adpfl('train', '--config=quickstart', '--workdir', str(tmp_path / 'w'),
                '--config.fed.round=3')
  assert 'did you mean fed.rounds' in near.stderr


def test_checks_that_need_no_data_come_first(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({'seed': 99}))
  proc = _adpfl('train', '--config=quickstart', '--workdir', str(workdir))
  assert proc.returncode == 2 and 'differing keys' in proc.stderr
  assert 'building the run' not in proc.stdout  # refused before data and calibration
  assert proc.stdout.startswith('adpfl train: quickstart')


def test_help_version_and_show_config():
  out = _adpfl('train', '--help')
  assert out.returncode == 0 and '--config=' in out.stdout and '--workdir=' in out.stdout
  top = _adpfl('--help')
  assert top.returncode == 0 and 'adpfl train' in top.stdout and 'kept short' not in top.stdout
  assert _adpfl('--version').stdout.startswith('adpfl_jax ')
  shown = _adpfl('train', '--config=quickstart', '--show_config',
                 '--config.privacy.target_epsilon=2').stdout
  assert 'privacy.target_epsilon = 2.0' in shown
  assert 'privacy.clip_norm = 1.0' in shown and '# C (fixed) or C_0 (adaptive)' in shown


def test_ctrl_c_checkpoints_and_exits_non_zero(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'adpfl_jax', 'train', '--config=quickstart', '--workdir',
       str(tmp_path), '--config.fed.rounds=40', '--config.checkpoint.every_rounds=100',
       '--config.log.progress=False', *TINY], env=env, cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 600
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 130, (out[-2000:], err[-2000:])
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['stopped_reason'].startswith('interrupted') and summary['rounds'] < 40
  assert os.listdir(tmp_path / 'checkpoints')  # saved although the cadence is 100 rounds
  for name in ('dice.png', 'epsilon.png', 'clip_noise.png'):
    assert (tmp_path / 'plots' / name).stat().st_size > 1000


def test_a_rerun_never_mixes_two_experiments(tiny_config, tiny_data, tmp_path):
  # Reported: a finished ε = 8 workdir rerun with ε = 2 and checkpoint.every_rounds = 0
  # overwrote config.json, metrics.jsonl and summary.json, and a plain rerun then resumed the
  # stale ε = 8 checkpoint: a summary with ε 8.0 next to target 2, Dice from two runs.
  workdir = str(tmp_path)
  eps8 = tiny_config(**{'privacy.target_epsilon': 8.0})
  first = train.Trainer(eps8, workdir, data=tiny_data).run()
  before = {n: open(os.path.join(workdir, n)).read()
            for n in ('config.json', 'metrics.jsonl', 'summary.json')}
  eps2 = tiny_config(**{'privacy.target_epsilon': 2.0, 'checkpoint.every_rounds': 0})
  with pytest.raises(validation.ConfigError, match='privacy.target_epsilon'):
    train.Trainer(eps2, workdir, data=tiny_data).run()
  for name, text in before.items():
    assert open(os.path.join(workdir, name)).read() == text, name
  again = train.Trainer(eps8, workdir, data=tiny_data).run()
  assert again['target_epsilon'] == 8.0 and again['epsilon'] == first['epsilon']
  # Even forced, a checkpoint whose ledger is above the new target is refused: a summary never
  # states a target its ε exceeds.
  forced = tiny_config(**{'privacy.target_epsilon': 2.0, 'checkpoint.every_rounds': 0,
                          'checkpoint.force': True})
  with pytest.raises(validation.ConfigError, match='above this target'):
    train.Trainer(forced, workdir, data=tiny_data).run()
  assert json.load(open(os.path.join(workdir, 'summary.json')))['target_epsilon'] == 8.0


def test_a_single_patient_silo_is_reported(tiny_config, tiny_data, tmp_path, capsys):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sizes = np.array(tiny_data.sizes)
  sizes[0] = 1
  data = dataclasses.replace(tiny_data, sizes=sizes)
  train.Trainer(tiny_config(**{'privacy.batch_size': 1}), str(tmp_path), data=data)
  assert 'single training example' in capsys.readouterr().out
