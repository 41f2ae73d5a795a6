"""`FederatedData`: client datasets padded into static-shape arrays (the pipeline's output).

A federation is K clients, each with a train and a test split of different sizes. For a jitted
round, train data live on the device as one array ``(K, N_max, *example_shape)`` with per-client
sizes ``n_k``; padded rows are never sampled (the sampling plan draws indices below ``n_k``) and
would contribute exactly zero anyway (their mask is 0). Client sizes are treated as public,
configured constants (the expected batch ``q·n_k`` must be public).

This module is the leaf of `adpfl_jax.data`: it imports nothing else from the package, so every
other module (the pipeline in `federated.py`, tests, benchmarks) can build a `FederatedData`.
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
  """A `FederatedData` from per-client lists of train/test arrays (train padded, test ragged)."""
  x, y, sizes = pad_clients(train_x, train_y)
  return FederatedData(train_x=x, train_y=y, sizes=sizes, test_x=list(test_x),
                       test_y=list(test_y), client_names=list(names), num_classes=num_classes,
                       task=task, spacing=spacing, partition_summary=partition_summary)
