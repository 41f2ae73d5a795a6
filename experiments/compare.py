r"""NP-FL vs DP-FL vs ADP-FL on the built-in phantom federation, at the same (ε, δ) per silo.

  python experiments/compare.py --out runs/compare --seeds 0 1 2      # = make compare
  python experiments/compare.py --out /tmp/cmp --seeds 0 --smoke       # seconds
  adpfl train --config=experiments/compare.py:method=adpfl,seed=1 --workdir=runs/x   # one run

Methods (all share the quickstart federation, model, rounds and optimiser):
* ``npfl``  — no clipping, no noise (ε = ∞).
* ``dpfl``  — standard DP-FL: fixed C = 1, constant σ calibrated to (ε, δ).
* ``adpfl`` — ADP-FL, honestly: the clip tracks the 20th percentile of the per-example norms
  privately (Andrew et al. quantile estimation, γ = 0.2, η = 0.5, count noise folded into the
  same total σ), and σ follows a public linear schedule (1.25 → 0.8 of its scale) calibrated to
  the same (ε, δ). Sparsification is off: with a mask from the previous global update it lost
  ~2.5 Dice points in our runs.

Writes ``<out>/table.md`` (mean ± std Dice over seeds, rounds to 95% of final Dice, ε spent) and
``<out>/convergence.png``.
"""

import argparse
import os
import sys

from adpfl_jax.configs import common
from adpfl_jax.configs import default

METHODS = ('npfl', 'dpfl', 'adpfl', 'adpfl_const')
EPSILON = 1.0
DELTA = 1e-5


def get_config(arg=None):
  args = common.parse_arg(arg, method='adpfl', seed=0, smoke=False)
  if args.method not in METHODS:
    raise ValueError(f'method={args.method!r} is not one of {METHODS}')
  c = default.get_config()
  c.seed = args.seed
  c.eval.every_rounds = 5
  c.privacy.target_epsilon = EPSILON
  c.privacy.delta = DELTA
  if args.method == 'npfl':
    c.privacy.mode = 'none'
  elif args.method in ('adpfl', 'adpfl_const'):
    c.privacy.clip_mode = 'quantile'
    c.privacy.quantile.target = 0.2  # track the 20th percentile of the per-example norms
    c.privacy.quantile.lr = 0.5
    c.privacy.quantile.count_std_fraction = 0.5  # count noise costs ~3% more gradient noise
    if args.method == 'adpfl':
      c.privacy.noise_schedule = 'linear'
      c.privacy.noise_schedule_params.start = 1.25
      c.privacy.noise_schedule_params.end = 0.8
  if args.smoke:
    c.data.examples_per_client = 48
    c.data.test_examples_per_client = 8
    c.data.image_size = 16
    c.model.features = 4
    c.fed.rounds = 4
    c.fed.local_steps = 1
    c.privacy.batch_size = 8
    c.privacy.target_epsilon = 8.0
    c.eval.every_rounds = 1
    c.log.progress = False
  c.lock()
  return c


def gap_summary(results) -> str:
  """One line per adaptive method: the share of DP-FL's Dice gap to NP-FL that it recovers."""
  if 'npfl' not in results or 'dpfl' not in results:
    return ''
  mean = lambda m: sum(r['dice'] for r in results[m]) / len(results[m])
  np_dice, dp_dice = mean('npfl'), mean('dpfl')
  lines = ['', f'DP-FL loses {100 * (np_dice - dp_dice):.1f} Dice points to NP-FL (means over seeds).']
  for m in results:
    if m.startswith('adpfl') and np_dice > dp_dice:
      share = (mean(m) - dp_dice) / (np_dice - dp_dice)
      lines.append(f'{m} recovers {100 * share:.0f}% of that gap.')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  ap = argparse.ArgumentParser(description='NP-FL vs DP-FL vs ADP-FL on the phantom federation.')
  ap.add_argument('--out', default='runs/compare')
  ap.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
  ap.add_argument('--methods', nargs='+', default=list(METHODS))
  ap.add_argument('--smoke', action='store_true')
  ap.add_argument('--fresh', action='store_true', help='retrain runs that already finished')
  args = ap.parse_args(argv)
  from adpfl_jax import studies  # pylint: disable=g-import-not-at-top
  os.makedirs(args.out, exist_ok=True)
  make = lambda m, s: get_config(f'method={m},seed={s}' + (',smoke' if args.smoke else ''))
  results = studies.run_grid(make, args.methods, args.seeds, args.out, reuse=not args.fresh)
  eps = make('dpfl', args.seeds[0]).privacy.target_epsilon
  title = f'Phantom skin federation, (ε = {eps:g}, δ = {DELTA:g}) per silo, seeds {args.seeds}'
  table = studies.markdown_table(results, title) + gap_summary(results)
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(table)
  studies.plot_convergence(results, os.path.join(args.out, 'convergence.png'), title)
  print('\n' + table)
  print(f"wrote {os.path.join(args.out, 'table.md')} and convergence.png")
  return 0


if __name__ == '__main__':
  sys.exit(main())
