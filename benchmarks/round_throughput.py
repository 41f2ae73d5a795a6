"""Round throughput of every client backend, DP overhead and FLOP utilisation.

  python benchmarks/round_throughput.py [--json] [--rounds 3] [--config experiments/quickstart.py]

For the default 2D U-Net of ``experiments/quickstart.py`` it prints, per backend, compile seconds
and seconds per round (best of ``--rounds`` timed rounds after one warm-up), examples/s;
``dp_overhead`` = one DP-SGD local step (per-example grads, clip, noise) ÷ one non-private step
(batch-mean gradient) on the same model and batch; ``flop_utilization`` = achieved FLOP/s of the
fastest one-jit round (XLA cost analysis of one DP
local step × the round's client-steps) ÷ FLOP/s of a dense float32 matmul measured in this process
(``flop_utilization_bf16``: ÷ the bfloat16 matmul peak; the round itself computes in float32);
``peak_bytes`` = the device's peak memory in use (``memory_stats``; None where the platform does
not report it, e.g. CPU). With ``--json`` the last line is one JSON object.

Sharded runs use the devices JAX sees; on CPU the script asks XLA for one host device per core
(set ``XLA_FLAGS`` yourself to override).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if 'XLA_FLAGS' not in os.environ:
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={os.cpu_count() or 1}'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from adpfl_jax.configs import loading  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from adpfl_jax import train  # noqa: E402
from adpfl_jax.privacy import clipping  # noqa: E402


def time_fn(fn, reps: int):
  t0 = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, min(times)


def matmul_flops_per_second(n: int = 1024, reps: int = 5, dtype=jnp.float32) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x: x @ x)
  _, t = time_fn(lambda: f(a), reps)
  return 2 * n**3 / t


def round_flops(round_step, *args) -> float | None:
  try:
    cost = round_step.lower(*args).compile().cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    return float(cost.get('flops', 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    return None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='experiments/quickstart.py')
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--backends', default='vmap,map,sharded,loop')
  ap.add_argument('--set', action='append', default=[], help='config override key=value')
  ap.add_argument('--matmul_size', type=int, default=0,
                  help='n of the n×n matmul measuring the peak (default 1024 on CPU, else 8192)')
  ap.add_argument('--json', action='store_true')
  args = ap.parse_args(argv)

  base = loading.load(args.config, args.set)
  print(f'devices: {jax.devices()}', flush=True)
  results, compile_s = {}, {}
  trainer = None
  for name in args.backends.split(','):
    if name == 'sharded' and jax.device_count() < 2:
      print('sharded: skipped (one device)')
      continue
    cfg = loading.load(args.config, args.set)
    cfg.fed.backend = name
    trainer = train.Trainer(cfg, '/tmp/adpfl_bench', data=trainer.data if trainer else None)
    state = trainer.initial_state
    inputs, *_ = trainer.round_inputs(0)
    data_x, data_y = jnp.asarray(trainer.data.train_x), jnp.asarray(trainer.data.train_y)
    step = lambda: trainer.round.apply(state, data_x, data_y, inputs)[0].params
    first, per_round = time_fn(step, args.rounds)
    results[name] = per_round
    compile_s[name] = max(first - per_round, 0.0)
    examples = float(np.sum(np.asarray(inputs.mask)))
    print(f'{name:8s} compile {compile_s[name]:6.2f} s   round {per_round:7.3f} s   '
          f'{examples / per_round:8.1f} examples/s', flush=True)

  # DP overhead: one local step, DP vs non-private, same model and batch.
  cfg = base
  loss_fn = trainer.loss_fn
  params = trainer.initial_state.params
  b = int(trainer.plan.max_batch)
  x = jnp.asarray(trainer.data.train_x[0, :b])
  y = jnp.asarray(trainer.data.train_y[0, :b])
  mask = jnp.ones(b)

  @jax.jit
  def dp_step(p, key):
    _, g = clipping.per_example_grads(loss_fn, p, x, y)
    s, _ = clipping.clip_and_sum(g, mask, jnp.float32(1.0))
    flat, unravel = ravel_pytree(s)
    flat = (flat + jax.random.normal(key, flat.shape)) / b
    return jax.tree_util.tree_map(lambda a, u: a - 0.1 * u, p, unravel(flat))

  @jax.jit
  def plain_step(p, key):
    del key
    g = jax.grad(lambda q: jnp.mean(jax.vmap(loss_fn, (None, 0, 0))(q, x, y)))(p)
    return jax.tree_util.tree_map(lambda a, u: a - 0.1 * u, p, g)

  key = jax.random.key(0)
  reps = max(5, args.rounds)
  _, t_dp = time_fn(lambda: dp_step(params, key), reps)
  _, t_plain = time_fn(lambda: plain_step(params, key), reps)
  dp_overhead = t_dp / t_plain
  print(f'DP local step {t_dp * 1e3:.1f} ms, non-private {t_plain * 1e3:.1f} ms: '
        f'dp_overhead {dp_overhead:.3f}')

  # XLA's cost analysis counts a while-loop body once, so the round's FLOPs are those of one
  # DP local step (cost analysis of dp_step) times the client-steps of the round.
  n = args.matmul_size or (1024 if jax.default_backend() == 'cpu' else 8192)
  peak = matmul_flops_per_second(n)
  peak_bf16 = matmul_flops_per_second(n, dtype=jnp.bfloat16)
  step_flops = round_flops(dp_step, params, key)
  client_steps = int(np.asarray(inputs.mask).shape[0] * np.asarray(inputs.mask).shape[1])
  one_jit = {k: v for k, v in results.items() if k != 'loop'}
  util = util_bf16 = None
  if one_jit and step_flops:
    best = min(one_jit, key=one_jit.get)
    total = step_flops * client_steps
    util = total / one_jit[best] / peak
    util_bf16 = total / one_jit[best] / peak_bf16
    print(f'matmul {peak / 1e9:.1f} GFLOP/s float32, {peak_bf16 / 1e9:.1f} bfloat16 ({n}×{n}); '
          f'{best} round ≈ {total / 1e9:.2f} GFLOP '
          f'({client_steps} client-steps × {step_flops / 1e9:.3f}) in {one_jit[best]:.3f} s: '
          f'flop_utilization {util:.3f} (vs bfloat16 peak {util_bf16:.3f})')
  stats = jax.devices()[0].memory_stats() or {}
  peak_bytes = stats.get('peak_bytes_in_use')
  if peak_bytes is not None:
    print(f'peak device memory {peak_bytes / 2**30:.2f} GiB')
  if 'loop' in results:
    for k, v in results.items():
      print(f'  {k:8s} {v / results["loop"]:.2f}× loop')
  out = {'backends': results, 'compile_seconds': compile_s, 'dp_overhead': dp_overhead,
         'flop_utilization': util, 'flop_utilization_bf16': util_bf16,
         'matmul_flops_per_second': {'float32': peak, 'bfloat16': peak_bf16},
         'peak_bytes': peak_bytes, 'device': str(jax.devices()[0].platform),
         'device_count': jax.device_count(), 'auto': train.backends.resolve('auto')}
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
