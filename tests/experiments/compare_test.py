"""experiments/compare.py (`make compare`): its method configs and the gap summary it writes."""

import importlib.util
import os

import pytest

from adpfl_jax.configs import identity

_COMPARE = os.path.join(os.path.dirname(__file__), '..', '..', 'experiments', 'compare.py')


def _compare():
  spec = importlib.util.spec_from_file_location('compare_under_test', _COMPARE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _flat(config):
  return identity.flatten_config(identity.config_dict(config))


def test_methods_share_everything_but_the_privacy_settings():
  compare = _compare()
  configs = {m: _flat(compare.get_config(f'method={m},seed=1')) for m in compare.METHODS}
  private = {m for m, c in configs.items() if c['privacy.mode'] == 'dp'}
  assert private == {'dpfl', 'adpfl', 'adpfl_const'}
  for m in private:  # the same (ε, δ) for every private method
    assert configs[m]['privacy.target_epsilon'] == compare.EPSILON
    assert configs[m]['privacy.delta'] == compare.DELTA
  assert configs['dpfl']['privacy.clip_mode'] == 'fixed'
  assert configs['dpfl']['privacy.clip_norm'] == 1.0
  assert configs['dpfl']['privacy.noise_schedule'] == 'constant'
  # The two ADP-FL variants differ only in the noise schedule.
  diff = {k for k in configs['adpfl'] if configs['adpfl'][k] != configs['adpfl_const'][k]}
  assert diff and all(k.startswith('privacy.noise_schedule') for k in diff), diff
  assert configs['adpfl_const']['privacy.noise_schedule'] == 'constant'
  assert configs['adpfl']['privacy.clip_mode'] == 'quantile'
  # Training settings outside privacy are shared by all methods.
  for m in compare.METHODS:
    shared = {k: v for k, v in configs[m].items() if not k.startswith('privacy.')}
    assert shared == {k: v for k, v in configs['npfl'].items() if not k.startswith('privacy.')}


def test_unknown_method_is_named():
  with pytest.raises(ValueError, match="'adp'"):
    _compare().get_config('method=adp')


def test_gap_summary_reports_the_share_of_the_gap():
  compare = _compare()
  runs = lambda *dice: [{'dice': d} for d in dice]
  text = compare.gap_summary({'npfl': runs(0.96, 0.98), 'dpfl': runs(0.89, 0.91),
                              'adpfl': runs(0.94, 0.94), 'adpfl_const': runs(0.92, 0.93)})
  assert 'loses 7.0 Dice points' in text
  assert 'adpfl recovers 57% of that gap' in text  # (0.94 − 0.90) / 0.07
  assert 'adpfl_const recovers 36% of that gap' in text  # (0.925 − 0.90) / 0.07
  assert compare.gap_summary({'dpfl': runs(0.9)}) == ''
