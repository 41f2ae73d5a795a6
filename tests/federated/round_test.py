"""The federated round: backends agree, one compilation per run, end to end, budget stop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from adpfl_jax import train
from adpfl_jax import validation


def _one_round(cfg, data, tmp):
  trainer = train.Trainer(cfg, tmp, data=data)
  inputs, *_ = trainer.round_inputs(0)
  state, metrics = trainer.round.apply(trainer.initial_state, jnp.asarray(data.train_x),
                                       jnp.asarray(data.train_y), inputs)
  return ravel_pytree(state.params)[0], jax.device_get(metrics)


def test_all_backends_agree(tiny_data, tmp_path, tiny_config):
  assert jax.device_count() >= 2, 'tests run with forced CPU devices (see tests/conftest.py)'
  ref, ref_m = _one_round(tiny_config(**{'fed.backend': 'loop'}), tiny_data, str(tmp_path))
  # privacy.microbatch_size: per-example gradients over the sampled slots only, under a batched
  # while loop (vmap) and a plain one (loop): the same round.
  for backend, extra in [('vmap', {}), ('map', {}), ('map', {'fed.chunk_size': 2}),
                         ('sharded', {'fed.clients_per_round': 3}),
                         ('vmap', {'privacy.microbatch_size': 2}),
                         ('loop', {'privacy.microbatch_size': 1})]:
    cfg = tiny_config(**{'fed.backend': backend, **extra})
    got, m = _one_round(cfg, tiny_data, str(tmp_path))
    if backend == 'sharded':  # 3 clients padded to 4 devices: compare with loop on 3 clients
      want, want_m = _one_round(tiny_config(**{'fed.backend': 'loop', 'fed.clients_per_round': 3}),
                                tiny_data, str(tmp_path))
    else:
      want, want_m = ref, ref_m
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6, err_msg=f'{backend} {extra}')
    np.testing.assert_allclose(m['train_loss'], want_m['train_loss'], rtol=1e-4)


def test_round_compiles_once_while_clip_and_noise_change(tiny_data, tmp_path, tiny_config):
  cfg = tiny_config(**{'fed.backend': 'map', 'privacy.clip_mode': 'quantile',
                       'privacy.noise_schedule': 'exponential', 'fed.rounds': 4,
                       'privacy.noise_schedule_params.rate': 0.8,
                       'privacy.target_epsilon': 50.0})
  trainer = train.Trainer(cfg, str(tmp_path), data=tiny_data)
  state = trainer.initial_state
  x, y = jnp.asarray(tiny_data.train_x), jnp.asarray(tiny_data.train_y)
  clips, noises = [], []
  for r in range(4):
    inputs, *_ = trainer.round_inputs(r)
    state, m = trainer.round.apply(state, x, y, inputs)
    clips.append(np.asarray(state.controller.clip).copy())
    noises.append(np.asarray(m['noise_multiplier']).copy())
  assert trainer.round.jitted[0]._cache_size() == 1
  assert not np.allclose(clips[0], clips[-1])  # clip adapted
  assert not np.allclose(noises[0], noises[-1])  # noise followed the schedule


def _strict_json(text):
  """json.loads that refuses Infinity/NaN (not JSON, RFC 8259)."""
  def refuse(name):
    raise ValueError(f'non-JSON constant {name}')
  return json.loads(text, parse_constant=refuse)


def _tensorboard_tags(workdir):
  """Scalar tags of the event files in ``workdir`` (TFRecord framing, tensorboardX's protos)."""
  import glob
  import struct
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in glob.glob(os.path.join(str(workdir), '**', 'events.out.tfevents.*'), recursive=True):
    with open(path, 'rb') as f:
      while header := f.read(12):
        (length,) = struct.unpack('<Q', header[:8])
        event = event_pb2.Event.FromString(f.read(length))
        f.read(4)
        tags.update(v.tag for v in event.summary.value)
  return tags


def test_end_to_end_run_writes_outputs(tiny_data, tmp_path, tiny_config):
  cfg = tiny_config()
  summary = train.Trainer(cfg, str(tmp_path), data=tiny_data).run()
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  assert [r['round'] for r in rows] == [1, 2]
  for key in ('round', 'dice', 'dice_per_client', 'epsilon', 'epsilon_per_client',
              'delta', 'clip_norm', 'noise_multiplier', 'examples_per_second',
              'seconds_per_round', 'wall_seconds'):
    assert key in rows[-1], key
  assert len(rows[-1]['dice_per_client']) == 4
  saved = json.load(open(os.path.join(tmp_path, 'summary.json')))
  for key in ('dice', 'epsilon', 'delta', 'rounds', 'wall_seconds', 'stopped_reason'):
    assert key in saved
  assert saved['rounds'] == 2 and 0.0 <= saved['dice'] <= 1.0
  assert 0 < saved['epsilon'] <= cfg.privacy.target_epsilon * (1 + 1e-9)
  assert json.load(open(os.path.join(tmp_path, 'config.json')))['seed'] == 0
  assert summary['stopped_reason'] == 'completed'


def test_dp_run_releases_nothing_unnoised_by_default(tiny_data, tmp_path, tiny_config):
  # Review finding: the exact Poisson count ('examples', also recoverable as examples_per_second ×
  # wall_seconds) and the raw training loss were written by DP runs without being covered by ε.
  cfg = tiny_config(**{'eval.tensorboard': True})
  train.Trainer(cfg, str(tmp_path / 'dp'), data=tiny_data).run()
  rows = [json.loads(l) for l in open(tmp_path / 'dp' / 'metrics.jsonl')]
  for row in rows:
    assert 'examples' not in row and 'train_loss' not in row
  summary = json.load(open(tmp_path / 'dp' / 'summary.json'))
  assert summary['unprivatized_outputs'] == []
  # Throughput comes from public quantities: expected batch (q·n = 6) × steps × clients.
  expected_per_round = 4 * 2 * 6
  for row in rows[1:]:
    assert row['examples_per_second'] * row['seconds_per_round'] == pytest.approx(
        expected_per_round)
  tags = _tensorboard_tags(tmp_path / 'dp')
  assert 'dice' in tags and not [t for t in tags if 'train_loss' in t or t == 'examples']
  assert 'epsilon_per_client/site_0' in tags  # per-silo tags carry the site names
  # The raw loss only on request, and then flagged.
  cfg = tiny_config(**{'log.raw_train_loss': True})
  train.Trainer(cfg, str(tmp_path / 'raw'), data=tiny_data).run()
  rows = [json.loads(l) for l in open(tmp_path / 'raw' / 'metrics.jsonl')]
  assert all('train_loss' in row for row in rows)
  assert json.load(open(tmp_path / 'raw' / 'summary.json'))['unprivatized_outputs'] == [
      'train_loss']


def test_outputs_are_strict_json(tiny_data, tmp_path, tiny_config):
  # Review finding: ε = ∞ was written as Infinity, which is not JSON.
  cfg = tiny_config(**{'privacy.mode': 'none', 'fed.rounds': 1})
  train.Trainer(cfg, str(tmp_path), data=tiny_data).run()
  summary = _strict_json(open(tmp_path / 'summary.json').read())
  assert summary['epsilon'] is None and summary['privacy_mode'] == 'none'
  for line in open(tmp_path / 'metrics.jsonl'):
    row = _strict_json(line)
    assert row['epsilon'] is None and 'train_loss' in row  # NP-FL: nothing to protect
  _strict_json(open(tmp_path / 'ledger.json').read())


def test_sharded_with_padded_clients_matches_loop_on_all_state(tiny_data, tmp_path, tiny_config):
  # Review finding: 3 clients padded to 4 devices; the padded client repeats client 0's id and
  # its (unchanged) clip overwrote client 0's adapted clip in the scatter.
  assert jax.device_count() == 4
  extra = {'fed.clients_per_round': 3, 'privacy.clip_mode': 'quantile',
           'privacy.target_epsilon': 20.0}
  finals = {}
  for backend in ('loop', 'sharded'):
    trainer = train.Trainer(tiny_config(**{'fed.backend': backend, **extra}),
                            str(tmp_path / backend), data=tiny_data)
    state = trainer.initial_state
    x, y = jnp.asarray(tiny_data.train_x), jnp.asarray(tiny_data.train_y)
    for r in range(2):
      inputs, *_ = trainer.round_inputs(r)
      state, _ = trainer.round.apply(state, x, y, inputs)
    finals[backend] = jax.device_get(state)
  assert not np.allclose(finals['loop'].controller.clip, 1.0)  # the clip adapted
  for a, b in zip(jax.tree_util.tree_leaves(finals['loop']),
                  jax.tree_util.tree_leaves(finals['sharded'])):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=2e-4, atol=2e-6)


