"""Segmentation losses for one example: soft Dice + cross-entropy.

Binary tasks have one logit channel (sigmoid); multi-class tasks have K channels (softmax, class 0
is background). ``regions`` turns the Dice term into a region-based Dice over (possibly
overlapping) unions of labels, e.g. KiTS23 kidney+masses / masses / tumour or BraTS WT / TC / ET:
the probability of a region is the sum of the softmax probabilities of its labels.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

_SMOOTH = 1.0


def _soft_dice(prob, target, smooth=_SMOOTH):
  """Soft Dice over all spatial positions of one example; prob, target: (..., R)."""
  axes = tuple(range(prob.ndim - 1))
  inter = jnp.sum(prob * target, axes)
  denom = jnp.sum(prob, axes) + jnp.sum(target, axes)
  return (2.0 * inter + smooth) / (denom + smooth)


def region_targets(labels, regions: Sequence[Sequence[int]]):
  """One-hot region masks (..., R) from an integer label map."""
  return jnp.stack([jnp.isin(labels, jnp.asarray(r)) for r in regions], -1).astype(jnp.float32)


def segmentation_loss(logits, labels, regions: Sequence[Sequence[int]] | None = None,
                      dice_weight: float = 1.0, ce_weight: float = 1.0):
  """Soft Dice + cross-entropy for one example.

  Args:
    logits: (*spatial, 1) for binary, (*spatial, K) for K-class softmax.
    labels: (*spatial,) integer labels.
    regions: label groups for a region-based Dice (multi-class only). Defaults to one region per
      foreground class.
    dice_weight: weight of (1 - mean Dice).
    ce_weight: weight of the mean cross-entropy.

  Returns:
    A scalar loss.
  """
  labels = labels.astype(jnp.int32)
  if logits.shape[-1] == 1:
    z = logits[..., 0]
    t = (labels > 0).astype(jnp.float32)
    ce = jnp.mean(optax.sigmoid_binary_cross_entropy(z, t))
    dice = _soft_dice(jax.nn.sigmoid(z)[..., None], t[..., None])
  else:
    k = logits.shape[-1]
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    prob = jax.nn.softmax(logits, axis=-1)
    if regions is None:
      regions = [(c,) for c in range(1, k)]
    member = jnp.stack([jnp.isin(jnp.arange(k), jnp.asarray(r)) for r in regions], -1)
    region_prob = prob @ member.astype(prob.dtype)
    dice = _soft_dice(region_prob, region_targets(labels, regions))
  return dice_weight * (1.0 - jnp.mean(dice)) + ce_weight * ce


def predict_labels(logits):
  """Hard labels from logits (binary: logit > 0)."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, -1).astype(jnp.int32)
