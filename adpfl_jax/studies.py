"""Multi-run studies: run a grid of (method × seed) configs, summarise, tabulate and plot.

Convergence: the number of rounds to reach 95% of the final Dice (first evaluation at or above
0.95 × final), and the area under the Dice curve (mean Dice over evaluations). Stability: standard
deviation over seeds (and, where per-client Dice is logged, over clients).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from adpfl_jax import jsonio


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  rows, seen = [], set()
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        if row['round'] in seen:  # a resumed run may repeat an evaluation
          continue
        seen.add(row['round'])
        rows.append(row)
  return sorted(rows, key=lambda r: r['round'])


def rounds_to_fraction(rounds: Sequence[int], dice: Sequence[float], fraction: float = 0.95):
  """First evaluated round whose Dice is ≥ ``fraction`` × the final Dice."""
  final = dice[-1]
  for r, d in zip(rounds, dice):
    if d >= fraction * final:
      return int(r)
  return int(rounds[-1])


def summarise_run(workdir: str) -> dict:
  rows = read_metrics(workdir)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  rounds = [r['round'] for r in rows]
  dice = [r['dice'] for r in rows]
  return {
      'dice': summary['dice'],
      'dice_per_region': summary.get('dice_per_region', {}),
      'dice_per_client': summary.get('dice_per_client', []),
      'epsilon': jsonio.unbounded(summary['epsilon']),
      'delta': summary['delta'],
      'rounds': summary['rounds'],
      'rounds_to_95': rounds_to_fraction(rounds, dice),
      'dice_auc': float(np.mean(dice)),
      'curve': (rounds, dice),
      'extra': {k: jsonio.unbounded(summary[k]) for k in ('hd95', 'nsd') if k in summary},
  }


def _finished(workdir: str) -> bool:
  """A run that wrote its summary and was not interrupted by a signal (that one resumes)."""
  try:
    with open(os.path.join(workdir, 'summary.json')) as f:
      reason = json.load(f).get('stopped_reason') or ''
  except (OSError, ValueError):
    return False
  return not reason.startswith('interrupted')


def run_grid(make_config: Callable[[str, int], object], methods: Sequence[str],
             seeds: Sequence[int], outdir: str, *, reuse: bool = True,
             on_trained: Callable | None = None,
             wants_trainer: Callable[[str, int], bool] | None = None) -> dict:
  """Trains every (method, seed) in ``outdir/<method>/seed_<s>`` and returns their summaries.

  A finished run (``summary.json`` present) is reused unless ``reuse=False``; an unfinished one
  resumes from its checkpoint. ``on_trained(method, seed, trainer)`` sees every trainer built;
  a finished run is rebuilt (restored from its last checkpoint) for it only where
  ``wants_trainer(method, seed)`` is true (default: every run).
  """
  from adpfl_jax import train  # pylint: disable=g-import-not-at-top
  results: dict = {m: [] for m in methods}
  for method in methods:
    for seed in seeds:
      workdir = os.path.join(outdir, method, f'seed_{seed}')
      done = _finished(workdir)
      rebuild = on_trained is not None and (wants_trainer is None or wants_trainer(method, seed))
      if not (reuse and done) or rebuild:
        if not reuse and os.path.exists(workdir):
          import shutil  # pylint: disable=g-import-not-at-top
          shutil.rmtree(workdir)
        print(f'\n### {method}, seed {seed} → {workdir}', flush=True)
        trainer = train.Trainer(make_config(method, seed), workdir)
        print(train.format_summary(trainer.run()), flush=True)
        if on_trained is not None:
          on_trained(method, seed, trainer)
      results[method].append(summarise_run(workdir))
  return results


def _ms(values, fmt='{:.4f}'):
  v = np.asarray(values, np.float64)
  if not np.all(np.isfinite(v)):
    return '∞' if np.all(np.isinf(v)) else 'n/a'
  return f'{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1) if len(v) > 1 else 0.0)}'


def markdown_table(results: Mapping[str, list], title: str = '') -> str:
  lines = [f'## {title}', ''] if title else []
  lines += ['| method | Dice (mean ± std) | rounds to 95% of final Dice | Dice AUC | ε spent '
            '(max silo) | δ | runs |',
            '|---|---|---|---|---|---|---|']
  for method, runs in results.items():
    eps = [r['epsilon'] for r in runs]
    lines.append(
        f"| {method} | {_ms([r['dice'] for r in runs])} | "
        f"{_ms([r['rounds_to_95'] for r in runs], '{:.1f}')} | "
        f"{_ms([r['dice_auc'] for r in runs])} | {_ms(eps, '{:.3f}')} | "
        f"{runs[0]['delta']:g} | {len(runs)} |")
  return '\n'.join(lines) + '\n'


def plot_convergence(results: Mapping[str, list], path: str, title: str = '') -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for method, runs in results.items():
    rounds = runs[0]['curve'][0]
    n = min(len(r['curve'][1]) for r in runs)
    curves = np.array([r['curve'][1][:n] for r in runs])
    mean, std = curves.mean(0), curves.std(0)
    ax.plot(rounds[:n], mean, label=method)
    ax.fill_between(rounds[:n], mean - std, mean + std, alpha=0.2)
  ax.set_xlabel('round')
  ax.set_ylabel('pooled test Dice')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
