"""The plots of one run (``<workdir>/plots/``), drawn from its ``metrics.jsonl`` at the end.

* ``dice.png`` — pooled test Dice and Dice per region over rounds;
* ``epsilon.png`` — ε spent by every silo over rounds, with the target;
* ``clip_noise.png`` — clip norm C and total noise multiplier z of every silo over rounds.
"""

from __future__ import annotations

import os
from typing import Sequence

_FILES = ('dice.png', 'epsilon.png', 'clip_noise.png')


def _per_silo(rows, key):
  return [[r[key][k] for r in rows] for k in range(len(rows[0][key]))]


def plot_run(rows: Sequence[dict], out_dir: str, names: Sequence[str],
             target_epsilon: float | None = None) -> list[str]:
  """Writes the run's plots into ``out_dir``; returns their paths (none without rows)."""
  if not rows:
    return []
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  rounds = [r['round'] for r in rows]
  paths = [os.path.join(out_dir, f) for f in _FILES]

  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  ax.plot(rounds, [r['dice'] for r in rows], 'k-o', label='pooled', linewidth=2)
  regions = rows[0].get('dice_per_region', {})
  if len(regions) > 1:
    for region in regions:
      ax.plot(rounds, [r['dice_per_region'][region] for r in rows], '-', label=region)
  ax.set(xlabel='round', ylabel='test Dice', title='Dice over rounds')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(paths[0], dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  private = [r for r in rows if r.get('epsilon') is not None]
  if private:
    for name, eps in zip(names, _per_silo(private, 'epsilon_per_client')):
      ax.plot([r['round'] for r in private], eps, '-o', markersize=3, label=name)
    if target_epsilon is not None:
      ax.axhline(target_epsilon, color='gray', linestyle='--', label='target')
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, 'non-private run: ε = ∞', ha='center', va='center',
            transform=ax.transAxes)
  ax.set(xlabel='round', ylabel='ε spent (per silo)', title='privacy spent')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(paths[1], dpi=110)
  plt.close(fig)

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 3.8))
  for name, clip in zip(names, _per_silo(rows, 'clip_norm')):
    ax1.plot(rounds, [c if c is not None else float('nan') for c in clip], '-', label=name)
  for name, z in zip(names, _per_silo(rows, 'noise_multiplier')):
    ax2.plot(rounds, z, '-', label=name)
  ax1.set(xlabel='round', ylabel='clip norm C', title='clip norm')
  ax2.set(xlabel='round', ylabel='noise multiplier z', title='noise')
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(paths[2], dpi=110)
  plt.close(fig)
  return paths
