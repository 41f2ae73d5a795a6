"""Augmentation multiplicity (De et al. 2022, arXiv 2204.13650): one record, k views, one clip.

For every sampled record i, draw k random augmentations a_1..a_k from randomness that does not
depend on any record (a key per step and slot), compute the gradient of each augmented copy and
average them: ḡ_i = (1/k) Σ_j ∇ℓ(θ; a_j(x_i, y_i)). ḡ_i is then clipped to C like any per-example
gradient (``clipping.clip_and_sum``). ḡ_i is a function of record i alone (and of public
randomness), so adding or removing record i changes the clipped sum by at most C: the sensitivity,
the sampled Gaussian step and hence the ledger are exactly those of plain DP-SGD
(``docs/frontier.md`` §1). The benefit is a lower-variance per-record signal at the same noise.

Augmentations suited to segmentation, applied identically to the image and its label map: a
random flip along each spatial axis (probability ½) and a random integer shift of up to ``shift``
voxels along each spatial axis, zero-padded (the label's padding is background, 0).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from adpfl_jax.privacy import clipping

PyTree = Any


def augment_pair(key: jax.Array, x: jax.Array, y: jax.Array, *, shift: int, flip: bool):
  """One random view of one example: ``x`` (*spatial, C) and its label ``y`` (*spatial).

  The same flips and shifts are applied to both, so the label stays aligned with the image.
  """
  spatial = y.ndim
  k_flip, k_shift = jax.random.split(key)
  flips = jax.random.bernoulli(k_flip, 0.5, (spatial,))
  offsets = jax.random.randint(k_shift, (spatial,), 0, 2 * shift + 1)

  def one(a, pad_extra):
    for ax in range(spatial):
      if flip:
        a = jnp.where(flips[ax], jnp.flip(a, axis=ax), a)
    if shift > 0:
      pad = [(shift, shift)] * spatial + [(0, 0)] * pad_extra
      padded = jnp.pad(a, pad)
      starts = [offsets[ax] for ax in range(spatial)] + [0] * pad_extra
      a = jax.lax.dynamic_slice(padded, starts, a.shape)
    return a

  return one(x, x.ndim - spatial), one(y, 0)


def augment_views(key: jax.Array, x: jax.Array, y: jax.Array, k: int, *, shift: int,
                  flip: bool):
  """(k, *x.shape), (k, *y.shape): k independent views of one example."""
  keys = jax.random.split(key, k)
  return jax.vmap(lambda kk: augment_pair(kk, x, y, shift=shift, flip=flip))(keys)


def averaged_per_example_grads(loss_fn: Callable[..., jax.Array], params: PyTree, x: jax.Array,
                               y: jax.Array, key: jax.Array, k: int, *, shift: int = 2,
                               flip: bool = True):
  """Per-example ``(losses, grads)``, each the mean over k augmented views of that example.

  Args:
    loss_fn: one-example loss ``loss_fn(params, x_i, y_i)``.
    params: model parameters.
    x: (B, *example_shape) inputs; y: (B, *label_shape) labels.
    key: this step's augmentation key (public randomness, independent of the data).
    k: multiplicity (≥ 1).
    shift, flip: augmentation parameters (``augment_pair``).

  Returns:
    ``(losses (B,), grads)`` with a leading example axis B on every leaf, ready for
    ``clipping.clip_and_sum``: row i depends on example i only.
  """
  return averaged_grads(loss_fn, params, x, y, jax.random.split(key, x.shape[0]), k=k,
                        shift=shift, flip=flip)


def averaged_grads(loss_fn: Callable[..., jax.Array], params: PyTree, x: jax.Array, y: jax.Array,
                   keys: jax.Array, *, k: int, shift: int = 2, flip: bool = True):
  """``averaged_per_example_grads`` with one augmentation key per example (``keys``: (B,)).

  Row i depends on example i and its key only, so the client can compute the rows in chunks
  (``clipping.clipped_sum``) and get the same rows.
  """
  b = x.shape[0]
  xv, yv = jax.vmap(lambda kk, xi, yi: augment_views(kk, xi, yi, k, shift=shift, flip=flip))(
      keys, x, y)
  flat_x = xv.reshape((b * k,) + x.shape[1:])
  flat_y = yv.reshape((b * k,) + y.shape[1:])
  losses, grads = clipping.per_example_grads(loss_fn, params, flat_x, flat_y)
  mean_k = lambda a: jnp.mean(a.reshape((b, k) + a.shape[1:]), axis=1)
  return mean_k(losses), jax.tree_util.tree_map(mean_k, grads)
