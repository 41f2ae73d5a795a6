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
from jax import lax

PyTree = Any


def per_example_grads(loss_fn: Callable[..., jax.Array], params: PyTree, *batch):
  """Per-example ``(losses, grads)`` of ``loss_fn(params, *example)`` over the leading axis."""
  return jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None,) + (0,) * len(batch))(params, *batch)


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


def clip_and_sum_chunked(loss_fn: Callable[..., jax.Array], params: PyTree, x: jax.Array,
                         y: jax.Array, mask: jax.Array, clip: jax.Array, norm: str = 'l2',
                         chunk: int = 1):
  """``per_example_grads`` then ``clip_and_sum``, ``chunk`` examples at a time, skipping padding.

  The slots of a padded Poisson batch hold the sampled examples first (``mask`` is a prefix of
  ones, as ``federated.sampling`` builds it). A ``lax.while_loop`` computes the per-example
  gradients of ``ceil(Σmask / chunk)`` chunks only, so the cost follows the realised batch, not
  the padded one, and at most ``chunk`` per-example gradients are held at once (peak memory).
  Each example's gradient is clipped exactly as in ``clip_and_sum``: the sum, the norms and the
  indicators are the same function of the data (up to floating-point summation order), so the
  sensitivity and the accounting are unchanged.

  Returns:
    (per-example losses (B,), summed gradient pytree, ClipStats), as the unchunked path.
  """
  slots = mask.shape[0]
  chunks = -(-slots // chunk)
  pad = chunks * chunk - slots
  if pad:
    widen = lambda a: jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
    x, y, mask = widen(x), widen(y), widen(mask)
  # Chunks that hold a sampled example; the prefix layout makes them the first ``needed``.
  needed = jnp.ceil(jnp.sum(mask > 0) / chunk).astype(jnp.int32)
  take = lambda a, i: lax.dynamic_slice_in_dim(a, i * chunk, chunk)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  floats = jnp.zeros((chunks * chunk,), jnp.float32)

  def body(carry):
    i, summed, losses, norms, unclipped, valid = carry
    chunk_losses, grads = per_example_grads(loss_fn, params, take(x, i), take(y, i))
    part, stats = clip_and_sum(grads, take(mask, i), clip, norm)
    put = lambda a, v: lax.dynamic_update_slice_in_dim(a, v.astype(a.dtype), i * chunk, 0)
    summed = jax.tree_util.tree_map(jnp.add, summed, part)
    return (i + 1, summed, put(losses, chunk_losses), put(norms, stats.norms),
            put(unclipped, stats.unclipped), put(valid, stats.valid))

  init = (jnp.int32(0), zeros, floats, floats, floats, floats)
  _, summed, losses, norms, unclipped, valid = lax.while_loop(
      lambda c: c[0] < needed, body, init)
  stats = ClipStats(norms=norms[:slots], unclipped=unclipped[:slots], valid=valid[:slots])
  return losses[:slots], summed, stats
