"""Vectorized sweeps: same results as each trial alone, separate ledgers, per-trial budget stop."""

import csv
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from adpfl_jax import sweep
from adpfl_jax import train

ROOT = os.path.join(os.path.dirname(__file__), '..')
TIMING = ('wall_seconds', 'examples_per_second', 'seconds_per_round')
ROUNDS = 3


@pytest.fixture(scope='module')
def tiny(tiny_config):
  """The shared tiny run over 3 rounds, no surface metrics, TensorBoard or checkpoints."""
  return lambda seed, epsilon, **kw: tiny_config(**{
      'seed': seed, 'privacy.target_epsilon': epsilon, 'fed.rounds': ROUNDS,
      'eval.surface_metrics': False, 'eval.tensorboard': False, 'checkpoint.every_rounds': 0,
      **kw})


@pytest.fixture(scope='module')
def data(tiny_data):
  return tiny_data


def trial_configs(tiny):
  # A: calibrated to a loose target, runs every round. B: another seed and target, and a fixed
  # noise multiplier too small for its target: its own plan stops it before the last round.
  return [tiny(0, 50.0),
          tiny(1, 20.0, **{'privacy.calibrate': False, 'privacy.noise_multiplier': 0.45})]


@pytest.fixture(scope='module')
def runs(data, tmp_path_factory, tiny):
  """The two trials vectorized (one group; trials vmapped, and lax.map-ped over the devices the
  test setup forces), and each run alone through ``Trainer.run``."""
  root = tmp_path_factory.mktemp('sweep')
  configs = trial_configs(tiny)
  vec, groups = {}, None
  for axis, shard in (('vmap', False), ('map', True)):
    trainers = sweep.build_trainers(configs, [str(root / f'{axis}_{i}') for i in range(2)], data)
    groups = sweep.group_trainers(trainers)
    vec[axis] = list(zip(trainers, sweep.run_group(trainers, trial_axis=axis,
                                                   shard_trials=shard)))
  alone = []
  for i, c in enumerate(configs):
    t = train.Trainer(c, str(root / f'alone_{i}'), data=data)
    alone.append((t, t.run()))
  return groups, vec, alone


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _assert_rows_close(a, b):
  assert [r['round'] for r in a] == [r['round'] for r in b]
  for ra, rb in zip(a, b):
    assert set(ra) == set(rb)
    for key in ra:
      if key in TIMING:
        continue
      va, vb = ra[key], rb[key]
      if isinstance(va, dict):
        assert set(va) == set(vb), key
        va, vb = [va[k] for k in sorted(va)], [vb[k] for k in sorted(va)]
      if isinstance(va, str) or va is None:
        assert va == vb, key
      else:
        np.testing.assert_allclose(np.asarray(va, np.float64), np.asarray(vb, np.float64),
                                   rtol=1e-4, atol=1e-6, err_msg=key)


def test_trials_form_one_group(runs):
  groups, _, _ = runs
  assert groups == [[0, 1]]


@pytest.mark.parametrize('axis', ['vmap', 'map'])
def test_vectorized_matches_each_trial_alone(runs, axis):
  _, vec, alone = runs
  for (tv, sv), (ta, sa) in zip(vec[axis], alone):
    for a, b in zip(jax.tree_util.tree_leaves(ta.final_state),
                    jax.tree_util.tree_leaves(tv.final_state)):
      # atol: near-zero weights (on GPUs with TF32 convolutions a few differ by ~2e-6).
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                 rtol=1e-4, atol=1e-5)
    _assert_rows_close(_rows(ta.workdir), _rows(tv.workdir))
    assert sv['rounds'] == sa['rounds']
    assert sv['stopped_reason'] == sa['stopped_reason']
    np.testing.assert_allclose(sv['dice'], sa['dice'], rtol=1e-4)
    assert sv['epsilon_per_client'] == sa['epsilon_per_client']
    assert ta.plan.ledgers == tv.plan.ledgers
    for name in ('config.json', 'ledger.json', 'summary.json', 'metrics.jsonl'):
      assert os.path.exists(os.path.join(tv.workdir, name)), name


def test_ledgers_stay_separate(runs):
  _, vec, _ = runs
  (ta, sa), (tb, sb) = vec['vmap']
  assert ta.plan.ledgers != tb.plan.ledgers
  # Each trial is charged only for its own rounds and noise, and stays within its own target.
  assert sa['epsilon'] <= 50.0 and sb['epsilon'] <= 20.0
  assert sa['epsilon'] != sb['epsilon']
  steps_a = sum(n for ledger in ta.plan.ledgers for _, n in ledger.runs)
  steps_b = sum(n for ledger in tb.plan.ledgers for _, n in ledger.runs)
  k, local = ta.data.num_clients, int(ta.config.fed.local_steps)
  assert steps_a == sa['rounds'] * k * local
  assert steps_b == sb['rounds'] * k * local


