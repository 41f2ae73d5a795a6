"""The paper's 3 × 3 study runner end to end (smoke settings cut to 2 rounds and 45 phantom
cases per task, so that the whole study runs in about a minute)."""

import importlib.util
import json
import os
import re

import pytest

_RUN = os.path.join(os.path.dirname(__file__), '..', '..', 'experiments', 'paper', 'run.py')


def _runner():
  spec = importlib.util.spec_from_file_location('paper_run', _RUN)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_smoke_study_fills_every_cell_and_draws_plots(tmp_path, monkeypatch):
  monkeypatch.setenv('ADPFL_CACHE_DIR', str(tmp_path / 'cache'))
  out = tmp_path / 'paper'
  run = _runner()
  assert run.main(['--out', str(out), '--smoke', '--seeds', '0', '--set', 'fed.rounds=2',
                   '--set', 'eval.every_rounds=1', '--set', 'checkpoint.every_rounds=1',
                   '--set', 'data.phantom_cases=45', '--set', 'privacy.batch_size=4']) == 0
  table = (out / 'table.md').read_text()
  for task in ('ham10000', 'kits23', 'brats2024'):
    section = table.split(f'### {task}')[1].split('###')[0]
    rows = [line for line in section.splitlines() if re.match(r'\| (NP-FL|DP-FL|ADP-FL) \|', line)]
    assert [r.split('|')[1].strip() for r in rows] == ['NP-FL', 'DP-FL', 'ADP-FL'], section
    header = next(line for line in section.splitlines() if line.startswith('| method'))
    heads = [h.strip() for h in header.strip('|').split('|')]
    for row in rows:
      cells = [c.strip() for c in row.strip('|').split('|')]
      dice_cells = [c for c, h in zip(cells, heads) if h.startswith('Dice')]
      assert dice_cells and all(re.fullmatch(r'\d\.\d{3} ± \d\.\d{3}', c) for c in dice_cells), row
      eps = cells[heads.index('ε spent')]
      if row.startswith('| NP-FL'):
        assert eps == '∞'
      else:
        assert float(eps.split()[0]) <= 8.0 + 1e-9, row
    for png in (f'convergence_{task}.png', f'overlay_{task}.png'):
      assert (out / png).stat().st_size > 1000, png
  # BraTS runs are also scored lesion-wise (the challenge's own metric), region by region.
  summary = json.loads((out / 'brats2024' / 'dpfl' / 'seed_0' / 'summary.json').read_text())
  for region, scores in summary['surface_metrics'].items():
    assert 0.0 <= scores['lesionwise_dice'] <= 1.0, region
    assert scores['lesionwise_hd95'] >= 0.0, region


def test_overrides_are_typed_and_unknown_keys_named():
  run = _runner()
  from adpfl_jax.configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.lock()
  c = run.apply_overrides(c, [('fed.rounds', '3'), ('privacy.calibrate', 'false'),
                              ('privacy.delta', '1e-6')])
  assert (c.fed.rounds, c.privacy.calibrate, c.privacy.delta) == (3, False, 1e-6)
  with pytest.raises(ValueError, match='fed.roundz'):
    run.apply_overrides(c, [('fed.roundz', '3')])
