r"""Empirical privacy audit of DP-FL on the built-in phantom federation: ε lower bound vs accounted ε.

  python experiments/audit.py --out runs/audit                  # = make audit (~8 min on 2 cores)
  python experiments/audit.py --out /tmp/audit --smoke          # about a minute
  adpfl audit --workdir runs/audit/eps_8/seed_0                  # one run's audit, per silo

The quickstart DP-FL run (4 silos × 256 images, 60 rounds × 4 local steps, batch 32) at target
ε = 1, 4 and 8 (δ = 1e-5 per silo), plus NP-FL, each with the one-run audit on: 1,000 gradient
canaries per silo, each included with probability ½ (``adpfl_jax/privacy/audit.py``). Each run
reports the largest ε its canary scores refute at 95% confidence (Steinke, Nasr & Jagielski 2023):
a lower bound that must stay at or below the accounted ε of a correct implementation, while a
non-private run should show a clearly positive one.

Writes ``<out>/audit.json`` (one row per run: ``target_epsilon`` (null for NP-FL), ``epsilon``
(accounted, max over silos; null = ∞), ``epsilon_lower_bound`` (max over silos), ``canaries``
(per silo), ``dice``, ``consistent``) and ``<out>/table.md``.
"""

import argparse
import json
import os
import sys

from adpfl_jax.configs import common
from adpfl_jax.configs import default

TARGETS = (1.0, 4.0, 8.0)
CANARIES = 1000


def get_config(arg=None):
  args = common.parse_arg(arg, epsilon=8.0, private=True, seed=0, smoke=False)
  c = default.get_config()
  c.seed = args.seed
  c.eval.every_rounds = 10
  c.privacy.target_epsilon = args.epsilon
  c.privacy.audit.enabled = True
  c.privacy.audit.canaries = CANARIES
  if not args.private:
    c.privacy.mode = 'none'
  if args.smoke:
    c.data.num_clients = 2
    c.data.examples_per_client = 32
    c.data.test_examples_per_client = 4
    c.data.image_size = 8
    c.model.features = 4
    c.model.depth = 1
    c.model.groups = 2
    c.fed.rounds = 10  # (10 rounds × 2 steps at q = ½ and 1,000 canaries: enough audit power
    c.fed.local_steps = 2  # to refute ε = 1 when the noise is 10× too small, tests/privacy)
    c.fed.clients_per_round = 2
    c.privacy.batch_size = 16
    c.privacy.accountant = 'rdp'
    c.eval.every_rounds = 5
    c.eval.surface_metrics = False
    c.eval.tensorboard = False
    c.checkpoint.every_rounds = 0
    c.log.progress = False
  c.lock()
  return c


def _method(target):
  return 'npfl' if target is None else f'eps_{target:g}'


def rows(out, targets, seed):
  """One row per run, read from its ``audit.json`` and ``summary.json``."""
  from adpfl_jax import jsonio  # pylint: disable=g-import-not-at-top
  table = []
  for target in list(targets) + [None]:
    workdir = os.path.join(out, _method(target), f'seed_{seed}')
    with open(os.path.join(workdir, 'audit.json')) as f:
      audit = json.load(f)
    with open(os.path.join(workdir, 'summary.json')) as f:
      summary = json.load(f)
    table.append({'target_epsilon': target, 'epsilon': jsonio.unbounded(summary['epsilon']),
                  'epsilon_lower_bound': audit['epsilon_lower_bound'],
                  'canaries': audit['canaries_per_silo'], 'dice': summary['dice'],
                  'consistent': audit['consistent'], 'confidence': audit['confidence'],
                  'workdir': workdir})
  return table


def markdown(table, title):
  lines = [f'## {title}', '',
           '| run | accounted ε (max silo) | audited ε lower bound (max silo, 95%) | canaries / silo '
           '| Dice | lower bound ≤ ε |', '|---|---|---|---|---|---|']
  for r in table:
    name = 'NP-FL' if r['target_epsilon'] is None else f"DP-FL, target ε = {r['target_epsilon']:g}"
    eps = '∞' if r['epsilon'] == float('inf') else f"{r['epsilon']:.3f}"
    lines.append(f"| {name} | {eps} | {r['epsilon_lower_bound']:.3f} | {r['canaries']} | "
                 f"{r['dice']:.4f} | {'yes' if r['consistent'] else '**NO**'} |")
  return '\n'.join(lines) + '\n'


def main(argv=None):
  ap = argparse.ArgumentParser(description='One-run privacy audit of DP-FL at several ε.')
  ap.add_argument('--out', default='runs/audit')
  ap.add_argument('--targets', nargs='+', type=float, default=list(TARGETS))
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--smoke', action='store_true')
  ap.add_argument('--fresh', action='store_true', help='retrain runs that already finished')
  args = ap.parse_args(argv)
  from adpfl_jax import jsonio  # pylint: disable=g-import-not-at-top
  from adpfl_jax import studies  # pylint: disable=g-import-not-at-top
  by_method = {_method(t): t for t in list(args.targets) + [None]}
  smoke = ',smoke' if args.smoke else ''

  def make(method, seed):
    target = by_method[method]
    if target is None:
      return get_config(f'private=False,seed={seed}{smoke}')
    return get_config(f'epsilon={target},seed={seed}{smoke}')

  os.makedirs(args.out, exist_ok=True)
  studies.run_grid(make, list(by_method), [args.seed], args.out, reuse=not args.fresh)
  table = rows(args.out, args.targets, args.seed)
  cfg = make(_method(args.targets[0]), args.seed)
  title = (f'One-run privacy audit, phantom skin federation, δ = {cfg.privacy.delta:g} per silo, '
           f'seed {args.seed}')
  text = markdown(table, title)
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(text)
  jsonio.write(os.path.join(args.out, 'audit.json'),
               [{k: v for k, v in r.items() if k != 'workdir'} for r in table], indent=2)
  print('\n' + text)
  print(f"wrote {os.path.join(args.out, 'table.md')} and audit.json")
  return 0 if all(r['consistent'] for r in table) else 1


if __name__ == '__main__':
  sys.exit(main())
