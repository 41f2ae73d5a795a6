"""Kill a training run with SIGKILL at random rounds, resume it, compare with an uninterrupted run.

  python benchmarks/kill_resume.py --kills 5 [--seed 0] [--workdir /tmp/kr] [--json]

The same tiny DP-FL run is trained twice: once uninterrupted, once killed with SIGKILL after a
random round (possibly while a checkpoint is being written) and resumed by re-running the same
command, ``--kills`` times in a row. Then: final params must be bit-identical, ``metrics.jsonl``
identical (timing fields aside), the ledgers and the privacy audit (``audit.json``, canary scores
accumulated across resumes) identical, and ε never above the target. Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROUNDS = 10
OVERRIDES = [
    '--config.data.examples_per_client=24', '--config.data.test_examples_per_client=4',
    '--config.data.image_size=8', '--config.model.features=4', '--config.model.depth=1',
    '--config.model.groups=2', f'--config.fed.rounds={ROUNDS}', '--config.fed.local_steps=1',
    '--config.privacy.batch_size=6', '--config.privacy.accountant=rdp',
    '--config.eval.every_rounds=1', '--config.checkpoint.every_rounds=1',
    '--config.checkpoint.keep=2', '--config.log.progress=False',
    '--config.privacy.clip_mode=quantile', '--config.privacy.quantile.count_std_fraction=0.5',
    '--config.privacy.audit.enabled=True', '--config.privacy.audit.canaries=200',
]
TIMING = ('wall_seconds', 'examples_per_second', 'seconds_per_round')


def command(workdir):
  return [sys.executable, '-m', 'adpfl_jax', 'train', '--config=experiments/quickstart.py',
          f'--workdir={workdir}', *OVERRIDES]


def rounds_done(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if line.strip())


def run_to_end(workdir, env):
  subprocess.run(command(workdir), check=True, env=env, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, cwd=ROOT)


def run_and_kill(workdir, env, kill_after):
  """Starts (or resumes) the run and SIGKILLs it once ``kill_after`` rounds are logged."""
  proc = subprocess.Popen(command(workdir), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, cwd=ROOT)
  while proc.poll() is None and rounds_done(workdir) < kill_after:
    time.sleep(0.02)
  if proc.poll() is None:
    proc.send_signal(signal.SIGKILL)
  proc.wait()
  return rounds_done(workdir)


def final_params(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mgr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                              item_names=('state', 'host'))
  step = mgr.latest_step()
  got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mgr.close()
  import jax  # pylint: disable=g-import-not-at-top
  return step, [np.asarray(x) for x in jax.tree_util.tree_leaves(got['state']['params'])]


def metrics(workdir):
  rows = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      rows[row['round']] = {k: v for k, v in row.items() if k not in TIMING}
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--kills', type=int, default=5)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--workdir', default=None)
  ap.add_argument('--json', action='store_true')
  args = ap.parse_args(argv)
  base = args.workdir or tempfile.mkdtemp(prefix='kill_resume_')
  ref, killed = os.path.join(base, 'uninterrupted'), os.path.join(base, 'killed')
  for d in (ref, killed):
    shutil.rmtree(d, ignore_errors=True)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  rng = np.random.default_rng(args.seed)
  run_to_end(ref, env)
  points = sorted(rng.choice(np.arange(1, ROUNDS), size=min(args.kills, ROUNDS - 1),
                             replace=False).tolist())
  landed = [run_and_kill(killed, env, k) for k in points]
  run_to_end(killed, env)
  problems = []
  (s1, p1), (s2, p2) = final_params(ref), final_params(killed)
  if s1 != s2 or len(p1) != len(p2) or not all(np.array_equal(a, b) for a, b in zip(p1, p2)):
    problems.append('final params differ')
  if metrics(ref) != metrics(killed):
    problems.append('metrics.jsonl differs')
  ledgers = [json.load(open(os.path.join(d, 'ledger.json'))) for d in (ref, killed)]
  if ledgers[0] != ledgers[1]:
    problems.append('ledgers differ')
  audits = [json.load(open(os.path.join(d, 'audit.json'))) for d in (ref, killed)]
  if audits[0] != audits[1]:
    problems.append('audit.json differs')
  summaries = [json.load(open(os.path.join(d, 'summary.json'))) for d in (ref, killed)]
  for s in summaries:
    if s['epsilon'] > s['target_epsilon']:
      problems.append(f"ε {s['epsilon']} above target {s['target_epsilon']}")
  out = {'kill_points': points, 'rounds_logged_at_kill': landed, 'problems': problems,
         'epsilon': summaries[1]['epsilon'], 'workdir': base}
  print(json.dumps(out) if args.json else out)
  return 1 if problems else 0


ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')

if __name__ == '__main__':
  sys.exit(main())
