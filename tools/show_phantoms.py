r"""Saves a PNG grid of phantom dermoscopy examples, one row pair (image, mask) per site.

Usage:
  PYTHONPATH=. python tools/show_phantoms.py --out=/tmp/phantoms.png --num_clients=4 \
      --per_site=8 --size=64
"""

import argparse

import numpy as np
from PIL import Image

from adpfl_jax.data import phantom_skin


def make_grid(fed: dict, per_site: int, upscale: int) -> np.ndarray:
  """Returns a uint8 RGB grid: for each site a row of images and a row of mask overlays."""
  rows = []
  for x, y in zip(fed['train_x'], fed['train_y']):
    rgb = phantom_skin.to_rgb(x[:per_site])
    overlay = rgb.copy()
    edge = y[:per_site].astype(bool)
    overlay[edge] = 0.5 * overlay[edge] + 0.5 * np.array([0.0, 1.0, 0.0])
    for block in (rgb, overlay):
      pad = np.pad(block, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1.0)
      rows.append(np.concatenate(list(pad), axis=1))
  grid = np.concatenate(rows, axis=0)
  grid = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
  return (grid * 255).round().astype(np.uint8)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--out', default='/tmp/phantoms.png')
  parser.add_argument('--num_clients', type=int, default=4)
  parser.add_argument('--per_site', type=int, default=8)
  parser.add_argument('--size', type=int, default=64)
  parser.add_argument('--upscale', type=int, default=2)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--heterogeneity', type=float, default=1.0)
  args = parser.parse_args()
  fed = phantom_skin.make_federation(num_clients=args.num_clients,
                                     examples_per_client=args.per_site,
                                     test_examples_per_client=0, image_size=args.size,
                                     seed=args.seed, heterogeneity=args.heterogeneity)
  Image.fromarray(make_grid(fed, args.per_site, args.upscale)).save(args.out)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
