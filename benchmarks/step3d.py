"""One local step of the full-size 3D U-Net (KiTS23 config), DP-SGD vs non-private vs PyTorch.

  python benchmarks/step3d.py [--json] [--impl auto|native|fold|lax] [--microbatch K]

Builds the model of the packaged ``kits23`` config (non-smoke: ``unet3d``, features 8, depth 3,
groups 4, one example 32 × 64 × 64 × 1, 4 classes, KiTS23 region loss) through
``adpfl_jax.models.get_model`` and times, after compilation, the median of ``--repeats`` calls of

* ``dp_step_seconds``: ``federated.client.client_update`` (per-example gradients, clipping,
  noise, SGD) running ``--steps`` local steps in its ``lax.scan``, divided by ``--steps``, on the
  padded batch the trainer builds: the slots of a Poisson batch of expected size ``--batch``
  (``privacy.plan.max_batch_size`` for a client of ``--client-size`` examples; the defaults, 4 of
  16, the KiTS23 phantom federation, give 11 slots), the first ``round(--batch)`` sampled.
  ``privacy.microbatch_size`` (the config's, or ``--microbatch``) decides whether every slot is
  computed (0) or only the sampled ones, that many at a time;
* ``plain_step_seconds``: the non-private step a plain trainer takes on the same sampled examples:
  one batch-mean gradient, no padding, same ``lax.scan`` and SGD update; ``dp_overhead`` = DP ÷
  non-private;
* ``pytorch_step_seconds``: that non-private step (same architecture and parameter count: 3D
  U-Net, GroupNorm, SiLU, transposed-convolution upsampling; same loss) in PyTorch on CPU with as
  many threads as cores, when ``import torch`` works (else null; torch is only a comparison);
  ``pytorch_slots_step_seconds`` the same on all padded slots; ``dp_speed_vs_pytorch`` =
  PyTorch ÷ the DP step.

Each repeat runs the DP, the non-private and the PyTorch steps once, in turn, so that other load on
the machine hits them alike; ``min_seconds`` holds the fastest of the repeats, the statistic least
sensitive to other processes.

``flop_utilization`` = the model FLOPs of one step on the sampled examples (forward and backward,
XLA's cost analysis of the non-private step lowered with ``impl='native'``; per-example gradients
take the same FLOPs) ÷ ``dp_step_seconds`` ÷ the FLOP/s of a dense float32 2048² matmul, best of
several measured in this process between the step timings. ``dp_temp_bytes`` is XLA's temporary
buffer size of the compiled DP step. ``--impl`` selects the convolution of ``adpfl_jax.ops.conv``
(``lax``: the model's ``fast_conv=False``, plain ``lax.conv_general_dilated`` with autodiff).
With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from adpfl_jax import losses, models, train  # noqa: E402
from adpfl_jax.configs import loading as config_loading  # noqa: E402
from adpfl_jax.federated import client as client_lib  # noqa: E402
from adpfl_jax.ops import conv  # noqa: E402
from adpfl_jax.privacy import controller as controller_lib  # noqa: E402
from adpfl_jax.privacy import plan as plan_lib  # noqa: E402

# Pause before each timed call: idle worker threads of XLA (Eigen) and PyTorch (OpenMP) spin for
# a while after a call, and would otherwise compete with the next call on a small machine.
SETTLE_S = 1.0
NUM_CLASSES = 4


def load_config():
  return config_loading.load('kits23')


def seconds(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def matmul_flops_per_second(n: int = 2048, reps: int = 3) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  return 2 * n**3 / min(seconds(lambda: f(a)) for _ in range(reps))


def build_jax(config, impl: str, slots: int, expected: float, steps: int, microbatch: int,
              seed: int = 0):
  """Returns (dp_update, plain_update, params, dp_inputs, plain_inputs) for one client.

  ``dp_update`` runs ``steps`` DP-SGD steps of ``client_update`` on ``slots`` padded slots, the
  first ``round(expected)`` of them sampled; ``plain_update`` runs ``steps`` non-private SGD steps
  with one batch-mean gradient over the same sampled examples (no padding: what a non-private
  trainer computes).
  """
  model_config = config.model
  if impl == 'lax':
    model_config = model_config.copy_and_resolve_references()
    model_config.unlock()
    model_config.fast_conv = False
  shape = tuple(config.data.volume_shape) + (1,)
  spec = models.get_model(model_config, shape, NUM_CLASSES)
  regions = list(train.regions_for('kits23', NUM_CLASSES).values())

  def loss_fn(params, x, y):
    return losses.segmentation_loss(spec.apply(params, x), y, regions=regions,
                                    dice_weight=config.loss.dice_weight,
                                    ce_weight=config.loss.ce_weight)

  params = spec.init(jax.random.key(seed))
  count = sum(p.size for p in jax.tree_util.tree_leaves(params))
  cfg = client_lib.ClientConfig(loss_fn=loss_fn, private=True, mechanism=config.privacy.mechanism,
                                microbatch=microbatch)
  dp = controller_lib.ClientDP(
      clip=jnp.float32(config.privacy.clip_norm), noise_grad=jnp.float32(1.0),
      aux_std=jnp.float32(0.0), grid=jnp.zeros((1,), jnp.float32),
      expected_batch=jnp.float32(expected), lr=jnp.float32(config.fed.client_lr),
      sparsity_mask=jnp.ones((count,), jnp.float32))

  def dp_update(params, xb, yb, mask, key):
    return client_lib.client_update(cfg, params, xb, yb, mask, dp, key)[0]

  def plain_update(params, xb, yb):
    def step(p, batch):
      x, y = batch
      batch_loss = lambda q: jnp.mean(jax.vmap(loss_fn, (None, 0, 0))(q, x, y))
      g = jax.grad(batch_loss)(p)
      return jax.tree_util.tree_map(lambda a, u: a - dp.lr * u, p, g), None

    return jax.lax.scan(step, params, (xb, yb))[0]

  rng = np.random.default_rng(seed)
  xb = jnp.asarray(rng.normal(size=(steps, slots) + shape), jnp.float32)
  yb = jnp.asarray(rng.integers(0, NUM_CLASSES, size=(steps, slots) + shape[:-1]), jnp.int32)
  real = int(round(expected))
  mask = jnp.asarray(np.arange(slots)[None, :] < real, jnp.float32).repeat(steps, 0)
  dp_inputs = (params, xb, yb, mask, jax.random.key(seed + 1))
  return dp_update, plain_update, params, dp_inputs, (params, xb[:, :real], yb[:, :real])


def torch_step(features: int, depth: int, groups: int, batch: int, shape, regions, threads: int):
  """Returns (one non-private SGD step on a ``batch`` in PyTorch, parameter count), or None."""
  try:
    import torch
    from torch import nn
    from torch.nn import functional as F
  except ImportError:
    return None
  torch.set_num_threads(threads)
  torch.manual_seed(0)

  def block(c_in, c_out):
    g = max(d for d in range(1, min(groups, c_out) + 1) if c_out % d == 0)
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, padding=1), nn.GroupNorm(g, c_out), nn.SiLU(),
        nn.Conv3d(c_out, c_out, 3, padding=1), nn.GroupNorm(g, c_out), nn.SiLU())

  class UNet3D(nn.Module):
    """The architecture of ``adpfl_jax.models.unet.UNet`` with ``ndim=3``, channels first."""

    def __init__(self):
      super().__init__()
      widths = [features * 2**level for level in range(depth + 1)]
      self.down = nn.ModuleList(block(c_in, c_out) for c_in, c_out in zip([1] + widths, widths))
      self.up = nn.ModuleList(nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2)
                              for level in reversed(range(depth)))
      self.up_blocks = nn.ModuleList(block(2 * widths[level], widths[level])
                                     for level in reversed(range(depth)))
      self.head = nn.Conv3d(features, NUM_CLASSES, 1)

    def forward(self, x):
      skips = []
      for down in self.down[:-1]:
        x = down(x)
        skips.append(x)
        x = F.max_pool3d(x, 2)
      x = self.down[-1](x)
      for up, up_block, skip in zip(self.up, self.up_blocks, reversed(skips)):
        x = up_block(torch.cat([up(x), skip], 1))
      return self.head(x)

  model = UNet3D()
  member = torch.tensor([[float(c in r) for r in regions] for c in range(NUM_CLASSES)])
  opt = torch.optim.SGD(model.parameters(), lr=0.1)
  x = torch.randn(batch, 1, *shape)
  y = torch.randint(0, NUM_CLASSES, (batch, *shape))
  target = (F.one_hot(y, NUM_CLASSES).float() @ member).movedim(-1, 1)  # region masks

  def loss_fn():
    logits = model(x)
    ce = F.cross_entropy(logits, y, reduction='none').mean((1, 2, 3))
    prob = torch.einsum('bk...,kr->br...', logits.softmax(1), member)
    inter = (prob * target).sum((2, 3, 4))
    denom = prob.sum((2, 3, 4)) + target.sum((2, 3, 4))
    dice = (2 * inter + 1) / (denom + 1)
    return ((1 - dice.mean(1)) + ce).mean()

  def step():
    opt.zero_grad()
    loss_fn().backward()
    opt.step()

  return step, sum(p.numel() for p in model.parameters())


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--impl', default='auto', choices=conv.IMPLS + ('lax',))
  ap.add_argument('--microbatch', type=int, default=None,
                  help='privacy.microbatch_size of the DP step (default: the kits23 config)')
  ap.add_argument('--repeats', type=int, default=3, help='timed calls of each step (median)')
  ap.add_argument('--steps', type=int, default=2, help='local steps per client_update call')
  ap.add_argument('--batch', type=float, default=4.0, help='expected Poisson batch q·n')
  ap.add_argument('--client-size', type=int, default=16, help='examples n of the client')
  ap.add_argument('--no-torch', action='store_true', help='skip the PyTorch comparison')
  ap.add_argument('--json', action='store_true')
  args = ap.parse_args(argv)

  config = load_config()
  chunk = int(config.privacy.microbatch_size if args.microbatch is None else args.microbatch)
  slots = plan_lib.max_batch_size(args.client_size, args.batch / args.client_size,
                                  float(config.privacy.max_batch_sigmas))
  real = int(round(args.batch))
  print(f'{jax.devices()[0].device_kind}: impl {args.impl}, microbatch {chunk}, {slots} slots '
        f'for an expected batch of {args.batch:g} ({real} sampled), {args.steps} local steps per '
        'call', flush=True)
  conv_impl = 'auto' if args.impl == 'lax' else args.impl
  with conv.use_impl('native'):
    _, plain_update, _, _, plain_inputs = build_jax(config, 'native', slots, args.batch,
                                                    args.steps, chunk)
    cost = jax.jit(plain_update).lower(*plain_inputs).cost_analysis()
    # XLA's cost analysis counts a while-loop body once: the FLOPs of one step of the scan.
    step_flops = float((cost[0] if isinstance(cost, list) else cost)['flops'])
  with conv.use_impl(conv_impl):
    dp_update, plain_update, params, dp_inputs, plain_inputs = build_jax(
        config, args.impl, slots, args.batch, args.steps, chunk)
    start = time.perf_counter()
    dp_step = jax.jit(dp_update).lower(*dp_inputs).compile()
    plain_step = jax.jit(plain_update).lower(*plain_inputs).compile()
  compile_s = time.perf_counter() - start
  temp_bytes = dp_step.memory_analysis().temp_size_in_bytes
  count = sum(p.size for p in jax.tree_util.tree_leaves(params))
  print(f'{count} parameters, {step_flops / 1e9:.1f} GFLOP per step on {real} examples, compiled '
        f'in {compile_s:.0f} s, DP step temp buffers {temp_bytes / 2**30:.2f} GiB', flush=True)

  shape = tuple(config.data.volume_shape)
  torch_fns = {}
  if not args.no_torch:
    regions = list(train.regions_for('kits23', NUM_CLASSES).values())
    for name, batch in (('torch', real), ('torch_slots', slots)):
      made = torch_step(int(config.model.features), int(config.model.depth),
                        int(config.model.groups), batch, shape, regions, os.cpu_count() or 1)
      if made is None:
        break
      torch_fns[name], torch_count = made
      if torch_count != count:
        raise SystemExit(f'PyTorch model has {torch_count} parameters, JAX {count}')

  runs = {'dp': lambda: dp_step(*dp_inputs), 'plain': lambda: plain_step(*plain_inputs)}
  for fn in list(runs.values()) + list(torch_fns.values()):
    jax.block_until_ready(fn())
  times = {k: [] for k in [*runs, *torch_fns]}
  peaks = [matmul_flops_per_second()]
  for _ in range(args.repeats):
    for name, fn in runs.items():
      time.sleep(SETTLE_S)
      times[name].append(seconds(fn) / args.steps)
    for name, fn in torch_fns.items():
      time.sleep(SETTLE_S)
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
    peaks.append(matmul_flops_per_second())
  median = {k: statistics.median(v) for k, v in times.items()}
  peak = max(peaks)
  torch_s = median.get('torch')
  out = {
      'dp_step_seconds': median['dp'],
      'plain_step_seconds': median['plain'],
      'dp_overhead': median['dp'] / median['plain'],
      'flop_utilization': step_flops / median['dp'] / peak,
      'plain_flop_utilization': step_flops / median['plain'] / peak,
      'matmul_gflops': peak / 1e9,
      'pytorch_step_seconds': torch_s,
      'pytorch_slots_step_seconds': median.get('torch_slots'),
      'dp_speed_vs_pytorch': torch_s / median['dp'] if torch_s else None,
      'impl': args.impl,
      'microbatch': chunk,
      'slots': slots,
      'sampled': real,
      'step_gflop': step_flops / 1e9,
      'dp_temp_bytes': temp_bytes,
      'compile_seconds': compile_s,
      'min_seconds': {k: min(v) for k, v in times.items()},
      'all_seconds': times,
  }
  for k, v in times.items():
    print(f'{k:>12}: ' + ' '.join(f'{t:.2f}' for t in v) + f' s (median {median[k]:.2f})')
  print(f'DP step {out["dp_step_seconds"]:.2f} s, non-private {out["plain_step_seconds"]:.2f} s '
        f'(dp_overhead {out["dp_overhead"]:.2f}), {step_flops / 1e9 / median["dp"]:.1f} GFLOP/s '
        f'= {out["flop_utilization"]:.1%} of a {out["matmul_gflops"]:.0f} GFLOP/s matmul')
  if torch_s:
    print(f'PyTorch non-private step on the {real} sampled examples: {torch_s:.2f} s '
          f'({median["torch_slots"]:.2f} s on all {slots} slots); the DP step runs at '
          f'{out["dp_speed_vs_pytorch"]:.2f}x PyTorch\'s speed')
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
