"""Times a DP-SGD-like step with lax convs vs `adpfl_jax.ops.conv`, at top level and in a scan.

XLA:CPU runs autodiff's backward convolutions slowly inside while loops; the custom-VJP
convolutions of `adpfl_jax.ops.conv` use forward convolutions only. This script builds a tiny
GroupNorm conv net (3x3 convs, a stride-2 conv, a stride-2 transposed conv, a 1x1 head), takes
per-example gradients with `vmap(grad)`, clips, sums, adds Gaussian noise and applies SGD, and times
that step (a) jitted at top level and (b) `--scan-steps` times inside `lax.scan`, once with the
plain flax modules and once with `adpfl_jax.ops.conv.Conv` / `ConvTranspose`.

Run:
  python benchmarks/conv_in_scan.py            # 2D, about a minute on 2 CPU cores
  python benchmarks/conv_in_scan.py --dims 3 --size 16 --batch 8 --json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from adpfl_jax.ops import conv


def make_model(custom: bool, dims: int, width: int) -> nn.Module:
  """Returns a tiny encoder-decoder with the plain or the custom-VJP convolutions."""
  conv_cls = conv.Conv if custom else nn.Conv
  convt_cls = conv.ConvTranspose if custom else nn.ConvTranspose
  k3, k2, k1 = (3,) * dims, (2,) * dims, (1,) * dims

  class Net(nn.Module):
    """Conv-GN-ReLU blocks with a stride-2 down and a stride-2 transposed-conv up path."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
      def block(h, features, kernel, strides=1, transposed=False):
        cls = convt_cls if transposed else conv_cls
        strides = (strides,) * dims
        h = cls(features, kernel, strides=strides, padding='SAME')(h)
        return nn.relu(nn.GroupNorm(num_groups=4)(h))

      s1 = block(x, width, k3)
      h = block(s1, 2 * width, k3, strides=2)
      h = block(h, 2 * width, k3)
      h = block(h, width, k2, strides=2, transposed=True)
      h = block(jnp.concatenate([h, s1], axis=-1), width, k3)
      return conv_cls(1, k1)(h)[..., 0]

  return Net()


def make_step(model: nn.Module, x: jax.Array, y: jax.Array) -> Callable[[Any, jax.Array], Any]:
  """DP-SGD-like step: per-example grads, clip to norm 1, sum, add noise, SGD update."""
  batch = x.shape[0]

  def loss_fn(params, xi, yi):
    logits = model.apply(params, xi[None])[0]
    return optax.sigmoid_binary_cross_entropy(logits, yi).mean()

  def step(params, key):
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, x, y)
    leaves = jax.tree_util.tree_leaves(grads)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(batch, -1) ** 2, axis=1) for g in leaves))
    scale = jnp.minimum(1.0, 1.0 / (norms + 1e-12))
    summed = jax.tree_util.tree_map(lambda g: jnp.tensordot(scale, g, 1), grads)
    keys = jax.random.split(key, len(leaves))
    treedef = jax.tree_util.tree_structure(summed)
    noisy = [
      (g + jax.random.normal(k, g.shape)) / batch
      for g, k in zip(jax.tree_util.tree_leaves(summed), keys)
    ]
    noisy = jax.tree_util.tree_unflatten(treedef, noisy)
    return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, noisy)

  return step


def time_fn(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> tuple[float, float]:
  """Returns (seconds of the first call, incl. compile; fastest of `repeats` later calls).

  The minimum is the least sensitive statistic to other processes sharing the CPU.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dims', type=int, default=2, choices=(1, 2, 3), help='spatial dims')
  parser.add_argument('--size', type=int, default=48, help='spatial size per axis')
  parser.add_argument('--batch', type=int, default=32, help='examples per step')
  parser.add_argument('--width', type=int, default=8, help='base number of channels')
  parser.add_argument('--scan-steps', type=int, default=4, help='steps per lax.scan call')
  parser.add_argument('--repeats', type=int, default=3, help='timed calls after the first')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', action='store_true', help='print a final JSON line')
  args = parser.parse_args()

  key = jax.random.key(args.seed)
  kx, ky, kinit, kstep = jax.random.split(key, 4)
  shape = (args.batch,) + (args.size,) * args.dims
  x = jax.random.normal(kx, shape + (1,))
  y = (jax.random.uniform(ky, shape) > 0.5).astype(jnp.float32)

  results: dict[str, Any] = {
    'backend': jax.default_backend(),
    'devices': str(jax.devices()[0]),
    'config': vars(args),
  }
  for name, custom in (('lax', False), ('custom_vjp', True)):
    model = make_model(custom, args.dims, args.width)
    params = model.init(kinit, x[:1])
    step = make_step(model, x, y)
    top = jax.jit(step)

    def scanned(params, key, step=step):
      body = lambda p, k: (step(p, k), None)
      return jax.lax.scan(body, params, jax.random.split(key, args.scan_steps))[0]

    c_top, t_top = time_fn(top, (params, kstep), args.repeats)
    c_scan, t_scan = time_fn(jax.jit(scanned), (params, kstep), args.repeats)
    t_scan /= args.scan_steps
    res = {
      'compile_top_s': c_top - t_top,
      'step_top_s': t_top,
      'compile_scan_s': c_scan - t_scan * args.scan_steps,
      'step_scan_s': t_scan,
      'scan_over_top': t_scan / t_top,
    }
    results[name] = res
    print(
      f'{name:>10}: top level {t_top:.4f} s/step (compile {res["compile_top_s"]:.1f} s) | '
      f'in scan {t_scan:.4f} s/step (compile {res["compile_scan_s"]:.1f} s) | '
      f'scan/top {res["scan_over_top"]:.2f}x',
      flush=True,
    )
  results['speedup_in_scan'] = results['lax']['step_scan_s'] / results['custom_vjp']['step_scan_s']
  results['speedup_top'] = results['lax']['step_top_s'] / results['custom_vjp']['step_top_s']
  print(
    f'custom_vjp speedup: in scan {results["speedup_in_scan"]:.2f}x, '
    f'top level {results["speedup_top"]:.2f}x'
  )
  if args.json:
    print(json.dumps(results))


if __name__ == '__main__':
  main()
