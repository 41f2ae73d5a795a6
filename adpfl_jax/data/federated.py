"""Client datasets padded into static-shape arrays, and the dataset registry.

A federation is K clients, each with a train and a test split of different sizes. For a jitted
round, train data live on the device as one array ``(K, N_max, *example_shape)`` with per-client
sizes ``n_k``; padded rows are never sampled (the sampling plan draws indices below ``n_k``) and
would contribute exactly zero anyway (their mask is 0). Client sizes are treated as public,
configured constants (the expected batch ``q·n_k`` must be public).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class FederatedData:
  """Host-side padded federation."""

  train_x: np.ndarray  # (K, N_max, *example_shape) float32
  train_y: np.ndarray  # (K, N_max, *label_shape) uint8
  sizes: np.ndarray  # (K,) int64
  test_x: list  # K arrays (n_test_k, *example_shape)
  test_y: list
  client_names: list
  num_classes: int  # 1 = binary (sigmoid), K > 1 = softmax
  task: str  # 'skin', 'kits23', 'brats2024'
  spacing: tuple | None = None  # voxel spacing (mm) of examples, for surface metrics
  partition_summary: dict | None = None

  @property
  def num_clients(self) -> int:
    return len(self.client_names)

  @property
  def example_shape(self):
    return tuple(self.train_x.shape[2:])


def pad_clients(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]):
  """Stacks ragged client arrays into ``(K, N_max, ...)`` with zero padding; returns sizes."""
  sizes = np.array([len(x) for x in xs], np.int64)
  n_max = int(sizes.max())
  x = np.zeros((len(xs), n_max) + xs[0].shape[1:], np.float32)
  y = np.zeros((len(ys), n_max) + ys[0].shape[1:], np.uint8)
  for k, (xk, yk) in enumerate(zip(xs, ys)):
    if len(xk) != len(yk):
      raise ValueError(f'client {k}: {len(xk)} images but {len(yk)} masks')
    x[k, :len(xk)] = xk
    y[k, :len(yk)] = yk
  return x, y, sizes


def from_lists(train_x, train_y, test_x, test_y, names, num_classes, task, spacing=None,
               partition_summary=None) -> FederatedData:
  x, y, sizes = pad_clients(train_x, train_y)
  return FederatedData(train_x=x, train_y=y, sizes=sizes, test_x=list(test_x),
                       test_y=list(test_y), client_names=list(names), num_classes=num_classes,
                       task=task, spacing=spacing, partition_summary=partition_summary)


def load(data_cfg, seed: int) -> FederatedData:
  """Loads the federation named by ``data_cfg.name``."""
  name = data_cfg.name
  if name == 'phantom_skin':
    from adpfl_jax.data import phantom_skin  # pylint: disable=g-import-not-at-top
    fed = phantom_skin.make_federation(
        num_clients=int(data_cfg.num_clients),
        examples_per_client=int(data_cfg.examples_per_client),
        test_examples_per_client=int(data_cfg.test_examples_per_client),
        image_size=int(data_cfg.image_size), seed=seed + int(data_cfg.get('seed_offset', 0)),
        heterogeneity=float(data_cfg.get('heterogeneity', 1.0)))
    return from_lists(fed['train_x'], fed['train_y'], fed['test_x'], fed['test_y'],
                      fed['client_names'], num_classes=1, task='skin', spacing=(1.0, 1.0))
  if name in ('ham10000', 'kits23', 'brats2024'):
    from adpfl_jax.data import loaders  # pylint: disable=g-import-not-at-top
    return loaders.load(data_cfg, seed)
  raise ValueError(f'config.data.name={name!r} is not a known dataset; '
                   "choose one of ('phantom_skin', 'ham10000', 'kits23', 'brats2024')")