def test_trial_over_budget_freezes_while_other_continues(runs):
  _, vec, _ = runs
  (ta, sa), (tb, sb) = vec['vmap']
  assert sa['rounds'] == ROUNDS and sa['stopped_reason'] == 'completed'
  assert sb['rounds'] < ROUNDS and sb['stopped_reason'].startswith('budget')
  assert int(tb.final_state.round) == sb['rounds']
  rows_b = _rows(tb.workdir)
  assert max(r['round'] for r in rows_b) == sb['rounds']
  assert len(_rows(ta.workdir)) == ROUNDS


def test_trials_of_one_seed_draw_independent_noise_and_batches(data, tmp_path, tiny):
  # Review finding: trials of one seed at several ε shared their noise key and Poisson batches, so
  # a linear combination of two released first-round updates could cancel the noise.
  a = train.Trainer(tiny(0, 20.0), str(tmp_path / 'a'), data=data)
  b = train.Trainer(tiny(0, 50.0), str(tmp_path / 'b'), data=data)
  again = train.Trainer(tiny(0, 20.0), str(tmp_path / 'c'), data=data)
  assert not np.array_equal(np.asarray(a.initial_state.key), np.asarray(b.initial_state.key))
  plans = [t.round_inputs(0)[0] for t in (a, b, again)]
  assert not np.array_equal(np.asarray(plans[0].indices), np.asarray(plans[1].indices))
  # The same trial (alone, resumed, or inside a sweep) keeps its randomness.
  np.testing.assert_array_equal(np.asarray(a.initial_state.key),
                                np.asarray(again.initial_state.key))
  np.testing.assert_array_equal(np.asarray(plans[0].indices), np.asarray(plans[2].indices))
  # Model initialisation is public and stays shared by seed.
  for x, y in zip(jax.tree_util.tree_leaves(a.initial_state.params),
                  jax.tree_util.tree_leaves(b.initial_state.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_composed_epsilon_of_a_sweep_covers_all_trials(runs):
  _, vec, _ = runs
  (ta, sa), (tb, sb) = vec['vmap']
  total = sweep.composed_epsilons([ta.workdir, tb.workdir], 1e-5)
  assert len(total) == ta.data.num_clients
  for k, eps in enumerate(total):
    assert eps >= max(sa['epsilon_per_client'][k], sb['epsilon_per_client'][k])
    assert eps <= sa['epsilon_per_client'][k] + sb['epsilon_per_client'][k] + 1e-6


def test_grid_configs_cells(tiny):
  make = lambda method, seed: tiny(seed, 1.0, **(
      {'privacy.mode': 'none'} if method == 'npfl' else {}))
  cells = sweep.grid_configs(make, ['dpfl', 'npfl'], [1.0, 4.0], [0, 1])
  got = sorted((c['method'], c['epsilon'], c['seed']) for c in cells)
  assert got == sorted([('dpfl', 1.0, 0), ('dpfl', 4.0, 0), ('dpfl', 1.0, 1), ('dpfl', 4.0, 1),
                        ('npfl', float('inf'), 0), ('npfl', float('inf'), 1)])
  for c in cells:
    assert c['config'].seed == c['seed']
    if c['method'] == 'dpfl':
      assert c['config'].privacy.target_epsilon == c['epsilon']


def test_sweep_cli_writes_frontier(tmp_path):
  spec = importlib.util.spec_from_file_location('sweep_cli',
                                                os.path.join(ROOT, 'experiments', 'sweep.py'))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  sets = ['privacy.accountant=rdp', 'data.image_size=8', 'model.depth=1', 'model.groups=2',
          'fed.rounds=2', 'data.examples_per_client=24', 'data.test_examples_per_client=4',
          'privacy.batch_size=6', 'eval.surface_metrics=False', 'eval.tensorboard=False',
          'checkpoint.every_rounds=0']
  argv = ['--out', str(tmp_path), '--smoke', '--methods', 'dpfl', '--epsilons', '20', '50']
  for s in sets:
    argv += ['--set', s]
  assert cli.main(argv) == 0
  with open(tmp_path / 'frontier.csv') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['method', 'epsilon_target', 'seed', 'dice', 'epsilon_spent']
  cells = sorted((r['method'], float(r['epsilon_target']), int(r['seed'])) for r in rows)
  assert cells == sorted([('dpfl', 20.0, 0), ('dpfl', 20.0, 1), ('dpfl', 50.0, 0),
                          ('dpfl', 50.0, 1), ('npfl', float('inf'), 0),
                          ('npfl', float('inf'), 1)])
  for r in rows:
    assert 0.0 <= float(r['dice']) <= 1.0
    if r['method'] == 'dpfl':
      assert 0.0 < float(r['epsilon_spent']) <= float(r['epsilon_target'])
  with open(tmp_path / 'frontier.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # A second call reuses the finished trials instead of retraining them.
  mtime = os.path.getmtime(tmp_path / 'dpfl' / 'eps_20' / 'seed_0' / 'summary.json')
  assert cli.main(argv) == 0
  assert os.path.getmtime(tmp_path / 'dpfl' / 'eps_20' / 'seed_0' / 'summary.json') == mtime
