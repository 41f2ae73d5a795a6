"""Per-example gradients, clipping and masked sums: the sensitivity-bearing part of DP-SGD.

Written for one example and mapped: ``per_example_grads`` vmaps ``jax.value_and_grad`` of a
one-example loss (the vmap is hard-wired here, never injected, so examples cannot mix).
``clip_and_sum`` scales every example's gradient to norm ≤ C (L2, or L1 for the Laplace
mechanism), zeroes padded and non-finite examples, and sums. The sum has sensitivity C under
add/remove-one: adding or removing one example changes it by that example's clipped gradient,
whose norm is ≤ C. Per-example norms and unclipped indicators are returned for the DP count query
of adaptive clipping and for diagnostics; they never leave the client un-privatized.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


def per_example_grads(loss_fn: Callable[..., jax.Array], params: PyTree, *batch):
  """Per-example ``(losses, grads)`` of ``loss_fn(params, *example)`` over the leading axis."""
  return jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None,) + (0,) * len(batch))(params, *batch)


def clipped_sum(loss_fn: Callable[..., jax.Array], params: PyTree, x: jax.Array, y: jax.Array,
                mask: jax.Array, clip: jax.Array, norm: str = 'l2', microbatch: int = 0):
  """Per-example losses, the clipped sum of per-example gradients and its ``ClipStats``.

  ``microbatch`` > 0 computes the per-example gradients ``microbatch`` examples at a time
  (``lax.scan`` over chunks, the batch padded with masked slots to a multiple), so only one
  chunk's gradients — ``microbatch`` × parameters — are alive at once instead of the whole
  batch's. Each example is clipped exactly as without chunks; only the order of the float sum
  changes. 0 (or ≥ the batch) is the one-shot ``per_example_grads`` → ``clip_and_sum``.
  """
  b = mask.shape[0]
  if not microbatch or microbatch >= b:
    losses, grads = per_example_grads(loss_fn, params, x, y)
    summed, stats = clip_and_sum(grads, mask, clip, norm)
    return losses, summed, stats
  chunks = -(-b // microbatch)
  pad = chunks * microbatch - b

  def split(a):
    a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
    return a.reshape((chunks, microbatch) + a.shape[1:])

  def body(total, chunk):
    xc, yc, mc = chunk
    losses, grads = per_example_grads(loss_fn, params, xc, yc)
    summed, stats = clip_and_sum(grads, mc, clip, norm)
    total = jax.tree_util.tree_map(jnp.add, total, summed)
    return total, (losses, stats)

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  summed, (losses, stats) = jax.lax.scan(body, zeros, (split(x), split(y), split(mask)))
  unsplit = lambda a: a.reshape((chunks * microbatch,) + a.shape[2:])[:b]
  return unsplit(losses), summed, jax.tree_util.tree_map(unsplit, stats)


def per_example_norms(grads: PyTree, norm: str = 'l2') -> jax.Array:
  """Global L2 (or L1) norm of each example's gradient; grads have a leading example axis."""
  leaves = jax.tree_util.tree_leaves(grads)
  if norm == 'l2':
    sq = sum(jnp.sum(jnp.square(l.reshape(l.shape[0], -1).astype(jnp.float32)), 1) for l in leaves)
    return jnp.sqrt(sq)
  if norm == 'l1':
    return sum(jnp.sum(jnp.abs(l.reshape(l.shape[0], -1).astype(jnp.float32)), 1) for l in leaves)
  raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")


class ClipStats(NamedTuple):
  """Per-example diagnostics. Private: only a noised function of these may leave a client."""

  norms: jax.Array  # pre-clipping norms (0 for padding)
  unclipped: jax.Array  # 1.0 where a real example had norm <= C
  valid: jax.Array  # 1.0 for real, finite examples


def clip_factors(norms: jax.Array, clip: jax.Array, mask: jax.Array):
  """Scale factors min(1, C/‖g‖), 0 for padding and non-finite norms; and the validity mask."""
  finite = jnp.isfinite(norms)
  valid = (mask > 0) & finite
  safe = jnp.where(finite, norms, 0.0)
  # ‖g‖ > C ⇒ C/‖g‖ < 1. Written with where so C = ∞, C = 0 and ‖g‖ = 0 are all exact.
  factor = jnp.where(safe > clip, clip / jnp.where(safe > 0, safe, 1.0), 1.0)
  factor = jnp.where(valid, factor, 0.0)
  return factor, valid


def clip_and_sum(grads: PyTree, mask: jax.Array, clip: jax.Array, norm: str = 'l2'):
  """Clips each example's gradient to norm ≤ ``clip`` and sums over examples.

  Args:
    grads: per-example gradients, every leaf with a leading example axis of size B.
    mask: (B,) 1 for real examples, 0 for padding. Padding contributes exactly zero.
    clip: scalar clip norm C (may be ``inf`` for no clipping, or 0).
    norm: 'l2' (Gaussian mechanism) or 'l1' (Laplace mechanism).

  Returns:
    (summed gradient pytree, ClipStats).
  """
  norms = per_example_norms(grads, norm)
  factor, valid = clip_factors(norms, clip, mask)

  def _sum(leaf):
    # where() rather than multiply: 0 * NaN would still be NaN.
    keep = valid.reshape((-1,) + (1,) * (leaf.ndim - 1))
    scaled = jnp.where(keep, leaf * factor.reshape(keep.shape).astype(leaf.dtype), 0)
    return jnp.sum(scaled, axis=0)

  summed = jax.tree_util.tree_map(_sum, grads)
  unclipped = jnp.where(valid & (norms <= clip), 1.0, 0.0)
  stats = ClipStats(norms=jnp.where(valid, norms, 0.0), unclipped=unclipped,
                    valid=valid.astype(jnp.float32))
  return summed, stats
