"""Vectorized sweep vs one trial after another: seconds per round of N small trials.

  python benchmarks/sweep_vectorized.py [--trials 8] [--rounds 4] [--axes vmap,map] [--json]
  XLA_FLAGS=--xla_force_host_platform_device_count=1 python benchmarks/sweep_vectorized.py

N DP-FL trials (seeds 0..N-1, noise multipliers spread geometrically over [1, 3], target ε 8,
RDP accounting so that building the trials is quick) of the
``experiments/compare.py`` smoke federation, a little bigger (``--image-size``, ``--features``,
``--local-steps``) so that one round is not pure dispatch overhead, all sharing one federation.

* ``vectorized``: ``adpfl_jax.sweep``'s group step — one jitted call per round for all N trials,
  the trials mapped by ``vmap`` (``jit(vmap(round.fn))``) or by a rolled ``lax.map`` (``map``);
  with several devices also split over them (``+Ndev``, ``shard_map`` over a ``trials`` mesh;
  unless ``XLA_FLAGS`` is set, the script asks XLA for one host device per CPU core);
* ``sequential``: the same N trials one after another with the (shared, compiled once) jitted
  round of a single trial, as ``Trainer.run`` does.

Both include the per-round host work a sweep does for every trial (the sampling plan, the
budget check, the ledger); evaluation is left out. Compile time (the first call, minus one
steady-state round) is reported separately. "Seconds per round" is the time to advance all N
trials by one round. With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

if 'XLA_FLAGS' not in os.environ:
  # One host device per core, so that the trial axis can also be split over the cores.
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={os.cpu_count() or 1}'

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from adpfl_jax import driver  # noqa: E402
from adpfl_jax import sweep  # noqa: E402
from adpfl_jax.configs import loading  # noqa: E402
from adpfl_jax.data import federated  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def _compare_module():
  return loading.module(os.path.join(ROOT, 'experiments', 'compare.py'))


def make_configs(args) -> list:
  compare = _compare_module()
  # Fixed noise multipliers: the RDP plan's padded batch depends on the target ε (a shape), so
  # the trials vary σ at one target instead of calibrating to different targets.
  noise = np.geomspace(1.0, 3.0, args.trials)
  configs = []
  for i in range(args.trials):
    c = compare.get_config(f'method={args.method},seed={i},smoke')
    c.privacy.target_epsilon = 8.0
    c.privacy.accountant = 'rdp'
    c.privacy.calibrate = False
    c.privacy.noise_multiplier = float(noise[i])
    c.data.image_size = args.image_size
    c.model.features = args.features
    c.fed.local_steps = args.local_steps
    c.fed.rounds = args.rounds + 1
    c.fed.backend = args.backend
    c.checkpoint.every_rounds = 0
    c.eval.surface_metrics = False
    c.eval.tensorboard = False
    configs.append(c)
  return configs


def run_vectorized(trainers, rounds, axis, shard):
  """Returns (first-call seconds, [seconds of each later round]): the group executor's step, as
  ``driver.run`` calls it for a sweep group (host plans of the next round overlap the step)."""
  executor = sweep.GroupExecutor(trainers, trial_axis=axis, shard_trials=shard)
  data_x, data_y = executor.place(trainers[0].data.train_x, trainers[0].data.train_y)
  states = executor.stack([t.initial_state for t in trainers])
  live = np.ones(len(trainers), bool)
  times = []
  upcoming = [t.round_inputs(0)[0] for t in trainers]
  for r in range(rounds):
    t0 = time.perf_counter()
    states, outs = executor.step(states, live, data_x, data_y, upcoming)
    upcoming = [t.round_inputs(r + 1)[0] for t in trainers]
    executor.outputs(outs)
    times.append(time.perf_counter() - t0)
  return times[0], times[1:]


def run_sequential(trainers, rounds):
  """Returns (first-call seconds, [seconds of each later round, summed over trials])."""
  per_round = np.zeros(rounds)
  for t in trainers:
    executor = driver.SingleExecutor(t)
    data_x, data_y = executor.place(t.data.train_x, t.data.train_y)
    state = t.initial_state
    for r in range(rounds):
      t0 = time.perf_counter()
      state, outs = executor.step(state, None, data_x, data_y, [t.round_inputs(r)[0]])
      executor.outputs(outs)
      per_round[r] += time.perf_counter() - t0
  # Column 0 holds the compiling call plus N - 1 steady-state trial-rounds.
  return per_round[0], list(per_round[1:])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--trials', type=int, default=8)
  ap.add_argument('--rounds', type=int, default=4, help='timed rounds after the compiling one')
  ap.add_argument('--method', default='dpfl', choices=('dpfl', 'adpfl'))
  ap.add_argument('--backend', default='auto')
  ap.add_argument('--image-size', type=int, default=16)
  ap.add_argument('--features', type=int, default=8)
  ap.add_argument('--local-steps', type=int, default=2)
  ap.add_argument('--axes', default='vmap,map', help='trial axes to time (vmap, map)')
  ap.add_argument('--json', action='store_true')
  args = ap.parse_args(argv)
  if args.trials < 2:
    raise SystemExit('--trials must be >= 2')

  configs = make_configs(args)
  data = federated.load(configs[0].data, 0)
  tmp = tempfile.mkdtemp(prefix='adpfl_sweep_bench_')
  build = lambda tag: sweep.build_trainers(
      configs, [os.path.join(tmp, f'{tag}_{i}') for i in range(args.trials)], data)
  seq_trainers = build('seq')
  print(f'devices: {jax.devices()}; {args.trials} trials, backend {seq_trainers[0].backend}, '
        f'image {args.image_size}, features {args.features}, {args.local_steps} local steps',
        flush=True)
  if len(sweep.group_trainers(seq_trainers)) != 1:
    raise SystemExit('the benchmark trials do not form one group')
  sweep.share_compiled(seq_trainers)
  seq_first, seq_rounds = run_sequential(seq_trainers, args.rounds + 1)
  seq_round = float(np.median(seq_rounds))
  seq_compile = max(seq_first - seq_round, 0.0)  # column 0 = compile + one N-trial round
  print(f'sequential:      {seq_round:.3f} s per round of {args.trials} trials '
        f'({seq_round / args.trials * 1e3:.1f} ms per trial-round); compile {seq_compile:.1f} s',
        flush=True)
  out = {'trials': args.trials, 'backend': seq_trainers[0].backend,
         'device': jax.devices()[0].platform, 'device_count': jax.device_count(),
         'cpu_count': os.cpu_count(), 'auto_trial_axis': sweep.resolve_trial_axis('auto'),
         'sequential_round_s': seq_round, 'sequential_compile_s': seq_compile, 'vectorized': {}}
  variants = [(a, False) for a in args.axes.split(',')]
  if jax.device_count() > 1:
    variants += [(a, True) for a in args.axes.split(',')]
  for axis, shard in variants:
    name = f'{axis}' + (f'+{min(jax.device_count(), args.trials)}dev' if shard else '')
    trainers = build(f'vec_{name}')
    first, rounds = run_vectorized(trainers, args.rounds + 1, axis, shard)
    vec_round = float(np.median(rounds))
    vec_compile = max(first - vec_round, 0.0)
    ratio = seq_round / vec_round
    print(f'vectorized {name:10s}: {vec_round:.3f} s per round '
          f'({vec_round / args.trials * 1e3:.1f} ms per trial-round); compile {vec_compile:.1f} s; '
          f'speed-up {ratio:.2f}x', flush=True)
    out['vectorized'][name] = {'round_s': vec_round, 'compile_s': vec_compile, 'speedup': ratio}
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
