"""Dice for evaluation during training (jitted, per image / volume, per region).

Conventions: an image whose truth and prediction are both empty for a region scores Dice 1 (the
usual convention of the skin-lesion and BraTS scorers); see ``metrics/surface.py`` for the
challenge scorers' full conventions and surface metrics.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adpfl_jax import losses


def dice_per_region(pred_labels, true_labels, regions: Sequence[Sequence[int]]):
  """(R,) hard Dice of one example for each region (a union of labels)."""
  p = losses.region_targets(pred_labels, regions)
  t = losses.region_targets(true_labels, regions)
  axes = tuple(range(p.ndim - 1))
  inter = jnp.sum(p * t, axes)
  denom = jnp.sum(p, axes) + jnp.sum(t, axes)
  return jnp.where(denom > 0, 2 * inter / jnp.where(denom > 0, denom, 1.0), 1.0)


def make_evaluator(apply_fn, regions: Sequence[Sequence[int]], batch_size: int = 64):
  """Returns ``evaluate(params, x, y) -> (n, R) per-example Dice`` (host loop over batches)."""
  regions = tuple(tuple(r) for r in regions)

  @jax.jit
  def batch_dice(params, x, y):
    logits = jax.vmap(lambda xi: apply_fn(params, xi))(x)
    pred = losses.predict_labels(logits)
    return jax.vmap(lambda p, t: dice_per_region(p, t, regions))(pred, y)

  def evaluate(params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = []
    n = len(x)
    for s in range(0, n, batch_size):
      xb, yb = x[s:s + batch_size], y[s:s + batch_size]
      pad = batch_size - len(xb) if n > batch_size else 0
      if pad:  # keep one compiled shape
        xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
        yb = np.concatenate([yb, np.zeros((pad,) + yb.shape[1:], yb.dtype)])
      d = np.asarray(batch_dice(params, xb, yb))
      out.append(d[:len(d) - pad] if pad else d)
    return np.concatenate(out) if out else np.zeros((0, len(regions)))

  return evaluate