def test_budget_stop_never_exceeds_target(tiny_data, tmp_path, tiny_config):
  # A fixed σ far too small for 6 rounds: the run must stop early, below the target.
  cfg = tiny_config(**{'privacy.calibrate': False, 'privacy.noise_multiplier': 1.0,
                       'privacy.target_epsilon': 6.0, 'fed.rounds': 6, 'fed.local_steps': 3})
  trainer = train.Trainer(cfg, str(tmp_path), data=tiny_data)
  summary = trainer.run()
  assert summary['stopped_reason'].startswith('budget')
  assert 1 <= summary['rounds'] < 6
  assert summary['epsilon'] <= 6.0
  # One more round would have exceeded it (the stop is not premature).
  k = int(np.argmax(summary['epsilon_per_client']))
  ledger = trainer.plan.ledgers[k]
  extra = [(trainer.plan.spec(k, 1.0), 3)]
  assert ledger.epsilon_if(extra, cfg.privacy.delta) > 6.0


@pytest.mark.parametrize('key,value', [
    ('privacy.noise_multiplier', -0.5),
    ('privacy.delta', 1.0),
    ('privacy.delta', 0.0),
    ('privacy.batch_size', 0),
    ('fed.clients_per_round', 5),
    ('privacy.batch_size', 100),
    ('privacy.accountant', 'moments'),
    ('fed.backend', 'gpu'),
    ('model.depth', 4),
])
def test_invalid_values_fail_before_compiling(key, value, tiny_data, tmp_path, tiny_config):
  with pytest.raises(validation.ConfigError, match=key.split('.')[-1]):
    train.Trainer(tiny_config(**{key: value}), str(tmp_path), data=tiny_data)


def test_sampling_rate_outside_unit_interval_fails():
  from adpfl_jax.privacy import accounting
  for q in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match='sampling_rate'):
      accounting.StepSpec(sampling_rate=q, noise_multiplier=1.0)


def test_target_already_exceeded_fails_before_compiling(tiny_data, tmp_path, tiny_config):
  cfg = tiny_config(**{'privacy.calibrate': False, 'privacy.noise_multiplier': 0.3,
                       'privacy.target_epsilon': 0.5})
  with pytest.raises(validation.ConfigError, match='target_epsilon'):
    train.Trainer(cfg, str(tmp_path), data=tiny_data)
