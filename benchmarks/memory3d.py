"""Device memory of one client's DP-SGD step vs ``privacy.microbatch_size`` (full-size 3D U-Net).

  python benchmarks/memory3d.py [--config kits23] [--microbatches 0 1 2 4] [--batch B] [--json]

Compiles one local DP step of ``client_update`` (per-example gradients, clip, noise, SGD) for the
config's model at the padded batch B the privacy plan would use (default: a KiTS23 site of 163
patients at the config's expected batch, ``plan.max_batch_size``) and reports XLA's
``memory_analysis`` of the compiled step: temporary bytes (activations, per-example gradients),
arguments and outputs. Nothing runs and no data are read: inputs are shapes only. A microbatch of
``m`` keeps only ``m`` examples' gradients alive (``privacy/clipping.clipped_sum``); 0 is the
whole padded batch at once. With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from adpfl_jax import losses  # noqa: E402
from adpfl_jax import models  # noqa: E402
from adpfl_jax import train  # noqa: E402
from adpfl_jax.configs import loading  # noqa: E402
from adpfl_jax.federated import client as client_lib  # noqa: E402
from adpfl_jax.privacy import controller as controller_lib  # noqa: E402
from adpfl_jax.privacy import plan as plan_lib  # noqa: E402

# Classes (label 0 is background) and input channels of the 3D tasks: KiTS23 kidney/tumour/cyst
# from CT; BraTS 2024 NETC/SNFH/ET/RC from four MRI sequences.
NUM_CLASSES = {'kits23': 4, 'brats2024': 5}
CHANNELS = {'kits23': 1, 'brats2024': 4}


def step_memory(cfg, batch: int, microbatch: int) -> dict:
  """XLA memory analysis of one compiled local DP step at padded batch ``batch``."""
  shape = tuple(cfg.data.volume_shape) + (CHANNELS[cfg.data.name],)
  classes = NUM_CLASSES[cfg.data.name]
  model = models.get_model(cfg.model, shape, classes)
  regions = list(train.regions_for(cfg.data.name, classes).values())
  loss_fn = lambda p, x, y: losses.segmentation_loss(
      model.apply(p, x), y, regions=regions, dice_weight=cfg.loss.dice_weight,
      ce_weight=cfg.loss.ce_weight)
  params = jax.eval_shape(model.init, jax.random.key(0))
  count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  ccfg = client_lib.ClientConfig(loss_fn=loss_fn, private=True, microbatch=microbatch)
  f32 = jnp.float32
  dp = controller_lib.ClientDP(clip=f32(1.0), noise_grad=f32(1.0), aux_std=f32(0.0),
                               grid=jnp.ones(1), expected_batch=f32(4.0), lr=f32(0.1),
                               sparsity_mask=f32(1.0))
  sds = jax.ShapeDtypeStruct
  args = (params, sds((1, batch) + shape, f32), sds((1, batch) + shape[:-1], jnp.uint8),
          sds((1, batch), f32), dp, jax.random.key(0))
  t0 = time.perf_counter()
  compiled = jax.jit(lambda *a: client_lib.client_update(ccfg, *a)).lower(*args).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return {'microbatch': microbatch, 'batch': batch, 'params': count,
          'temp_bytes': int(mem.temp_size_in_bytes),
          'argument_bytes': int(mem.argument_size_in_bytes),
          'output_bytes': int(mem.output_size_in_bytes), 'compile_seconds': seconds}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='kits23', help='a 3D config (kits23, brats2024, a file)')
  ap.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                  help='config override (repeatable)')
  ap.add_argument('--microbatches', nargs='+', type=int, default=[0, 1, 2, 4])
  ap.add_argument('--batch', type=int, default=0,
                  help='padded batch B (default: plan.max_batch_size for a site of 163 cases)')
  ap.add_argument('--json', action='store_true')
  args = ap.parse_args(argv)
  cfg = loading.load(args.config, args.set)
  if cfg.data.name not in NUM_CLASSES:
    ap.error(f'--config={args.config}: data.name={cfg.data.name!r} is not a 3D task '
             f'({", ".join(NUM_CLASSES)})')
  batch = args.batch or plan_lib.max_batch_size(
      163, float(cfg.privacy.batch_size) / 163, float(cfg.privacy.max_batch_sigmas))
  rows = []
  for mb in args.microbatches:
    if mb < 0:
      ap.error(f'--microbatches: {mb} must be >= 0')
    rows.append(step_memory(cfg, batch, mb))
    r = rows[-1]
    print(f"microbatch {mb or 'off':>4}: temp {r['temp_bytes'] / 2**20:9.1f} MiB   "
          f"(compiled in {r['compile_seconds']:.1f} s)", flush=True)
  base = rows[0]['temp_bytes']
  shape = 'x'.join(str(s) for s in cfg.data.volume_shape)
  print(f'\n{args.config}: {cfg.model.name} features {cfg.model.features} depth '
        f'{cfg.model.depth}, {rows[0]["params"]:,} params, volume {shape}, padded batch {batch}, '
        f'{jax.devices()[0].platform}\n')
  print('| microbatch | temp memory (MiB) | vs. off |')
  print('|---|---|---|')
  for r in rows:
    rel = r['temp_bytes'] / base if base else math.nan
    print(f"| {r['microbatch'] or 'off'} | {r['temp_bytes'] / 2**20:.1f} | {rel:.2f} |")
  out = {'config': args.config, 'batch': batch, 'params': rows[0]['params'],
         'platform': jax.devices()[0].platform, 'rows': rows}
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
