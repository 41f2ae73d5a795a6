r"""Runs the paper's 3 × 3 study and writes ``<out>/table.md``, convergence plots and overlays.

  python experiments/paper/run.py --out runs/paper [--seeds 0 1 2] [--smoke] [--data-dir DIR]
      [--set fed.rounds=2 --set eval.every_rounds=1 ...]   # overrides applied to every cell

``--data-dir`` (one directory per task: DIR/ham10000, DIR/kits23, DIR/brats2024) trains on the
real releases; without it every task uses phantoms written in the real layout.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import config as paper  # noqa: E402  pylint: disable=g-import-not-at-top

from adpfl_jax import studies  # noqa: E402
from adpfl_jax.configs import loading  # noqa: E402

LABELS = {'npfl': 'NP-FL', 'dpfl': 'DP-FL', 'adpfl': 'ADP-FL'}


def _ms(values):
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size == 0 or not np.all(np.isfinite(v)):
    return 'n/a' if v.size == 0 else ('∞' if np.all(np.isinf(v)) else 'n/a')
  return f'{v.mean():.3f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.3f}'


def task_table(task, results):
  regions = list(results[next(iter(results))][0]['dice_per_region'])
  head = ['method'] + [f'Dice {r}' for r in regions] + ['HD95 (mm)', 'NSD', 'ε spent', 'rounds']
  lines = [f'### {task}', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for method, runs in results.items():
    cells = [LABELS.get(method, method)]
    cells += [_ms([r['dice_per_region'].get(reg) for r in runs]) for reg in regions]
    cells += [_ms([r['extra'].get('hd95') for r in runs]), _ms([r['extra'].get('nsd') for r in runs]),
              _ms([r['epsilon'] for r in runs]), f"{runs[0]['rounds']}"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def overlay(task, trainers, path):
  """Image, truth and each method's prediction for one test example (middle slice for 3D)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  first = next(iter(trainers.values()))
  data = first.data
  k = int(np.argmax([len(t) for t in data.test_x]))
  ys = data.test_y[k]
  i = int(np.argmax([np.count_nonzero(y) for y in ys]))
  x, y = data.test_x[k][i], ys[i]
  preds = {m: np.asarray(t.predict(t.final_state.params, jnp.asarray(x[None])))[0]
           for m, t in trainers.items()}
  if x.ndim == 4:  # (z, y, x, c): the slice with most foreground
    z = int(np.argmax(np.count_nonzero(y.reshape(y.shape[0], -1), axis=1)))
    x, y, preds = x[z], y[z], {m: p[z] for m, p in preds.items()}
  img = x[..., :3] if x.shape[-1] >= 3 else x[..., 0]
  img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
  vmax = max(1, int(y.max()), *[int(p.max()) for p in preds.values()])
  panels = [('image', img, None), ('truth', y, vmax)] + [
      (LABELS.get(m, m), p, vmax) for m, p in preds.items()]
  fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
  for ax, (title, arr, vm) in zip(axes, panels):
    ax.imshow(arr, cmap=None if vm is None and arr.ndim == 3 else ('gray' if vm is None
                                                                    else 'magma'),
              vmin=0, vmax=vm)
    ax.set_title(title)
    ax.axis('off')
  fig.suptitle(task)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _parse_override(item):
  key, eq, value = item.partition('=')
  if not eq or not key:
    raise SystemExit(f'--set {item!r}: expected KEY=VALUE, e.g. fed.rounds=2')
  return key, value


def apply_overrides(c, overrides):
  """Sets ``(key, value)`` pairs, typed like the key's value; an unknown key is named."""
  return loading.apply_overrides(c, overrides)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', default='runs/paper')
  ap.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
  ap.add_argument('--tasks', nargs='+', default=list(paper.TASKS))
  ap.add_argument('--methods', nargs='+', default=list(paper.METHODS))
  ap.add_argument('--smoke', action='store_true')
  ap.add_argument('--data-dir', default='')
  ap.add_argument('--fresh', action='store_true')
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                  help='config override applied to every cell (e.g. fed.rounds=2)')
  args = ap.parse_args(argv)
  overrides = [_parse_override(item) for item in args.set]
  os.makedirs(args.out, exist_ok=True)
  sections = ['# ADP-FL study: NP-FL vs DP-FL vs ADP-FL', '',
              f"seeds {args.seeds}; {'smoke (tiny) settings' if args.smoke else 'full settings'};"
              f" {'real data under ' + args.data_dir if args.data_dir else 'phantoms in the real layouts'}."
              ' Dice on the pooled test split (mean ± std over seeds), HD95 and NSD averaged over'
              ' regions (challenge scorers), ε = max over silos at the task δ.', '']
  for task in args.tasks:
    data_dir = os.path.join(args.data_dir, task) if args.data_dir else ''
    trainers = {}

    def make(method, seed, task=task, data_dir=data_dir):
      arg = f'task={task},method={method},seed={seed}' + (',smoke' if args.smoke else '')
      if data_dir:
        arg += f',data_dir={data_dir}'
      return apply_overrides(paper.get_config(arg), overrides)

    def keep(method, seed, trainer):
      if seed == args.seeds[0]:
        trainers[method] = trainer

    results = studies.run_grid(make, args.methods, args.seeds, os.path.join(args.out, task),
                               reuse=not args.fresh, on_trained=keep,
                               wants_trainer=lambda method, seed: seed == args.seeds[0])
    cfg = make(args.methods[0], args.seeds[0])
    sections.append(task_table(task, results))
    sections.append(f'(ε target {cfg.privacy.target_epsilon:g}, δ {cfg.privacy.delta:g}, '
                    f'unit: {cfg.privacy.unit})\n')
    studies.plot_convergence(results, os.path.join(args.out, f'convergence_{task}.png'), task)
    if len(trainers) == len(args.methods):
      overlay(task, trainers, os.path.join(args.out, f'overlay_{task}.png'))
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write('\n'.join(sections))
  print('\n'.join(sections))
  return 0


if __name__ == '__main__':
  sys.exit(main())
