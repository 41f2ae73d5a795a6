"""Checkpoints, exact resume (also after SIGKILL), damaged checkpoints, faults."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from adpfl_jax import train
from adpfl_jax import validation
from adpfl_jax.privacy import accounting

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')
TIMING = ('wall_seconds', 'examples_per_second', 'seconds_per_round')


@pytest.fixture(scope='module')
def tiny(tiny_config):
  """The shared tiny run over 4 rounds with a checkpoint after every round."""
  return lambda **kw: tiny_config(**{'fed.rounds': 4, 'checkpoint.every_rounds': 1, **kw})


@pytest.fixture(scope='module')
def data(tiny_data):
  return tiny_data


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in f]


def _params(trainer):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(trainer.final_state.params)]


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory, tiny):
  workdir = str(tmp_path_factory.mktemp('ref'))
  trainer = train.Trainer(tiny(), workdir, data=data)
  trainer.run()
  return workdir, trainer


def test_resume_after_partial_run_is_exact(data, reference, tmp_path, tiny, stop_after):
  ref_dir, ref = reference
  workdir = str(tmp_path)
  stop_after(train.Trainer(tiny(), workdir, data=data), 2)  # a run that died after round 2
  resumed = train.Trainer(tiny(), workdir, data=data)
  resumed.run()
  for a, b in zip(_params(ref), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  assert _rows(ref_dir) == _rows(workdir)
  assert ref.plan.ledgers == resumed.plan.ledgers


def test_truncated_checkpoint_falls_back_to_previous(data, reference, tmp_path, capsys, tiny,
                                                    stop_after):
  ref_dir, ref = reference
  workdir = str(tmp_path)
  stop_after(train.Trainer(tiny(), workdir, data=data), 3)
  # Damage the newest checkpoint (round 3) as a kill during its write could have.
  step_dir = os.path.join(workdir, 'checkpoints', '3')
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:
        f.truncate(max(0, os.path.getsize(path) // 3))
  resumed = train.Trainer(tiny(), workdir, data=data)
  summary = resumed.run()
  out = capsys.readouterr().out
  assert 'could not be restored' in out and 'Resumed from round 2' in out
  assert summary['rounds'] == 4
  for a, b in zip(_params(ref), _params(resumed)):  # and still exact
    np.testing.assert_array_equal(a, b)


def test_resume_refuses_a_different_config(data, tmp_path, tiny):
  workdir = str(tmp_path)
  train.Trainer(tiny(**{'fed.rounds': 1}), workdir, data=data).run()
  with pytest.raises(validation.ConfigError, match='fed.client_lr'):
    train.Trainer(tiny(**{'fed.rounds': 1, 'fed.client_lr': 0.3}), workdir, data=data).run()


def test_forced_resume_with_more_rounds_never_ends_above_target(data, tmp_path, tiny):
  # Review probe: a finished run at its target ε = 3, resumed with checkpoint.force and twice the
  # rounds, used to run one more round at the checkpoint's σ (ε 3.467 > 3) before stopping.
  workdir = str(tmp_path)
  first = train.Trainer(tiny(**{'fed.rounds': 2, 'privacy.target_epsilon': 3.0}), workdir,
                        data=data).run()
  assert first['epsilon'] <= 3.0
  longer = tiny(**{'fed.rounds': 4, 'privacy.target_epsilon': 3.0, 'checkpoint.force': True})
  try:
    summary = train.Trainer(longer, workdir, data=data).run()
  except validation.ConfigError as err:  # refusing is allowed, with the key named
    assert 'privacy.target_epsilon' in str(err)
  else:
    assert summary['epsilon'] <= 3.0
  with open(os.path.join(workdir, 'ledger.json')) as f:
    ledgers = [accounting.Ledger.from_dict(d) for d in json.load(f)]
  assert all(ledger.epsilon(1e-5) <= 3.0 for ledger in ledgers)


def test_forced_resume_recalibrates_the_remaining_rounds(data, tmp_path, tiny, stop_after):
  # A run planned for 4 rounds stopped after 2, then extended to 6 rounds by a forced resume: the
  # remaining rounds get the noise that lands the whole run on the target, and all run.
  workdir = str(tmp_path)
  planned = tiny(**{'privacy.target_epsilon': 3.0})
  stop_after(train.Trainer(planned, workdir, data=data), 2)
  old_scale = train.Trainer(planned, str(tmp_path / 'x'), data=data).plan.noise_scale
  longer = tiny(**{'fed.rounds': 6, 'privacy.target_epsilon': 3.0, 'checkpoint.force': True})
  trainer = train.Trainer(longer, workdir, data=data)
  summary = trainer.run()
  assert summary['rounds'] == 6 and summary['stopped_reason'] == 'completed'
  assert summary['epsilon'] <= 3.0
  assert summary['epsilon'] > 2.9  # the remaining budget was used, not wasted
  assert np.all(trainer.plan.noise_scale > old_scale)
  assert np.all(np.asarray(trainer.final_state.controller.noise_scale) > old_scale)


def test_dropout_and_nan_client(data, tmp_path, tiny):
  cfg = tiny(**{'faults.dropout': 0.2, 'faults.nan_clients': '2', 'fed.rounds': 5,
                'faults.straggler_fraction': 0.3, 'checkpoint.every_rounds': 0})
  trainer = train.Trainer(cfg, str(tmp_path), data=data)
  summary = trainer.run()
  assert summary['stopped_reason'] == 'completed'
  for leaf in jax.tree_util.tree_leaves(trainer.final_state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  reported = [r['nonfinite_clients'] for r in rows]
  dropped_any = False
  expected = [accounting.Ledger('rdp') for _ in range(4)]
  for r in range(5):
    inputs, clients, ran = trainer.round_inputs(r)
    dropped_any |= bool(np.any(ran == 0))
    # Client 2 is reported in every round where it was not dropped.
    assert reported[r] == ([2] if ran[list(clients).index(2)] > 0 else [])
    for k, s in zip(clients, ran):
      if s:
        expected[k].record(trainer.plan.spec(k, trainer.plan.noise_scale[k]), int(s))
  assert dropped_any
  for k in range(4):
    assert trainer.plan.ledgers[k].epsilon(1e-5) == pytest.approx(expected[k].epsilon(1e-5))
    assert trainer.plan.ledgers[k].steps == expected[k].steps


@pytest.mark.skipif(shutil.which('true') is None, reason='needs a POSIX shell environment')
def test_sigkill_at_random_rounds_resumes_exactly(tmp_path):
  """benchmarks/kill_resume.py: 5 SIGKILLs at random rounds, resumed, vs uninterrupted."""
  proc = subprocess.run([sys.executable, 'benchmarks/kill_resume.py', '--kills', '5', '--json',
                         '--workdir', str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                        timeout=900, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['problems'] == [] and len(out['kill_points']) == 5
