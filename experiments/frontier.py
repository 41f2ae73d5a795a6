r"""The privacy-utility frontier, technique by technique (docs/frontier.md).

  python experiments/frontier.py --out runs/frontier                 # = make frontier
  python experiments/frontier.py --out /tmp/fr --smoke               # = make frontier SMOKE=1
  adpfl train --config=experiments/frontier.py:method=dpfl,techniques=aug+ema --workdir=W

An ablation at (ε = 1, δ = 1e-5) per silo on the phantom (quickstart) federation: NP-FL, DP-FL
and ADP-FL (``experiments/compare.py``'s methods, unchanged), then each technique added alone and
all together to DP-FL and to ADP-FL. Every technique uses one fixed setting chosen before any run
(no per-method tuning: every method gets the same budget, zero):

* ``aug``      — augmentation multiplicity k = 4 (flips, shifts ≤ 2 px; averaged before the clip);
* ``ema``      — EMA (decay 0.9, warm-up) of the released global models (post-processing);
* ``fedavgm``  — server momentum 0.7 with server lr 0.3 (steady-state step = FedAvg's);
* ``fedadam``  — FedAdam, server lr 0.01 (β₁ 0.9, β₂ 0.99, ε 1e-3);
* ``pretrain`` — init from a model trained non-privately on a DISJOINT phantom federation (its own
  seed, never the private silos; ``experiments/pretrain.py``), loaded from an orbax checkpoint;
* ``all``      — every technique above except ``fedavgm`` (one server optimizer at a time).

The full mode also runs the best combination and DP-FL over ε ∈ {0.5, 1, 2, 4, 8} (Dice vs ε plot)
and KiTS23 / BraTS 2024 smoke-size rows at ε = 8 (``experiments/paper/config.py``; no ``pretrain``
there: no public 3D model). Writes ``<out>/table.md``, ``<out>/frontier.json`` (rows: ``method``,
``techniques``, ``epsilon``, ``dice_mean``, ``dice_std``, ``gap_recovered`` and more) and
``<out>/dice_vs_epsilon.png`` (``--smoke`` trains under ``<out>/smoke/``). ``gap_recovered`` =
(Dice − DP-FL) / (NP-FL − DP-FL), means over seeds, on the same task and ε.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TECHNIQUES = ('aug', 'ema', 'fedavgm', 'fedadam', 'pretrain')
ALL = ('aug', 'ema', 'fedadam', 'pretrain')
EPSILON = 1.0
SWEEP_EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0)
SMOKE_SWEEP_EPSILONS = (1.0, 8.0)
BATCHES = (8, 16, 32, 64, 128)
SMOKE_BATCHES = (8, 32)
MEDICAL_TASKS = ('kits23', 'brats2024')
MEDICAL_EPSILON = 8.0


def _load(name):
  """A module of experiments/ (not a package) by file name."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(HERE, name)
  spec = importlib.util.spec_from_file_location(
      'frontier_' + name.replace('/', '_').removesuffix('.py'), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_techniques(text: str) -> tuple[str, ...]:
  """``'aug+ema'`` → ('aug', 'ema'); ``'all'`` → ``ALL``; ``''`` / ``'none'`` → ()."""
  if text in ('', 'none'):
    return ()
  names = ALL if text == 'all' else tuple(t for t in text.split('+') if t)
  for t in names:
    if t not in TECHNIQUES:
      raise ValueError(f'technique {t!r} is not one of {TECHNIQUES} (or all)')
  if 'fedavgm' in names and 'fedadam' in names:
    raise ValueError('fedavgm and fedadam are both server optimizers: pick one')
  return names


def apply_techniques(c, techniques, *, pretrained: str = '') -> None:
  """Switches the techniques on in config ``c`` (unlocked). Only public choices change."""
  for t in techniques:
    if t == 'aug':
      c.privacy.augment_multiplicity = 4
    elif t == 'ema':
      c.fed.param_averaging = 'ema'
      c.fed.ema_decay = 0.9
    elif t == 'fedavgm':
      c.fed.server_optimizer = 'fedavgm'
      c.fed.server_lr = 0.3
      c.fed.server_momentum = 0.7
    elif t == 'fedadam':
      c.fed.server_optimizer = 'fedadam'
      c.fed.server_lr = 0.01
    elif t == 'pretrain':
      if not pretrained:
        raise ValueError('technique pretrain needs a public checkpoint (pretrained=PATH; '
                         'experiments/pretrain.py writes one)')
      c.model.init_checkpoint = pretrained
    else:
      raise ValueError(f'unknown technique {t!r}')


def smoke_size(c) -> None:
  """Minutes on 2 CPU cores for the whole ablation: small images, a tiny U-Net, few rounds."""
  c.data.examples_per_client = 64
  c.data.test_examples_per_client = 16
  c.data.image_size = 16
  c.model.features = 4
  c.model.depth = 1
  c.model.groups = 2
  c.fed.rounds = 8
  c.fed.local_steps = 2
  c.privacy.batch_size = 16
  c.eval.every_rounds = 2
  c.eval.surface_metrics = False
  c.eval.tensorboard = False
  c.checkpoint.every_rounds = 0
  c.log.progress = False


def get_config(arg=None):
  from adpfl_jax.configs import common  # pylint: disable=g-import-not-at-top
  args = common.parse_arg(arg, method='dpfl', techniques='', seed=0, smoke=False,
                          epsilon=EPSILON, pretrained='')
  c = _load('compare.py').get_config(f'method={args.method},seed={args.seed}')
  c.unlock()
  c.privacy.target_epsilon = float(args.epsilon)
  if args.smoke:
    smoke_size(c)
  apply_techniques(c, parse_techniques(args.techniques), pretrained=args.pretrained)
  c.lock()
  return c


# ------------------------------------------------------------------------------------------------
# The table and frontier.json (pure functions of the runs' summaries; tests/experiments).
# ------------------------------------------------------------------------------------------------
def frontier_rows(cells) -> list[dict]:
  """One row per (task, method, techniques, ε) from cells ``{task, method, techniques, epsilon,
  runs}`` (``runs``: ``studies.summarise_run`` dicts, one per seed). ``gap_recovered`` is the
  share of the DP-FL → NP-FL Dice gap (same task, same ε; NP-FL from its own cell) a row closes."""
  def mean(runs):
    return float(np.mean([r['dice'] for r in runs]))

  ref = {}
  for c in cells:
    if c['method'] == 'npfl':
      ref[(c['task'], 'np')] = mean(c['runs'])
    if c['method'] == 'dpfl' and not c['techniques']:
      ref[(c['task'], 'dp', c['epsilon'])] = mean(c['runs'])
  rows = []
  for c in cells:
    dice = np.array([r['dice'] for r in c['runs']], np.float64)
    np_d = ref.get((c['task'], 'np'))
    dp_d = ref.get((c['task'], 'dp', c['epsilon']))
    gap = None
    if c['method'] != 'npfl' and np_d is not None and dp_d is not None and np_d > dp_d:
      gap = float((dice.mean() - dp_d) / (np_d - dp_d))
    spent = [r['epsilon'] for r in c['runs']]
    rows.append({
        'task': c['task'], 'method': c['method'], 'techniques': list(c['techniques']),
        'epsilon': None if c['method'] == 'npfl' else float(c['epsilon']),
        'epsilon_spent': None if not all(math.isfinite(e) for e in spent) else float(max(spent)),
        'dice_mean': float(dice.mean()),
        'dice_std': float(dice.std(ddof=1)) if len(dice) > 1 else 0.0,
        'gap_recovered': gap,
        'rounds_to_95': float(np.mean([r['rounds_to_95'] for r in c['runs']])),
        'seeds': len(dice),
    })
  return rows


LABELS = {'npfl': 'NP-FL', 'dpfl': 'DP-FL', 'adpfl': 'ADP-FL'}


def format_table(rows, title: str = '') -> str:
  lines = [f'## {title}', ''] if title else []
  lines += ['| task | method | techniques | ε target | ε spent (max silo) | Dice (mean ± std) | '
            'rounds to 95% | gap recovered | seeds |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    eps = '∞' if r['epsilon'] is None else f"{r['epsilon']:g}"
    spent = '∞' if r['epsilon_spent'] is None else f"{r['epsilon_spent']:.3f}"
    gap = '—' if r['gap_recovered'] is None else f"{100 * r['gap_recovered']:.0f}%"
    lines.append(f"| {r['task']} | {LABELS.get(r['method'], r['method'])} | "
                 f"{'+'.join(r['techniques']) or '—'} | {eps} | {spent} | "
                 f"{r['dice_mean']:.4f} ± {r['dice_std']:.4f} | {r['rounds_to_95']:.1f} | {gap} | "
                 f"{r['seeds']} |")
  return '\n'.join(lines) + '\n'


def best_combination(rows, task: str = 'phantom', epsilon: float = EPSILON):
  """The private (method, techniques) with the highest mean Dice at ``epsilon`` on ``task``."""
  private = [r for r in rows if r['task'] == task and r['epsilon'] == epsilon]
  return max(private, key=lambda r: r['dice_mean']) if private else None


def plot_dice_vs_epsilon(rows, path: str, title: str = '') -> None:
  """Dice vs ε per (method, techniques) over the sweep rows, NP-FL dashed (``sweep.plot_frontier``)."""
  sweep_mod = _load('sweep.py')
  agg = []
  for r in rows:
    name = LABELS.get(r['method'], r['method']) + (f" + {'+'.join(r['techniques'])}"
                                                   if r['techniques'] else '')
    agg.append({'method': name, 'dice_mean': r['dice_mean'], 'dice_std': r['dice_std'],
                'epsilon_target': math.inf if r['epsilon'] is None else r['epsilon']})
  sweep_mod.plot_frontier(agg, path, title)


# ------------------------------------------------------------------------------------------------
# Batch size / steps at fixed (ε, δ).
# ------------------------------------------------------------------------------------------------
def planned_epsilon(config, sizes, noise_multiplier: float) -> float:
  """ε (max over silos) of ``config``'s planned run at a given constant noise multiplier, from
  the same plan and ledger code training uses (``PrivacyPlan``, ``SiloPlan.runs``, ``Ledger``)."""
  from adpfl_jax.federated import sampling  # pylint: disable=g-import-not-at-top
  from adpfl_jax.privacy import accounting  # pylint: disable=g-import-not-at-top
  from adpfl_jax.privacy import calibration  # pylint: disable=g-import-not-at-top
  from adpfl_jax.privacy import plan as plan_lib  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  c.privacy.calibrate = False
  c.privacy.noise_multiplier = float(noise_multiplier)
  c.log.progress = False
  part = sampling.participation(int(c.seed), int(c.fed.rounds), len(sizes),
                                int(c.fed.clients_per_round))
  plan = plan_lib.PrivacyPlan.from_config(c, sizes, part)
  eps = []
  for silo in plan.silos:
    # The coarse PLD grid is still an upper bound (calibration's search uses it too); training
    # recalibrates σ for the chosen plan at the fine grid anyway.
    ledger = accounting.Ledger(plan.accountant, pld_discretization=calibration.COARSE_PLD)
    ledger.extend(silo.runs(plan.noise_scale[0]))
    eps.append(ledger.epsilon(plan.delta))
  return float(max(eps))


def rounds_at_budget(make_config, sizes, noise_multiplier: float, max_rounds: int) -> int:
  """The most rounds (≤ ``max_rounds``) whose planned ε at ``noise_multiplier`` stays within
  the target: ``make_config(rounds)`` is the config with that many rounds (ε grows with rounds)."""
  def fits(r):
    c = make_config(r)
    return planned_epsilon(c, sizes, noise_multiplier) <= c.privacy.target_epsilon
  lo, hi = 0, int(max_rounds)
  if fits(hi):
    return hi
  while hi - lo > 1:  # fits(lo) (or lo = 0), not fits(hi)
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def batch_tradeoff_specs(base, sizes, batches, reference_sigma: float):
  """``(batch, rounds)`` pairs at the reference σ: each batch gets the most rounds that keep
  the planned ε on target; training then calibrates σ for exactly that plan (≤ the reference)."""
  out = []
  for m in batches:
    def make(r, m=m):
      c = base.copy_and_resolve_references()
      c.privacy.batch_size = int(m)
      c.fed.rounds = max(1, int(r))
      return c
    r = rounds_at_budget(make, sizes, reference_sigma, 8 * int(base.fed.rounds))
    if r >= 1:
      out.append((int(m), int(r)))
  return out


# ------------------------------------------------------------------------------------------------
def _run_cells(specs, make, out, seeds, fresh):
  """Trains every spec (``name → (task, method, techniques, epsilon)``) over the seeds."""
  from adpfl_jax import studies  # pylint: disable=g-import-not-at-top
  names = list(specs)
  results = studies.run_grid(lambda name, seed: make(specs[name], seed), names, seeds, out,
                             reuse=not fresh)
  return [{'task': specs[n][0], 'method': specs[n][1], 'techniques': specs[n][2],
           'epsilon': specs[n][3], 'runs': results[n]} for n in names]


def cell_name(task, method, techniques, epsilon) -> str:
  tech = '+'.join(techniques) or 'base'
  return f'{task}/{method}_{tech}' + ('' if method == 'npfl' else f'_eps{epsilon:g}')


def main(argv=None):
  ap = argparse.ArgumentParser(description='Technique ablation at fixed (ε, δ) per silo.')
  ap.add_argument('--out', default='runs/frontier')
  ap.add_argument('--seeds', nargs='+', type=int, default=None,
                  help='default 0 1 2 (--smoke: 0)')
  ap.add_argument('--smoke', action='store_true')
  ap.add_argument('--no-sweep', action='store_true', help='skip the Dice-vs-ε runs')
  ap.add_argument('--no-medical', action='store_true', help='skip the KiTS23 / BraTS rows')
  ap.add_argument('--no-batch', action='store_true', help='skip the batch-size / steps sweep')
  ap.add_argument('--only', nargs='+', default=None, metavar='CELL',
                  help='train only the ablation cells named (e.g. npfl_base dpfl_base '
                       'adpfl_pretrain); a gap needs npfl_base and dpfl_base among them')
  ap.add_argument('--fresh', action='store_true', help='retrain runs that already finished')
  args = ap.parse_args(argv)
  seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
  smoke = ',smoke' if args.smoke else ''
  os.makedirs(args.out, exist_ok=True)

  pretrain = _load('pretrain.py')
  # Smoke runs live apart from full ones (same cell names, other configs); the table, plots and
  # frontier.json of the latest invocation go to --out.
  runs_dir = os.path.join(args.out, 'smoke') if args.smoke else args.out
  public = pretrain.ensure(os.path.join(runs_dir, 'public_model'), smoke=args.smoke)

  def make(spec, seed):
    task, method, techniques, eps = spec[:4]
    if task == 'batch':
      c = get_config(f'method={method},seed={seed},epsilon={eps}{smoke}')
      c.unlock()
      c.privacy.batch_size, c.fed.rounds = spec[4]
      c.eval.every_rounds = max(1, c.fed.rounds // 8)
      c.lock()
      return c
    if task == 'phantom':
      return get_config(f"method={method},techniques={'+'.join(techniques) or 'none'},"
                        f"seed={seed},epsilon={eps}{smoke},pretrained={public}")
    paper = _load('paper/config.py')
    c = paper.get_config(f'task={task},method={method},seed={seed},smoke')
    c.unlock()
    c.privacy.target_epsilon = float(eps)
    apply_techniques(c, techniques)
    c.lock()
    return c

  specs = {}

  def add(task, method, techniques, eps):
    specs[cell_name(task, method, techniques, eps)] = (task, method, tuple(techniques), eps)

  add('phantom', 'npfl', (), EPSILON)
  for method in ('dpfl', 'adpfl'):
    add('phantom', method, (), EPSILON)
    for t in TECHNIQUES:
      add('phantom', method, (t,), EPSILON)
    add('phantom', method, ALL, EPSILON)
  if args.only:
    keep = set(args.only)
    specs = {n: v for n, v in specs.items()
             if n.split('/')[1].removesuffix(f'_eps{EPSILON:g}') in keep}
  cells = _run_cells(specs, make, runs_dir, seeds, args.fresh)
  rows = frontier_rows(cells)
  best = best_combination(rows)
  print(f"best combination at ε = {EPSILON:g}: {best['method']} + {'+'.join(best['techniques'])}")

  sweep_rows = []
  if not args.no_sweep:
    eps_grid = SMOKE_SWEEP_EPSILONS if args.smoke else SWEEP_EPSILONS
    specs = {}
    add('phantom', 'npfl', (), EPSILON)
    for eps in eps_grid:
      add('phantom', 'dpfl', (), eps)
      add('phantom', best['method'], best['techniques'], eps)
    sweep_rows = frontier_rows(_run_cells(specs, make, runs_dir, seeds, args.fresh))
    plot_dice_vs_epsilon(sweep_rows, os.path.join(args.out, 'dice_vs_epsilon.png'),
                         f'Phantom federation, δ = 1e-5 per silo, seeds {seeds}')

  batch_rows = []
  if not args.no_batch:
    from adpfl_jax.data import federated  # pylint: disable=g-import-not-at-top
    from adpfl_jax.federated import sampling  # pylint: disable=g-import-not-at-top
    from adpfl_jax.privacy import plan as plan_lib  # pylint: disable=g-import-not-at-top
    base = get_config(f'method=dpfl,seed={seeds[0]},epsilon={EPSILON}{smoke}')
    sizes = federated.load(base.data, seeds[0]).sizes
    part = sampling.participation(int(base.seed), int(base.fed.rounds), len(sizes),
                                  int(base.fed.clients_per_round))
    ref_sigma = float(plan_lib.PrivacyPlan.from_config(base, sizes, part).noise_scale[0])
    specs = {}
    pairs = batch_tradeoff_specs(base, sizes, SMOKE_BATCHES if args.smoke else BATCHES, ref_sigma)
    for m, r in pairs:
      specs[f'batch/dpfl_m{m}_r{r}'] = ('batch', 'dpfl', (f'batch{m}x{r}r',), EPSILON, (m, r))
    batch_cells = _run_cells(specs, make, runs_dir, seeds, args.fresh)
    batch_rows = frontier_rows(batch_cells)
    np_d = next(r['dice_mean'] for r in rows if r['method'] == 'npfl')
    dp_d = next(r['dice_mean'] for r in rows if r['method'] == 'dpfl' and not r['techniques'])
    for row, (m, r) in zip(batch_rows, pairs):
      row.update(batch_size=m, rounds=r, reference_noise_multiplier=ref_sigma,
                 gap_recovered=(row['dice_mean'] - dp_d) / (np_d - dp_d) if np_d > dp_d else None)
    print(f'batch / steps at ε = {EPSILON:g}, reference σ = {ref_sigma:.4f}: {pairs}')

  medical_rows = []
  if not (args.smoke or args.no_medical):
    specs = {}
    for task in MEDICAL_TASKS:
      add(task, 'npfl', (), MEDICAL_EPSILON)
      for method in ('dpfl', 'adpfl'):
        add(task, method, (), MEDICAL_EPSILON)
        add(task, method, ('aug', 'ema', 'fedadam'), MEDICAL_EPSILON)
    medical_rows = frontier_rows(_run_cells(specs, make, runs_dir, seeds, args.fresh))

  from adpfl_jax import jsonio  # pylint: disable=g-import-not-at-top
  jsonio.write(os.path.join(args.out, 'frontier.json'),
               {'ablation': rows, 'epsilon_sweep': sweep_rows, 'medical': medical_rows,
                'batch_tradeoff': batch_rows,
                'seeds': seeds, 'delta': 1e-5, 'smoke': args.smoke,
                'best': {'method': best['method'], 'techniques': best['techniques']}}, indent=2)
  table = format_table(rows, f'Ablation at (ε = {EPSILON:g}, δ = 1e-5) per silo, phantom '
                             f'federation, seeds {seeds}')
  if sweep_rows:
    table += '\n' + format_table(sweep_rows, 'Dice vs ε (best combination, DP-FL, NP-FL)')
  if batch_rows:
    table += '\n' + format_table(batch_rows, f'DP-FL: expected batch m × rounds r at ε = '
                                             f'{EPSILON:g} at the reference σ (technique batchMxRr)')
  if medical_rows:
    table += '\n' + format_table(medical_rows, f'Smoke-size medical tasks at ε = '
                                               f'{MEDICAL_EPSILON:g}')
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(table)
  print('\n' + table)
  print(f"wrote {os.path.join(args.out, 'table.md')}, frontier.json"
        + ('' if args.no_sweep else ' and dice_vs_epsilon.png'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
