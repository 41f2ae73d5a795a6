"""experiments/frontier.py (`make frontier`): technique configs and the table / frontier.json rows."""

import json
import math
import os

import pytest

from adpfl_jax import jsonio
from adpfl_jax.configs import identity
from adpfl_jax.configs import loading

_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'experiments')


def _frontier():
  return loading.module(os.path.join(_DIR, 'frontier.py'))


def _runs(*dice):
  return [{'dice': d, 'epsilon': 1.0, 'rounds_to_95': 4} for d in dice]


def test_rows_and_gap_recovered():
  fr = _frontier()
  cells = [
      {'task': 'phantom', 'method': 'npfl', 'techniques': (), 'epsilon': 1.0,
       'runs': [dict(r, epsilon=math.inf) for r in _runs(0.96, 0.98)]},
      {'task': 'phantom', 'method': 'dpfl', 'techniques': (), 'epsilon': 1.0,
       'runs': _runs(0.88, 0.90)},
      {'task': 'phantom', 'method': 'adpfl', 'techniques': ('aug', 'ema'), 'epsilon': 1.0,
       'runs': _runs(0.94, 0.94)},
  ]
  rows = fr.frontier_rows(cells)
  by = {(r['method'], tuple(r['techniques'])): r for r in rows}
  assert by[('npfl', ())]['gap_recovered'] is None and by[('npfl', ())]['epsilon'] is None
  assert by[('npfl', ())]['epsilon_spent'] is None  # ∞ written as null
  assert by[('dpfl', ())]['gap_recovered'] == pytest.approx(0.0)
  assert by[('adpfl', ('aug', 'ema'))]['gap_recovered'] == pytest.approx(0.05 / 0.08)
  assert by[('dpfl', ())]['dice_std'] == pytest.approx(0.0141421, rel=1e-4)
  for r in rows:
    assert {'method', 'techniques', 'epsilon', 'dice_mean', 'dice_std', 'gap_recovered'} <= set(r)
  json.loads(jsonio.dumps(rows))  # strict JSON
  table = fr.format_table(rows, 'x')
  assert '| phantom | ADP-FL | aug+ema | 1 | 1.000 | 0.9400 ± 0.0000 | 4.0 | 62% | 2 |' in table
  assert fr.best_combination(rows)['techniques'] == ['aug', 'ema']


def test_techniques_change_public_choices_only():
  fr = _frontier()
  flat = lambda c: identity.flatten_config(identity.config_dict(c))
  base = flat(fr.get_config('method=adpfl,seed=1'))
  got = flat(fr.get_config('method=adpfl,seed=1,techniques=aug+ema+fedadam+pretrain,'
                           'pretrained=/public/params'))
  changed = {k for k in base if base[k] != got[k]}
  assert changed == {'privacy.augment_multiplicity', 'fed.param_averaging',
                     'fed.server_optimizer', 'fed.server_lr', 'model.init_checkpoint'}
  assert got['privacy.target_epsilon'] == base['privacy.target_epsilon'] == fr.EPSILON
  with pytest.raises(ValueError):
    fr.get_config('techniques=pretrain')  # no public checkpoint given
  with pytest.raises(ValueError):
    fr.get_config('techniques=fedavgm+fedadam')


def test_batch_tradeoff_keeps_the_planned_epsilon_on_target(tiny_config):
  fr = _frontier()
  base = tiny_config(**{'privacy.target_epsilon': 4.0, 'log.progress': False})
  sizes = [24, 24, 24, 24]
  sigma = 1.2
  pairs = fr.batch_tradeoff_specs(base, sizes, (3, 6), sigma)
  assert [m for m, _ in pairs] == [3, 6]
  assert pairs[0][1] > pairs[1][1]  # a smaller batch buys more rounds at the same σ and ε
  for m, r in pairs:
    at = base.copy_and_resolve_references()
    at.privacy.batch_size = m
    at.fed.rounds = r
    assert fr.planned_epsilon(at, sizes, sigma) <= 4.0  # on target ...
    if r < 8 * base.fed.rounds:  # below the search cap: one more round would overshoot
      at.fed.rounds = r + 1
      assert fr.planned_epsilon(at, sizes, sigma) > 4.0


def test_an_interrupted_run_is_not_reused_as_finished(tmp_path):
  from adpfl_jax import studies  # pylint: disable=g-import-not-at-top
  for reason, done in [('completed', True), ('interrupted by a signal after round 26', False),
                       ('budget: round 3 would take silo 0 past the target', True)]:
    (tmp_path / 'summary.json').write_text(json.dumps({'stopped_reason': reason}))
    assert studies._finished(str(tmp_path)) is done  # pylint: disable=protected-access
  (tmp_path / 'summary.json').unlink()
  assert not studies._finished(str(tmp_path))  # pylint: disable=protected-access
