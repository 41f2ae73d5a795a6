r"""A "public" model for public pretraining: trained on a phantom federation disjoint from the private one.

  python experiments/pretrain.py --out runs/frontier/public_model [--smoke]

In the simulation, public data is a phantom federation generated from its own seed
(``data.seed_offset = PUBLIC_SEED_OFFSET``): its records are independent draws, never the private
silos' records (those come from seeds 0, 1, 2, … with offset 0). Training on it needs no privacy
(``privacy.mode = none``). The final global model is written as an orbax checkpoint at
``<out>/params``; a private run starts from it with ``--config.model.init_checkpoint=<out>/params``.
Its ledger is unchanged: the initial parameters are a public input (docs/frontier.md §3).

The model and image shapes are ``experiments/frontier.py``'s (``--smoke``: its smoke size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PUBLIC_SEED_OFFSET = 1000


def public_config(smoke: bool):
  from adpfl_jax.configs import loading  # pylint: disable=g-import-not-at-top
  frontier = loading.module(os.path.join(HERE, 'frontier.py'))
  c = frontier.get_config('method=npfl,seed=0' + (',smoke' if smoke else ''))
  c.unlock()
  c.data.seed_offset = PUBLIC_SEED_OFFSET
  c.eval.surface_metrics = False
  c.lock()
  return c


def get_config(arg=None):
  """The public model's run config (``adpfl train --config=experiments/pretrain.py:smoke``)."""
  from adpfl_jax.configs import common  # pylint: disable=g-import-not-at-top
  return public_config(common.parse_arg(arg, smoke=False).smoke)


def ensure(out: str, smoke: bool = False) -> str:
  """Trains the public model into ``out`` unless it is there already; returns the params path."""
  from adpfl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from adpfl_jax import train  # pylint: disable=g-import-not-at-top
  from adpfl_jax.configs import identity  # pylint: disable=g-import-not-at-top
  from adpfl_jax.federated import server  # pylint: disable=g-import-not-at-top
  config = public_config(smoke)
  params = os.path.abspath(os.path.join(out, 'params'))
  marker = os.path.join(out, 'public_model.json')
  want = identity.config_hash(config)
  if os.path.isdir(params) and os.path.exists(marker):
    with open(marker) as f:
      if json.load(f).get('config_hash') == want:
        return params
  print(f'\n### public model (disjoint phantom federation, data seed offset '
        f'{PUBLIC_SEED_OFFSET}) → {out}', flush=True)
  trainer = train.Trainer(config, os.path.join(out, 'run'))
  summary = trainer.run()
  checkpointing.save_params(params, server.released_params(trainer.final_state))
  with open(marker, 'w') as f:
    json.dump({'config_hash': want, 'public_dice': summary['dice'],
               'data_seed_offset': PUBLIC_SEED_OFFSET}, f, indent=2)
  print(f"public model: Dice {summary['dice']:.4f} on its own (public) test split → {params}")
  return params


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--out', default='runs/frontier/public_model')
  ap.add_argument('--smoke', action='store_true')
  args = ap.parse_args(argv)
  print(ensure(args.out, args.smoke))
  return 0


if __name__ == '__main__':
  sys.exit(main())
