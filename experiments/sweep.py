r"""Privacy-utility frontier on the phantom federation: Dice vs target ε for DP-FL and ADP-FL.

  python experiments/sweep.py --out runs/sweep                      # = make sweep
  python experiments/sweep.py --out /tmp/sweep --smoke               # 2 ε × 2 seeds, small
  python experiments/sweep.py --epsilons 1 4 --seeds 0 --set fed.rounds=20
  python experiments/sweep.py … --coordinator_address=HOST:PORT --num_processes=N --process_id=I

With the distributed flags (one command per process, or ``--distributed`` inside ``srun``) every
group's step runs over the devices of all processes (``adpfl_jax/distributed.py``); process 0
writes every file.

The grid is ε (default 0.5 1 2 4 8) × seed (default 0 1 2) × method (dpfl, adpfl), plus one
NP-FL reference run per seed, all built from ``experiments/compare.py``'s ``get_config`` with the
target ε overridden (``--smoke`` uses its smoke variant). Every trial trains on the same
federation (built once from ``--data-seed``, default the first seed); seeds vary the model init,
client sampling, Poisson batches and DP noise. Trials that differ only in seed and privacy
parameters are trained together by ``adpfl_jax.sweep.run_trials`` (one jitted step per round for
the whole group); ``--sequential`` trains them one after another instead.

Each trial writes ``<out>/<method>/eps_<ε>/seed_<s>`` (NP-FL: ``<out>/npfl/seed_<s>``) like
``adpfl train``; a trial whose workdir already holds a ``summary.json`` of the same config is
not retrained (``--fresh`` retrains). Writes ``<out>/frontier.csv`` (method, epsilon_target,
seed, dice, epsilon_spent; ε spent is the max over silos) and ``<out>/frontier.png`` (mean Dice ±
std over seeds vs target ε, one line per method, NP-FL dashed), and prints the table.

``--private-selection GAMMA[,SHAPE]`` instead runs, for every target ε, a private selection of the
best config (Papernot & Steinke 2022; ``adpfl_jax/privacy/selection.py``): the number of trials K
is drawn from the truncated negative binomial D_{SHAPE,GAMMA} (SHAPE = 1, the default: geometric,
E[K] = 1/GAMMA) with public randomness (``--selection-seed``), each trial is a uniformly drawn
(method, seed), and the best by Dice is selected. Its trials pad batches to 10 standard
deviations above the mean (``privacy.max_batch_sigmas``) so truncation barely touches δ. ``<out>/selection.json`` and the printed table
give each trial's ε next to the ε per silo of the whole selection (the theorem's RDP bound over
every candidate's planned ledger, converted at the same δ). Only that total covers publishing the
selected model.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

import numpy as np

if 'XLA_FLAGS' not in os.environ:
  # One host device per core: on CPU a sweep group splits its trials over them (a single small
  # trial keeps about one core busy); accelerators are unaffected.
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={os.cpu_count() or 1}'

HERE = os.path.dirname(os.path.abspath(__file__))
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
SEEDS = (0, 1, 2)
SMOKE_EPSILONS = (2.0, 8.0)
SMOKE_SEEDS = (0, 1)
METHODS = ('dpfl', 'adpfl')
REFERENCE = 'npfl'
COLUMNS = ('method', 'epsilon_target', 'seed', 'dice', 'epsilon_spent')
SELECTION_BATCH_SIGMAS = 10.0  # padded batch of private-selection trials (see run_selection)


def load_compare():
  """``experiments/compare.py`` as a module (experiments/ is not a package)."""
  from adpfl_jax.configs import loading  # pylint: disable=g-import-not-at-top
  return loading.module(os.path.join(HERE, 'compare.py'))


def workdir_of(out: str, method: str, epsilon: float, seed: int) -> str:
  if math.isinf(epsilon):
    return os.path.join(out, method, f'seed_{seed}')
  return os.path.join(out, method, f'eps_{epsilon:g}', f'seed_{seed}')


def finished_summary(workdir: str, config):
  """The summary of a finished trial with the same config, or None."""
  from adpfl_jax.configs import identity  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(workdir, 'summary.json')) as f:
      summary = json.load(f)
    with open(os.path.join(workdir, 'config.json')) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None
  if identity.config_differences(saved, identity.config_dict(config)):
    return None
  return summary


def frontier_rows(cells, summaries) -> list[dict]:
  from adpfl_jax import jsonio  # pylint: disable=g-import-not-at-top
  return [{'method': c['method'], 'epsilon_target': c['epsilon'], 'seed': c['seed'],
           'dice': float(s['dice']), 'epsilon_spent': jsonio.unbounded(s['epsilon'])}
          for c, s in zip(cells, summaries)]


def write_csv(rows, path: str) -> None:
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({k: r[k] for k in COLUMNS})


def aggregate(rows) -> list[dict]:
  """Mean ± std (over seeds) Dice and max ε spent per (method, target ε)."""
  keys = []
  for r in rows:
    k = (r['method'], r['epsilon_target'])
    if k not in keys:
      keys.append(k)
  out = []
  for method, eps in keys:
    sel = [r for r in rows if r['method'] == method and r['epsilon_target'] == eps]
    dice = np.array([r['dice'] for r in sel])
    out.append({'method': method, 'epsilon_target': eps, 'dice_mean': float(dice.mean()),
                'dice_std': float(dice.std(ddof=1)) if len(dice) > 1 else 0.0,
                'epsilon_spent': float(max(r['epsilon_spent'] for r in sel)), 'n': len(sel)})
  return out


def format_table(agg, title: str = '') -> str:
  lines = [f'## {title}', ''] if title else []
  lines += ['| method | target ε | Dice (mean ± std) | ε spent (max) | seeds |',
            '|---|---|---|---|---|']
  for a in agg:
    eps = '∞' if math.isinf(a['epsilon_target']) else f"{a['epsilon_target']:g}"
    spent = '∞' if math.isinf(a['epsilon_spent']) else f"{a['epsilon_spent']:.3f}"
    lines.append(f"| {a['method']} | {eps} | {a['dice_mean']:.4f} ± {a['dice_std']:.4f} | "
                 f"{spent} | {a['n']} |")
  return '\n'.join(lines) + '\n'


def plot_frontier(agg, path: str, title: str = '') -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  private = [a for a in agg if not math.isinf(a['epsilon_target'])]
  names = list(dict.fromkeys(a['method'] for a in private))
  for j, method in enumerate(names):
    pts = sorted((a for a in private if a['method'] == method), key=lambda a: a['epsilon_target'])
    shift = 1.0 + 0.03 * (j - (len(names) - 1) / 2)  # side by side, so error bars stay visible
    ax.errorbar([a['epsilon_target'] * shift for a in pts], [a['dice_mean'] for a in pts],
                yerr=[a['dice_std'] for a in pts], marker='o', capsize=3, label=method)
  for a in agg:
    if math.isinf(a['epsilon_target']):
      line = ax.axhline(a['dice_mean'], linestyle='--', color='gray',
                        label=f"{a['method']} (ε = ∞)")
      if a['dice_std'] > 0:
        ax.axhspan(a['dice_mean'] - a['dice_std'], a['dice_mean'] + a['dice_std'],
                   color=line.get_color(), alpha=0.12)
  if private:
    ax.set_xscale('log')
    ax.minorticks_off()
    ticks = sorted({a['epsilon_target'] for a in private})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f'{t:g}' for t in ticks])
  ax.set_xlabel('target ε per silo')
  ax.set_ylabel('pooled test Dice (mean ± std over seeds)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description='Privacy-utility frontier (Dice vs ε) on the phantom '
                                           'federation.')
  ap.add_argument('--out', default='runs/sweep')
  ap.add_argument('--epsilons', nargs='+', type=float, default=None,
                  help=f'target ε values (default {EPSILONS}; --smoke: {SMOKE_EPSILONS})')
  ap.add_argument('--seeds', nargs='+', type=int, default=None,
                  help=f'seeds (default {SEEDS}; --smoke: {SMOKE_SEEDS})')
  ap.add_argument('--methods', nargs='+', default=list(METHODS), choices=('dpfl', 'adpfl'))
  ap.add_argument('--no-reference', action='store_true', help='skip the NP-FL runs')
  ap.add_argument('--smoke', action='store_true', help="compare.py's smoke-sized runs")
  ap.add_argument('--data-seed', type=int, default=None, help='federation seed (default: the '
                  'first seed)')
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                  help='config override for every trial (repeatable)')
  ap.add_argument('--sequential', action='store_true', help='train trials one after another')
  ap.add_argument('--trial-axis', default='auto', choices=('auto', 'vmap', 'map'))
  ap.add_argument('--fresh', action='store_true', help='retrain trials that already finished')
  from adpfl_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.add_arguments(ap)
  ap.add_argument('--private-selection', metavar='GAMMA[,SHAPE]', default=None,
                  help='private selection with K ~ truncated negative binomial (SHAPE 1 = '
                       'geometric, E[K] = 1/GAMMA) trials per target ε')
  ap.add_argument('--selection-seed', type=int, default=0, help='public seed of K and the draws')
  args = ap.parse_args(argv)
  try:
    distributed.initialize(distributed.parse_flags({k: getattr(args, k) for k in (
        'coordinator_address', 'num_processes', 'process_id', 'distributed')}))
  except distributed.DistributedError as err:
    ap.error(str(err))
  epsilons = args.epsilons or list(SMOKE_EPSILONS if args.smoke else EPSILONS)
  seeds = args.seeds or list(SMOKE_SEEDS if args.smoke else SEEDS)

  from adpfl_jax import sweep  # pylint: disable=g-import-not-at-top
  from adpfl_jax.data import federated  # pylint: disable=g-import-not-at-top
  from adpfl_jax.configs import loading  # pylint: disable=g-import-not-at-top
  compare = load_compare()

  def make(method, seed):
    c = compare.get_config(f'method={method},seed={seed}' + (',smoke' if args.smoke else ''))
    loading.apply_overrides(c, args.set)
    return c

  if args.private_selection:
    return run_selection(args, make, epsilons, seeds)
  methods = list(args.methods) + ([] if args.no_reference else [REFERENCE])
  cells = sweep.grid_configs(make, methods, epsilons, seeds)
  data_cfgs = {c['config'].data.to_json_best_effort(sort_keys=True) for c in cells}
  if len(data_cfgs) != 1:
    raise ValueError('experiments/sweep.py: the trials do not share one data config')
  data_seed = seeds[0] if args.data_seed is None else args.data_seed
  data = federated.load(cells[0]['config'].data, data_seed)

  summaries = [None] * len(cells)
  todo = []
  for i, c in enumerate(cells):
    c['workdir'] = workdir_of(args.out, c['method'], c['epsilon'], c['seed'])
    done = None if args.fresh else finished_summary(c['workdir'], c['config'])
    if done is not None:
      summaries[i] = done
    else:
      todo.append(i)
  distributed.sync('sweep_checked_workdirs')  # before process 0 clears a workdir
  print(f'{len(cells)} trials ({len(cells) - len(todo)} already done), '
        f'{"sequential" if args.sequential else "vectorized"}', flush=True)
  if todo:
    got = sweep.run_trials([cells[i]['config'] for i in todo], [cells[i]['workdir'] for i in todo],
                           data=data, vectorize=not args.sequential, trial_axis=args.trial_axis)
    for i, s in zip(todo, got):
      summaries[i] = s

  rows = frontier_rows(cells, summaries)
  if not distributed.is_lead():
    return 0  # process 0 writes the frontier
  os.makedirs(args.out, exist_ok=True)
  write_csv(rows, os.path.join(args.out, 'frontier.csv'))
  agg = aggregate(rows)
  delta = cells[0]['config'].privacy.delta
  title = f'Phantom skin federation, δ = {delta:g} per silo, seeds {seeds}'
  plot_frontier(agg, os.path.join(args.out, 'frontier.png'), title)
  print('\n' + format_table(agg, title))
  private = [c['workdir'] for c in cells if not math.isinf(c['epsilon'])]
  if private:
    from adpfl_jax import jsonio  # pylint: disable=g-import-not-at-top
    # Each trial's ε covers that trial alone; publishing the whole frontier composes them all.
    total = sweep.composed_epsilons(private, delta)
    jsonio.write(os.path.join(args.out, 'sweep_privacy.json'), {
        'trials': len(private), 'delta': delta, 'epsilon_per_silo_all_trials': total,
        'note': 'each trial\'s epsilon covers that trial; releasing every private trial of this '
                'sweep is covered by epsilon_per_silo_all_trials (RDP composition)'}, indent=2)
    print(f'Releasing all {len(private)} private trials together: ε per silo ≤ '
          + ', '.join(f'{e:.3g}' for e in total) + f' at δ = {delta:g} (sweep_privacy.json)')
  print(f"wrote {os.path.join(args.out, 'frontier.csv')} and frontier.png")
  return 0


def parse_selection(text: str) -> tuple[float, float]:
  parts = [float(v) for v in text.split(',')]
  if len(parts) not in (1, 2):
    raise ValueError(f'--private-selection takes GAMMA or GAMMA,SHAPE; got {text!r}')
  return parts[0], (parts[1] if len(parts) == 2 else 1.0)


def selection_table(results, gamma: float, shape: float) -> str:
  lines = [f'## Private selection, K ~ D(shape = {shape:g}, γ = {gamma:g}) trials per target ε', '',
           '| target ε | trial | method | seed | Dice | ε of this trial (max silo) | '
           'ε of the selection (max silo) | selected |', '|---|---|---|---|---|---|---|---|']
  for res in results:
    for j, t in enumerate(res['trials']):
      lines.append(f"| {res['epsilon_target']:g} | {j} | {t['method']} | {t['seed']} | "
                   f"{t['dice']:.4f} | {t['epsilon']:.3f} | "
                   f"{max(res['epsilon_selection_per_silo']):.3f} | "
                   f"{'yes' if j == res['selected'] else ''} |")
  return '\n'.join(lines) + '\n'


def run_selection(args, make, epsilons, seeds) -> int:
  """Private selection (see the module docstring): trains K random trials per target ε."""
  from adpfl_jax import jsonio  # pylint: disable=g-import-not-at-top
  from adpfl_jax import sweep  # pylint: disable=g-import-not-at-top
  from adpfl_jax.data import federated  # pylint: disable=g-import-not-at-top
  from adpfl_jax.federated import sampling  # pylint: disable=g-import-not-at-top
  from adpfl_jax.privacy import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from adpfl_jax.privacy import selection  # pylint: disable=g-import-not-at-top
  gamma, shape = parse_selection(args.private_selection)
  methods = list(args.methods)
  data_seed = seeds[0] if args.data_seed is None else args.data_seed
  results = []
  for eps in epsilons:
    def config(method, seed, eps=eps):
      c = make(method, seed)
      c.privacy.target_epsilon = float(eps)
      # Truncated batches enter the selection's bound as E[K]·η·(1 + e^ε) on δ (RDP has no
      # truncated event): pad 10 sd above the mean so η per step is ~1e-17, not ~1e-5.
      c.privacy.max_batch_sigmas = max(float(c.privacy.max_batch_sigmas), SELECTION_BATCH_SIGMAS)
      return c

    # Q = a public uniform draw of (method, seed), then training: its RDP per silo is at most
    # the largest of every candidate's planned ledger (docs/frontier.md §5).
    candidates = []
    data = federated.load(config(methods[0], seeds[0]).data, data_seed)
    for method in methods:
      for seed in seeds:
        c = config(method, seed)
        part = sampling.participation(int(c.seed), int(c.fed.rounds), data.num_clients,
                                      int(c.fed.clients_per_round))
        plan = plan_lib.PrivacyPlan.from_config(c, data.sizes, part)
        candidates.append([plan.silos[k].runs(plan.noise_scale[k])
                           for k in range(data.num_clients)])
    delta = float(config(methods[0], seeds[0]).privacy.delta)
    total = [selection.selection_epsilon([cand[k] for cand in candidates], delta, gamma, shape)
             for k in range(data.num_clients)]
    rng = np.random.default_rng([args.selection_seed, int(round(eps * 1000))])
    k_trials = selection.sample_trials(rng, gamma, shape)
    draws = [(methods[int(rng.integers(len(methods)))], int(seeds[int(rng.integers(len(seeds)))]))
             for _ in range(k_trials)]
    workdirs = [os.path.join(args.out, 'selection', f'eps_{eps:g}', f'trial_{j}_{m}_seed_{s}')
                for j, (m, s) in enumerate(draws)]
    summaries = sweep.run_trials([config(m, s) for m, s in draws], workdirs, data=data,
                                 vectorize=not args.sequential, trial_axis=args.trial_axis)
    trials = [{'method': m, 'seed': s, 'dice': float(r['dice']), 'epsilon': float(r['epsilon']),
               'workdir': w} for (m, s), r, w in zip(draws, summaries, workdirs)]
    best = int(np.argmax([t['dice'] for t in trials]))
    results.append({'epsilon_target': float(eps), 'trials': trials, 'selected': best,
                    'expected_trials': selection.expected_trials(gamma, shape),
                    'epsilon_selection_per_silo': total, 'delta': delta})
  os.makedirs(args.out, exist_ok=True)
  jsonio.write(os.path.join(args.out, 'selection.json'), {
      'gamma': gamma, 'shape': shape, 'selection_seed': args.selection_seed, 'results': results,
      'note': 'publishing the selected trial is covered by epsilon_selection_per_silo '
              '(Papernot & Steinke 2022, Thm 2, RDP); a trial\'s own epsilon covers that trial '
              'alone'}, indent=2)
  print('\n' + selection_table(results, gamma, shape))
  print(f"wrote {os.path.join(args.out, 'selection.json')}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
